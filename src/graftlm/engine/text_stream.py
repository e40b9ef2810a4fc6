"""Incremental detokenization with stop strings: emits only text that can no longer change or be cut."""

from __future__ import annotations

from collections.abc import Sequence

from graftlm.model.tokenizer import Tokenizer


class TextStream:
    """Turns one sequence's generated ids into text deltas, holding back partial stop strings and
    partial UTF-8 characters until they resolve."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the text emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly settled text (possibly empty). Sets `stopped` on a stop string."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        for s in self.stop:
            # only search where a new match can start: it must end in the not-yet-emitted part
            idx = full.find(s, max(0, len(self.text) - len(s) + 1))
            if idx != -1:
                self.stopped = True
                return self._emit(full[:idx])
        settled = len(full) - self._held_back(full)
        return self._emit(full[:settled])

    def finish(self) -> str:
        """Release what was held back when generation ends for another reason (length, EOS)."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    def _held_back(self, full: str) -> int:
        hold = 0
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            hold = len(full) - len(full.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
