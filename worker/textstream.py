"""Incremental text for streamed generations: valid UTF-8 deltas and stop strings."""

from __future__ import annotations

import codecs


class TextStream:
    """Turns token pieces (bytes) into text deltas.

    Partial multi-byte characters are held until complete; text that could be
    the start of a stop string is held until it cannot match any more. When a
    stop string appears, the text before it is released and ``stopped`` is set.
    """

    def __init__(self, stop: list[str] | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in (stop or []) if s]
        self._held = ""
        self._parts: list[str] = []  # released deltas (joined on demand: no O(n^2) +=)
        self.stopped: str | None = None

    @property
    def text(self) -> str:
        """Everything released so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; return the text that may be released now."""
        if self.stopped is not None:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush whatever is held (minus a partial stop match)."""
        if self.stopped is not None:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        if self._stop:
            # earliest full stop-string match wins
            cut = -1
            for s in self._stop:
                i = held.find(s)
                if i >= 0 and (cut < 0 or i < cut):
                    cut, self.stopped = i, s
            if cut >= 0:
                out, self._held = held[:cut], ""
                self._parts.append(out)
                return out
            if not final:
                keep = 0
                for s in self._stop:
                    for n in range(min(len(s) - 1, len(held)), 0, -1):
                        if held.endswith(s[:n]):
                            keep = max(keep, n)
                            break
                out, self._held = held[: len(held) - keep], held[len(held) - keep:]
                self._parts.append(out)
                return out
        out, self._held = held, ""
        self._parts.append(out)
        return out
