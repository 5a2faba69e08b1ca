"""Chat transcripts in a memory: how messages become text, and which messages a request still has to add.

Format: the tokenizer's chat template when it has one; otherwise a plain role-prefixed transcript
(``System: ...``, ``User: ...``, ``Assistant: ...``, one message per line, ``Assistant:`` as the generation
prompt), where a reply stops at the next role prefix (``\\nUser:`` etc.).

The memory is the transcript, and it is append-only. Chat clients resend the whole conversation with every
request, so :func:`text_to_append` appends only what the memory does not hold yet: the messages after the
last assistant message that this server generated (recognised by a digest of its text, kept in the session
state). A request without such a message (the first one, or a client that sends only its new messages) is
appended whole.

A reply does not end where its canonical rendering does: the engine stops *after* the token completing a stop
string or the end-of-sequence token, so the memory may already hold the next turn's prefix (``\\nUser:``), an
EOS token, or nothing (a reply cut by the length limit). The session state records that ``pending`` text, and
the next append first owes what the canonical turn end still lacks and skips the prefix already there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from megacontext.serve.errors import bad_request

ROLE_PREFIX = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_STOPS = tuple(f"\n{p}:" for p in ("User", "System", "Assistant", "Tool"))
_SENTINEL = "\u2063MEGACONTEXT-REPLY\u2063"
KEEP_DIGESTS = 256  # assistant replies remembered per session


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


class ChatFormat:
    """Renders messages with the tokenizer's chat template, or the plain role-prefixed format."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.turn_end = self._turn_end()  # canonical text right after an assistant reply's content
        if self.template:
            end = self.turn_end.strip()
            self.stops = (end,) if end else ()
        else:
            self.stops = PLAIN_STOPS

    @property
    def name(self) -> str:
        return "chat_template" if self.template else "plain"

    def render(self, messages: list[ChatMessage], generation_prompt: bool) -> str:
        for m in messages:
            if m.role not in ROLE_PREFIX:
                raise bad_request(f"message role {m.role!r} is not supported; expected one of {sorted(ROLE_PREFIX)}")
        if not self.template:
            text = "".join(f"{ROLE_PREFIX[m.role]}: {m.content.strip()}\n" for m in messages)
            return text + ("Assistant:" if generation_prompt else "")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # a template refusing the message sequence (e.g. roles must alternate)
            raise bad_request(f"the model's chat template refused these messages: {e}") from e

    def _turn_end(self) -> str:
        if not self.template:
            return "\n"
        probe = self.render([ChatMessage("user", "hi"), ChatMessage("assistant", _SENTINEL)], False)
        at = probe.rfind(_SENTINEL)
        return probe[at + len(_SENTINEL):] if at >= 0 else ""


def text_to_append(fmt: ChatFormat, messages: list[ChatMessage], chat_state: dict, memory_ends_line: bool) -> str:
    """The text this request adds to the memory before the reply is generated (ends with the generation prompt).

    ``chat_state``: the session's ``{"assistant": [digests], "pending": str | None}``; ``memory_ends_line``:
    the memory is empty or its text ends with a newline."""
    known = set(chat_state.get("assistant", ()))
    j = max((i for i, m in enumerate(messages) if m.role == "assistant" and digest(m.content) in known), default=-1)
    full = fmt.render(messages, True)
    if j >= 0:
        prefix = fmt.render(messages[: j + 1], False)
        new = full[len(prefix):] if full.startswith(prefix) else fmt.render(messages[j + 1:], True)
    else:
        new = full
    pending = chat_state.get("pending")
    if pending is not None:  # the last thing in the memory is a reply of ours, ending with `pending`
        after = fmt.turn_end
        if pending.startswith(after):  # e.g. the reply stopped on "\nUser:": that prefix is already there
            owed, opened = "", pending[len(after):]
        elif after.startswith(pending):  # e.g. stopped on the template's end token: the rest of the turn end
            owed, opened = after[len(pending):], ""
        else:  # e.g. cut by the length limit, or an EOS where the plain format ends a turn with a newline
            owed, opened = after, ""
        if opened:
            new = new[len(opened):] if new.startswith(opened) else "\n" + new
        new = owed + new
    elif not memory_ends_line and not fmt.template:
        new = "\n" + new
    return new


def record_reply(chat_state: dict, reply: str, pending: str) -> None:
    """Remember a generated reply (so a client resending it is not appended again) and what followed it."""
    seen = [d for d in chat_state.get("assistant", []) if d != digest(reply)]
    chat_state["assistant"] = (seen + [digest(reply)])[-KEEP_DIGESTS:]
    chat_state["pending"] = pending
