"""One row of a request in the engine's batch: the text it has made, held back while it could
start a stop sequence, and why it finished."""

from __future__ import annotations

from charlm.data.vocab import StreamDecoder
from charlm.serving.completion import Completion


class Row:
    """One row of a request in the batch: its decoder, the text it holds back, and whether it is done.

    Text is held back while it could be the start of a stop sequence. Each character keeps the
    probability the model gave it (for a character made of several bytes, their product)."""

    def __init__(self, job: Completion, index: int, decoder: StreamDecoder):
        self.job, self.index, self.decoder = job, index, decoder
        self.pending = ""  # text not sent yet
        self.probs: list[float] = []  # one per character of `pending`
        self.unit_prob = 1.0  # of the units the decoder holds (an unfinished UTF-8 character)
        self.produced = 0
        self.finish: str | None = None

    def add(self, unit: int, prob: float) -> dict | None:
        """Take one generated unit; the event to send now (None: nothing to send yet)."""
        if self.finish is not None:  # done, waiting for the request's other rows
            return None
        self.produced += 1
        if unit == self.job.stop_id:
            return self.end("stop")
        self.unit_prob *= prob
        self._append(self.decoder.feed(unit))
        cut = [self.pending.find(s) for s in self.job.stop if s and s in self.pending]
        if cut:
            self._truncate(min(cut))
            return self.end("stop")
        if self.produced >= self.job.max_tokens:
            self._append(self.decoder.flush())
            return self.end("length")
        return self._release(len(self.pending) - self._held_back())

    def end(self, reason: str) -> dict:
        """Finish the row for `reason`: the event that sends what it held back and says why it ended."""
        self.finish = reason
        event = {
            "index": self.index,
            "text": self.pending,
            "probs": self.probs,
            "finish_reason": reason,
            "tokens": self.produced,
        }
        self.pending, self.probs = "", []
        return event

    def _append(self, text: str) -> None:
        if text:
            self.pending += text
            self.probs += [self.unit_prob] + [1.0] * (len(text) - 1)
            self.unit_prob = 1.0

    def _truncate(self, length: int) -> None:
        self.pending, self.probs = self.pending[:length], self.probs[:length]

    def _release(self, count: int) -> dict | None:
        if count <= 0:
            return None
        event = {"index": self.index, "text": self.pending[:count], "probs": self.probs[:count]}
        self.pending, self.probs = self.pending[count:], self.probs[count:]
        return event

    def _held_back(self) -> int:
        """How many trailing characters could begin a stop sequence (they wait for the next ones)."""
        longest = 0
        for s in self.job.stop:
            for k in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:k]):
                    longest = k
                    break
        return longest
