"""A request's answer as text: decoded token by token, honouring stop strings (Pipeline.begin makes one)."""

from __future__ import annotations


class TextStream:
    """Turns the growing token list into text deltas, honouring stop strings.

    The whole prefix is decoded each step (a token can complete a multi-byte character),
    and text that could still be the start of a stop string is held back until it is not.
    """

    def __init__(self, pipeline, stop, on_text):  # pipeline: what decodes ids to text (serve.pipeline.Pipeline)
        self.pipeline, self.stops, self.on_text = pipeline, list(stop), on_text
        self.stopped = False  # a stop string appeared: the answer ends before it
        self.text, self.sent = "", 0

    def push(self, tokens: list[int]) -> bool:
        """Decode; True when a stop string appeared (text is cut before it)."""
        self.text = self.pipeline.decode(tokens)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._emit(len(self.text))
            return True
        safe = len(self.text) - self._held_back()
        if self.text.endswith("\ufffd"):  # an unfinished multi-byte character
            safe = min(safe, len(self.text) - 1)
        self._emit(safe)
        return False

    def flush(self) -> None:
        self._emit(len(self.text))

    def _held_back(self) -> int:
        return max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])),
                   default=0)

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            if self.on_text:
                self.on_text(self.text[self.sent: upto])
            self.sent = upto
