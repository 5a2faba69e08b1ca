"""Wire-level names shared by the server and its clients (no heavy imports: an agent's client loads only this
and httpx).

Session ids: 1-64 ASCII letters, digits, ``_`` and ``-``, starting with a letter or digit. That makes an id one
plain path component under the data root (no ``.``, ``/``, ``%``, NUL, whitespace or non-ASCII look-alikes) and
one plain URL path segment, so neither the server nor a client ever has to escape or normalise it.
"""

from __future__ import annotations

import re

TOKEN_ENV = "MEGACONTEXT_TOKEN"  # where servers and clients read the bearer token from
SESSION_HEADER = "X-MegaContext-Session"  # picks the memory of an OpenAI-style request
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SESSION_ID_RULE = "1-64 ASCII letters, digits, '_' or '-', starting with a letter or digit"


def valid_session_id(sid) -> bool:
    return isinstance(sid, str) and SESSION_ID.fullmatch(sid) is not None
