"""StopFilter: streamed text with stop strings removed, holding back only what could start one.

``MegaContext.generate`` stops *after* the token that completes a stop string, so its text (and the memory)
ends with the stop string. A client wants the text before it, streamed without ever showing a piece of the
stop string: text that might be the start of a stop string is held back until it is known not to be, and
the stop string itself is never emitted. The end-of-sequence token's text counts as a stop string too. Which stop
string ends the text is decided as the generation decides it: the first one to complete (the earliest end).
"""

from __future__ import annotations


class StopFilter:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self.buf = ""
        self.stopped_on: str | None = None

    def _held(self) -> int:
        """Length of the longest suffix of the buffer that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), best, -1):
                if self.buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, piece: str) -> str:
        """Text that is now safe to emit (nothing once a stop string was seen)."""
        if self.stopped_on is not None:
            return ""
        self.buf += piece
        # the stop string completed first (earliest end; the longest one on a tie), as the generation stopped there
        hits = [(self.buf.find(s) + len(s), -len(s), s) for s in self.stops if s in self.buf]
        if hits:
            end, neg_len, s = min(hits)
            out, self.buf, self.stopped_on = self.buf[: end + neg_len], "", s
            return out
        keep = self._held()
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(out):]
        return out

    def finish(self) -> str:
        """The held-back rest at the end of the stream (no stop string followed it)."""
        out, self.buf = self.buf, ""
        return out
