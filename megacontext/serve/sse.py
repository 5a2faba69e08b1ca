"""Server-sent events: the wire format of every streamed response, and what a client sees of a late failure.

An event is ``event: <name>`` (optional) + ``data: <JSON or a literal such as [DONE]>`` + a blank line. Once a
stream has started, its HTTP status is already 200, so a failure is reported in-band as an error event with
the same one-line JSON as a 4xx body; a bug is logged with its traceback and shown only as a reference.
"""

from __future__ import annotations

import json
import logging
import uuid

from megacontext.serve.errors import ServeError

log = logging.getLogger(__name__)


def sse(data, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stream_error(e: BaseException) -> ServeError:
    """What a client is told about an exception raised after its stream started."""
    if isinstance(e, ServeError):
        return e
    ref = uuid.uuid4().hex[:8]
    log.error("error %s in a stream", ref, exc_info=e)
    return ServeError(500, f"internal error (reference {ref} in the server log)")
