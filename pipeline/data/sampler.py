"""Which token windows each rank reads at each step: the data order.

A sample is a window of seq_len + 1 tokens of one source's packed stream
(inputs and next-token targets). Global sample g is found in three steps, each O(1) in the store's size:

  1. source: the mixture (`Mixture`) maps g to a source k and to j, the
     within-source sample index, in the Sainte-Laguë seat order: source k's
     j-th sample is due at time (j + ½)/w_k, and the global samples are all
     sources' samples by due time. After any N samples every source holds
     N·w_k of them to within ½ + K·w_k/2 samples (K sources), in exact
     rational arithmetic: the error never grows, and each step mixes the
     sources in proportion.
  2. window: pass j // n_k over source k visits its n_k windows in a seeded
     permutation (pipeline/data/shuffle.py: a Feistel bijection, never
     materialised), seeded by (seed, source name, pass). A small source
     repeats with a fresh order each pass, a large one is never exhausted.
  3. tokens: `train.window_start: stream` puts window w at token w·seq_len;
     `document` puts it at the first token (BOS) of document w, and the window
     packs the documents that follow.

Optimizer step s consumes global samples [s·G, (s+1)·G), G = micro_batch ·
accumulation · world_size; rank r takes the r-th contiguous slice of those G
and splits it into micro-batches. So the samples of a step, and the loss
averaged over them, do not depend on the number of processes, and the data
position is just the step number: resuming needs no loader state. Nothing
here grows with the store: memory and time per lookup are O(1) in the
number of tokens, documents and windows, and every index is int64.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from pipeline.data.shuffle import SeededPermutation, seed_key

WINDOW_STARTS = ("stream", "document")


# ---------------------------------------------------------------------------
# Windows of one split of one source
# ---------------------------------------------------------------------------


class Windows:
    """The windows of seq_len + 1 tokens over one split (tokens and doc_offsets: memmap-like views)."""

    def __init__(self, tokens, doc_offsets, seq_len: int, window_start: str = "stream"):
        if window_start not in WINDOW_STARTS:
            raise ValueError(f"window_start must be one of {WINDOW_STARTS}, got {window_start!r}")
        self.tokens, self.doc_offsets = tokens, doc_offsets
        self.seq_len, self.window_start = seq_len, window_start
        n_tokens = len(tokens)
        if window_start == "stream":
            self.n_windows = max(0, (n_tokens - 1) // seq_len)
        else:
            # Documents whose window of seq_len + 1 tokens fits before the end: a binary
            # search over the mapped offsets (O(log n_docs) reads, no copy).
            n_docs = max(0, len(doc_offsets) - 1)
            self.n_windows = bisect.bisect_right(doc_offsets, n_tokens - seq_len - 1, 0, n_docs)

    def starts(self, window_ids: np.ndarray) -> np.ndarray:
        """First token of each window (int64)."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        if self.window_start == "stream":
            return window_ids * self.seq_len
        return np.array([int(self.doc_offsets[int(w)]) for w in window_ids], dtype=np.int64)

    def rows(self, window_ids: np.ndarray) -> np.ndarray:
        """(len(window_ids), seq_len + 1) int64 token rows."""
        n = self.seq_len + 1
        out = np.empty((len(window_ids), n), dtype=np.int64)
        for i, start in enumerate(self.starts(window_ids)):
            out[i] = self.tokens[int(start) : int(start) + n]
        return out


@dataclass
class Batch:
    """One micro-batch: what the model and the per-source counters need."""

    inputs: torch.Tensor
    """(B, T) int64 token ids."""
    targets: torch.Tensor
    """(B, T) int64: inputs shifted by one."""
    doc_ids: torch.Tensor
    """(B, T) int64: a document number per input token, counted from the window start (the
    BOS tokens seen so far); tokens attend within their document when train.attention is
    document, and positions restart where doc_ids changes."""
    sources: torch.Tensor
    """(B,) int64: index of each row's source in the sampler's source list."""


def make_batch(rows: np.ndarray, sources: np.ndarray, bos_id: int) -> Batch:
    data = torch.from_numpy(rows)
    inputs = data[:, :-1]
    return Batch(inputs=inputs, targets=data[:, 1:], doc_ids=torch.cumsum(inputs == bos_id, dim=1),
                 sources=torch.from_numpy(np.asarray(sources, dtype=np.int64)))


# ---------------------------------------------------------------------------
# The mixture: global sample index → (source, within-source index)
# ---------------------------------------------------------------------------


class Mixture:
    """Deterministic weighted interleaving of sources: the Sainte-Laguë seat order.

    Source k's c-th sample (c = 0, 1, ...) is due at time (c + ½) / w_k; the samples
    of all sources, ordered by due time (ties: source order), are the global
    samples 0, 1, 2, ... So the c-th sample of k is window c of k's order, and
    after any N samples source k has C_k = N·w_k + e samples with
    |e| <= ½ + K·w_k/2 (K sources): the error never grows, so every share is
    within 1 sample per 1,000 of its weight once N >= 500·(K + 1), and every step
    gets its sources' shares to within a sample or two. Exact rational
    arithmetic: no drift at 10^12 samples; weight 0 never draws a sample.
    """

    def __init__(self, weights: list[float]):
        if not weights or any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all 0: {weights}")
        total = sum(Fraction(w) for w in weights)
        self.weights = [Fraction(w) / total for w in weights]  # exact: the float 0.1 is itself a rational
        self.drawn = [k for k, w in enumerate(self.weights) if w > 0]
        # Due times compared as integers: (c + ½)/w_k ordered like (2c + 1)·Π_{j≠k} n_j, where
        # w_j = n_j / D over a common denominator. Exact, and much faster than sorting Fractions.
        denominator = math.lcm(*(w.denominator for w in self.weights))
        numerators = {k: self.weights[k].numerator * (denominator // self.weights[k].denominator) for k in self.drawn}
        self._scale = {k: math.prod(n for j, n in numerators.items() if j != k) for k in self.drawn}

    def _due_before(self, k: int, time: Fraction) -> int:
        """Samples of source k due strictly before `time`: #{c >= 0 : (c + ½)/w_k < time}."""
        return max(0, math.ceil(time * self.weights[k] - Fraction(1, 2)))

    def _segment(self, first: int, end: int) -> tuple[int, list[int], list[tuple[int, int]]]:
        """Samples around [first, end): (global index of the first listed, per-source counts
        before it, [(source, within-source index), ...] in global order, covering [first, end))."""
        k_count = len(self.drawn)
        # Counts before time t sum to between t - K/2 and t + K/2, so these times bracket the range.
        lo, hi = Fraction(max(0, first - k_count)), Fraction(end + k_count)
        before = [self._due_before(k, lo) if k in self.drawn else 0 for k in range(len(self.weights))]
        due = [((2 * c + 1) * self._scale[k], k, c)
               for k in self.drawn for c in range(before[k], self._due_before(k, hi))]
        due.sort()
        return sum(before), before, [(k, c) for _, k, c in due]

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, within-source index) of each global sample, int64 arrays.

        Cost is O(K + max - min) for the samples' range: call it per step."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size == 0:
            return np.empty(samples.shape, np.int64), np.empty(samples.shape, np.int64)
        first = int(samples.min())
        start, _, order = self._segment(first, int(samples.max()) + 1)
        table = np.array(order, dtype=np.int64).reshape(-1, 2)
        rows = table[samples - start]
        return rows[..., 0], rows[..., 1]

    def counts(self, n_samples: int) -> list[int]:
        """Samples of each source among global samples 0 .. n_samples-1 (exact, O(K))."""
        start, counts, order = self._segment(n_samples, n_samples)
        for k, _ in order[: n_samples - start]:
            counts[k] += 1
        return counts


# ---------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------


@dataclass
class SourceSplit:
    """One source as the sampler sees it: its name, weight and a split's tokens/doc_offsets."""

    name: str
    weight: float
    tokens: object
    doc_offsets: object


class MixtureSampler:
    """Training windows drawn from weighted sources; see the module docstring."""

    def __init__(self, sources: list[SourceSplit], seq_len: int, seed: int, bos_id: int,
                 window_start: str = "stream"):
        self.names = [s.name for s in sources]
        self.windows = [Windows(s.tokens, s.doc_offsets, seq_len, window_start) for s in sources]
        self.seq_len, self.bos_id = seq_len, bos_id
        empty = [s.name for s, w in zip(sources, self.windows, strict=True) if s.weight > 0 and w.n_windows < 1]
        if empty:
            raise ValueError(f"no window of seq_len + 1 = {seq_len + 1} tokens in source(s) {', '.join(empty)}")
        self.mixture = Mixture([s.weight for s in sources])
        self.permutations = [SeededPermutation(seed_key(seed, "windows", s.name)) for s in sources]

    def window_ids(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window id) of global samples first .. first + count - 1."""
        sources, within = self.mixture.locate(np.arange(first, first + count, dtype=np.int64))
        windows = np.empty_like(within)
        for k in np.unique(sources):
            mask = sources == k
            n = self.windows[k].n_windows
            passes, positions = np.divmod(within[mask], n)
            windows[mask] = self.permutations[k](positions, n, passes)
        return sources, windows

    def batch(self, sources: np.ndarray, window_ids: np.ndarray) -> Batch:
        rows = np.empty((len(window_ids), self.seq_len + 1), dtype=np.int64)
        for k in np.unique(sources):
            mask = sources == k
            rows[mask] = self.windows[k].rows(window_ids[mask])
        return make_batch(rows, sources, self.bos_id)

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int, accumulation: int):
        """The accumulation micro-batches (Batch) that `rank` trains on at optimizer `step`."""
        per_rank = micro_batch * accumulation
        first = step * per_rank * world_size + rank * per_rank
        sources, ids = self.window_ids(first, per_rank)
        for m in range(accumulation):
            part = slice(m * micro_batch, (m + 1) * micro_batch)
            yield self.batch(sources[part], ids[part])

    def samples_per_source(self, n_samples: int) -> dict[str, int]:
        """How many of global samples 0 .. n_samples-1 each source supplies (exact, O(1))."""
        return dict(zip(self.names, self.mixture.counts(n_samples), strict=True))


def eval_windows(n_windows: int, count: int) -> np.ndarray:
    """The fixed validation windows: evenly spread over the split, the same at every evaluation."""
    count = min(count, n_windows)
    if count <= 1:
        return np.zeros(count, dtype=np.int64)
    # Integer arithmetic: exact for any n_windows (a float linspace is not beyond 2^53).
    return np.array([(i * (n_windows - 1) * 2 + count - 1) // (2 * (count - 1)) for i in range(count)], dtype=np.int64)


class WindowSampler:
    """One source read as a stream of windows: the interface the training loop and the evaluator
    used before sources existed (window ids, (inputs, targets) tuples). Same order as a
    one-source MixtureSampler."""

    def __init__(self, tokens, seq_len: int, seed: int, bos_id: int = 1):
        self.tokens, self.seq_len, self.seed, self.bos_id = tokens, seq_len, seed, bos_id
        self.windows = Windows(tokens, None, seq_len)
        self.n_windows = self.windows.n_windows
        self._sampler = None  # built on first use: a split too short to train on is the caller's error to report

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for these windows: two (B, seq_len) int64 tensors."""
        data = torch.from_numpy(self.windows.rows(window_ids))
        return data[:, :-1], data[:, 1:]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int, accumulation: int):
        if self._sampler is None:
            self._sampler = MixtureSampler([SourceSplit("data", 1.0, self.tokens, None)], self.seq_len, self.seed,
                                           self.bos_id)
        for batch in self._sampler.micro_batches(step, rank, world_size, micro_batch, accumulation):
            yield batch.inputs, batch.targets
