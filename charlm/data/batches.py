"""Cut a token stream into truncated-BPTT windows: B parallel streams, T steps per window."""

from __future__ import annotations

import torch

from charlm.data.text import DataError


class TBPTTBatches:
    """Truncated-BPTT windows over one token stream.

    The N ids are cut into B parallel streams of L = (N - 1) // B inputs; targets are the
    inputs shifted by one. Each step takes the next window of T columns, so window k of a
    stream continues window k - 1 of the same stream and the carried state is true context:

                  window 0        window 1           last window (may be shorter)
        stream 0  ids[0:T]        ids[T:2T]     ...  ids[kT:L]
        stream 1  ids[L:L+T]      ids[L+T:L+2T] ...  ids[L+kT:2L]
        ...
        stream B-1

    One epoch = every window once = one pass over all but the last N - B*L ids.

    With `random_offsets`, epoch e > 0 reads the same layout shifted right by a random
    s_e in [0, T) (drawn from `seed` and e alone, so a resumed or distributed run draws the
    same), and L = (N - 1 - (T - 1)) // B so every shift fits: window boundaries then fall at
    new places each epoch, and a character is not always predicted from the same position in
    its window (the same aim as the AWD-LSTM's variable-length BPTT, with a fixed T).
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, random_offsets: bool = False, seed: int = 0):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.random_offsets, self.seed = random_offsets, seed
        slack = seq_len - 1 if random_offsets else 0  # room for the largest shift
        needed = batch_size * seq_len + 1 + slack
        if ids.numel() < needed:
            raise DataError(
                f"the training text has {ids.numel()} characters but one window needs "
                f"train.batch_size x train.seq_len + 1 = {needed - slack}"
                f"{f' (+ {slack} for train.random_offsets)' if slack else ''}; use more text or "
                "lower train.batch_size / train.seq_len"
            )
        self.ids = ids
        self.length = (ids.numel() - 1 - slack) // batch_size  # L
        self.windows_per_epoch = -(-self.length // seq_len)

    @property
    def chars_per_epoch(self) -> int:
        return self.batch_size * self.length

    def offset(self, epoch: int) -> int:
        """Where epoch `epoch`'s streams start: 0, or with random_offsets a shift in [0, T) for epochs > 0."""
        if not self.random_offsets or epoch == 0:
            return 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return int(torch.randint(self.seq_len, (), generator=generator))

    def window(self, k: int, rows: slice = slice(None), epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of window k of `epoch` for streams `rows`: int64 [B', T] (T shorter for the last)."""
        assert 0 <= k < self.windows_per_epoch, f"window {k} outside 0..{self.windows_per_epoch - 1}"
        start, count = self.offset(epoch), self.batch_size * self.length
        inputs = self.ids[start : start + count].view(self.batch_size, self.length)  # [B, L]
        targets = self.ids[start + 1 : start + count + 1].view(self.batch_size, self.length)  # [B, L]
        cols = slice(k * self.seq_len, (k + 1) * self.seq_len)
        return inputs[rows, cols].long(), targets[rows, cols].long()
