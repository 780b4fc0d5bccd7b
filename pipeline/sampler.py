"""Which token windows each rank reads at each step: the data order.

A sample is a window of seq_len + 1 tokens of the packed stream (inputs and
next-token targets). Window i starts at token i·seq_len. Each epoch visits
every window once in a permutation seeded by (seed, epoch). Optimizer step s
consumes global samples [s·G, (s+1)·G), G = micro_batch · accumulation ·
world_size; rank r takes the r-th contiguous slice of those G and splits it
into micro-batches. So the samples of a step, and the loss averaged over
them, do not depend on the number of processes, and the data position is
just the step number: resuming needs no loader state.
"""

from __future__ import annotations

import numpy as np
import torch


class WindowSampler:
    def __init__(self, tokens, seq_len: int, seed: int):
        self.tokens = tokens  # 1-D memmap-like: len() and [a:b] slicing
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perm_epoch, self._perm = -1, None

    def window_ids(self, first: int, count: int) -> np.ndarray:
        """Window ids of global samples first .. first + count - 1 (crossing epochs as needed)."""
        ids = np.empty(count, dtype=np.int64)
        for j, g in enumerate(range(first, first + count)):
            epoch, position = divmod(g, self.n_windows)
            ids[j] = self._permutation(epoch)[position]
        return ids

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=generator).numpy()
            self._perm_epoch = epoch
        return self._perm

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for these windows: two (B, seq_len) int64 tensors."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T : i * T + T + 1]) for i in window_ids]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int, accumulation: int):
        """The accumulation micro-batches (inputs, targets) that `rank` trains on at optimizer `step`."""
        per_rank = micro_batch * accumulation
        first = step * per_rank * world_size + rank * per_rank
        ids = self.window_ids(first, per_rank)
        for m in range(accumulation):
            yield self.batch(ids[m * micro_batch : (m + 1) * micro_batch])


def eval_windows(n_windows: int, count: int) -> np.ndarray:
    """The fixed validation windows: evenly spread over the split, the same at every evaluation."""
    count = min(count, n_windows)
    return np.linspace(0, n_windows - 1, num=count).round().astype(np.int64) if count else np.empty(0, np.int64)
