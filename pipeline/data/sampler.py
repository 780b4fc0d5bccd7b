"""Which token windows each rank reads at each step: the data order.

A sample is a window of seq_len + 1 tokens of one source's packed stream
(inputs and next-token targets). Global sample g is found in three steps, each O(1) in the store's size:

  1. source: the schedule (pipeline/data/mixture.py) maps g to a source k and to
     j, the within-source sample index. Inside a segment of the schedule
     (weights from a start sample on) it is the Sainte-Laguë seat order:
     source k's c-th sample of the segment is due at time (c + ½)/w_k, and the
     samples are all sources' by due time; j is c plus what earlier segments
     drew from k. After any N samples of a segment every source holds N·w_k of
     them to within ½ + K·w_k/2 samples (K sources), in exact rational
     arithmetic: the error never grows, and each step mixes the sources in
     proportion. One segment unless data.phases or a resume changes weights.
  2. window: pass j // n_k over source k visits its n_k windows in a seeded
     permutation (pipeline/data/shuffle.py: a Feistel bijection, never
     materialised), seeded by (seed, source name, pass). A small source
     repeats with a fresh order each pass, a large one is never exhausted.
  3. tokens: `train.window_start: stream` puts window w at token w·seq_len;
     `document` puts it at the first token (BOS) of document w, and the window
     packs the documents that follow. Each token's document number comes
     from the store's doc_offsets (`document_ids`), never from token values.

Optimizer step s consumes global samples [s·G, (s+1)·G), G = micro_batch ·
accumulation · world_size; rank r takes the r-th contiguous slice of those G
and splits it into micro-batches. So the samples of a step, and the loss
averaged over them, do not depend on the number of processes, and the data
position is a function of (seed, schedule, step): resuming needs no loader
state beyond the schedule's segments, which the checkpoint records. Nothing
here grows with the store: memory and time per lookup are O(1) in the
number of tokens, documents and windows, and every index is int64.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.mixture import Mixture, Schedule, Segment
from pipeline.data.shuffle import SeededPermutation, seed_key

__all__ = ["Batch", "Mixture", "MixtureSampler", "Schedule", "Segment", "SourceSplit", "WindowSampler", "Windows",
           "eval_windows", "make_batch"]  # Mixture, Schedule, Segment: pipeline/data/mixture.py's, used with these

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

    def doc_ids(self, window_ids: np.ndarray) -> np.ndarray:
        """(len(window_ids), seq_len) int64: the document number of each input token (document_ids)."""
        return document_ids(self.doc_offsets, self.starts(window_ids), self.seq_len)


def document_ids(doc_offsets, starts: np.ndarray, width: int) -> np.ndarray:
    """(len(starts), width) int64: for the token at starts[i] + t, how many documents start in
    [starts[i], starts[i] + t]. Read from the store's doc_offsets, never from token values, so a
    special-token string inside a document's text (`<|im_start|>` is BOS's text) does not split it,
    and a tokenizer whose BOS is its EOS works alike. Equal to counting BOS tokens from the window
    start when no text holds one. Without doc_offsets every row is one document (zeros).

    A window holds at most `width` document starts: two binary searches over the mapped offsets
    (O(log n_docs) reads) and one small slice per row, whatever the store's size."""
    out = np.zeros((len(starts), width), dtype=np.int64)
    if doc_offsets is None:
        return out
    n = len(doc_offsets)
    for i, start in enumerate(np.asarray(starts, dtype=np.int64).tolist()):
        lo = bisect.bisect_left(doc_offsets, start, 0, n)
        hi = bisect.bisect_left(doc_offsets, start + width, lo, min(n, lo + width + 1))
        if hi > lo:
            inside = np.fromiter((doc_offsets[j] for j in range(lo, hi)), np.int64, hi - lo)  # the window's starts
            out[i] = np.searchsorted(inside, np.arange(start, start + width, dtype=np.int64), side="right")
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
    documents of the store's doc_offsets that start at or before it: `document_ids`); tokens attend
    within their document when train.attention is document, and positions restart where doc_ids
    changes."""
    sources: torch.Tensor
    """(B,) int64: index of each row's source in the sampler's source list."""


def make_batch(rows: np.ndarray, sources: np.ndarray, doc_ids: np.ndarray) -> Batch:
    data = torch.from_numpy(rows)
    return Batch(inputs=data[:, :-1], targets=data[:, 1:], doc_ids=torch.from_numpy(doc_ids),
                 sources=torch.from_numpy(np.asarray(sources, dtype=np.int64)))


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
    """Training windows drawn from weighted sources; see the module docstring.

    The weights come from a `Schedule` (pipeline/data/mixture.py): by default one segment of the
    sources' own weights; `set_schedule` installs phases or a resume's history. `sources` are the
    opened ones: a schedule may name a source that only earlier segments drew from (counted, never
    read again)."""

    def __init__(self, sources: list[SourceSplit], seq_len: int, seed: int, window_start: str = "stream"):
        self.names = [s.name for s in sources]
        self.windows = [Windows(s.tokens, s.doc_offsets, seq_len, window_start) for s in sources]
        self.seq_len = seq_len
        self.permutations = [SeededPermutation(seed_key(seed, "windows", s.name)) for s in sources]
        self.set_schedule(Schedule([Segment(0, tuple((s.name, s.weight) for s in sources))]))

    def set_schedule(self, schedule: Schedule) -> None:
        """Draw by this schedule from now on (ValueError: a drawn source is not open or has no window)."""
        drawn = {n for seg in schedule.segments for n, w in seg.weights if w > 0}
        empty = [n for n, w in zip(self.names, self.windows, strict=True) if n in drawn and w.n_windows < 1]
        if empty:
            raise ValueError(f"no window of seq_len + 1 = {self.seq_len + 1} tokens in source(s) {', '.join(empty)}")
        self.schedule = schedule
        # schedule.names index → self.names index (-1: not open, only counted)
        self._open = np.array([self.names.index(n) if n in self.names else -1 for n in schedule.names], np.int64)

    def window_ids(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index in self.names, window id) of global samples first .. first + count - 1."""
        named, within = self.schedule.locate(np.arange(first, first + count, dtype=np.int64))
        sources = self._open[named] if len(named) else named
        if (sources < 0).any():
            missing = sorted({self.schedule.names[i] for i in named[sources < 0].tolist()})
            raise ValueError(f"the schedule draws from source(s) {', '.join(missing)}, which are not open")
        windows = np.empty_like(within)
        for k in np.unique(sources):
            mask = sources == k
            n = self.windows[k].n_windows
            passes, positions = np.divmod(within[mask], n)
            windows[mask] = self.permutations[k](positions, n, passes)
        return sources, windows

    def batch(self, sources: np.ndarray, window_ids: np.ndarray) -> Batch:
        rows = np.empty((len(window_ids), self.seq_len + 1), dtype=np.int64)
        doc_ids = np.empty((len(window_ids), self.seq_len), dtype=np.int64)
        for k in np.unique(sources):
            mask = sources == k
            rows[mask] = self.windows[k].rows(window_ids[mask])
            doc_ids[mask] = self.windows[k].doc_ids(window_ids[mask])
        return make_batch(rows, sources, doc_ids)

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int, accumulation: int):
        """The accumulation micro-batches (Batch) that `rank` trains on at optimizer `step`."""
        per_rank = micro_batch * accumulation
        first = step * per_rank * world_size + rank * per_rank
        sources, ids = self.window_ids(first, per_rank)
        record_windows(step, first, [self.names[k] for k in sources.tolist()], ids)
        for m in range(accumulation):
            part = slice(m * micro_batch, (m + 1) * micro_batch)
            yield self.batch(sources[part], ids[part])

    def samples_per_source(self, n_samples: int) -> dict[str, int]:
        """How many of global samples 0 .. n_samples-1 each source supplied (exact, O(segments · K)):
        the open sources first, then any that only earlier segments drew from."""
        counts = self.schedule.counts(n_samples)
        return {n: counts.get(n, 0) for n in self.names} | counts


def record_windows(step: int, first: int, names: list[str], window_ids: np.ndarray) -> None:
    """For the tests: with MM_RECORD_WINDOWS=PATH, append one line per sample handed to training
    (step, global sample, source, window id), so what a run trained on can be counted apart from
    the arithmetic that reports it (Schedule.counts). One write per call: ranks may share the file."""
    path = os.environ.get("MM_RECORD_WINDOWS")
    if path:
        lines = "".join(f"{step}\t{first + i}\t{n}\t{w}\n" for i, (n, w) in enumerate(zip(names, window_ids.tolist(),
                                                                                           strict=True)))
        with open(path, "a") as f:
            f.write(lines)


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

    def __init__(self, tokens, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows = Windows(tokens, None, seq_len)
        self.n_windows = self.windows.n_windows
        self._sampler = None  # built on first use: a split too short to train on is the caller's error to report

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for these windows: two (B, seq_len) int64 tensors."""
        data = torch.from_numpy(self.windows.rows(window_ids))
        return data[:, :-1], data[:, 1:]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int, accumulation: int):
        if self._sampler is None:
            self._sampler = MixtureSampler([SourceSplit("data", 1.0, self.tokens, None)], self.seq_len, self.seed)
        for batch in self._sampler.micro_batches(step, rank, world_size, micro_batch, accumulation):
            yield batch.inputs, batch.targets
