"""The data order, in process: permutations, the mixture of sources, windows, and their scale.

What is shown:
  permutation     the Feistel permutation is a bijection of [0, n) for small and odd n, differs per
                  pass and per seed, and permutes positions near 2^63 in microseconds
  mixture         for every N, every source's count among the first N samples is within
                  ½ + K·w/2 samples of N·w (K sources), so its share is within 0.1 percentage
                  points from N = 1000 on, for round and awkward weights; within-source indices
                  are 0, 1, 2, ... in order; weight 0 is never drawn; 10^12 samples out it is exact
  order           the global samples of a step do not depend on the process count or the
                  micro-batch split, with window_start stream and document; the sampler holds no
                  state, so a fresh one (a resumed run) continues the identical order
  windows         stream windows start at multiples of seq_len; document windows at a BOS;
                  doc_ids count the BOS tokens of the window
  scale           a source of 10^12 tokens and 10^9 documents (synthetic views) opens and serves
                  batches in milliseconds, and the sampler's memory does not grow with its size
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch
from synthetic import SyntheticOffsets, SyntheticTokens

from pipeline.data.sampler import Mixture, MixtureSampler, SourceSplit, Windows, eval_windows
from pipeline.data.shuffle import SeededPermutation, seed_key

BOS, EOS = 1, 2


def packed(n_docs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of random length packed as BOS + ids + EOS: (tokens uint16, doc_offsets int64)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, n_docs)
    docs = [np.concatenate([[BOS], rng.integers(3, 1000, n), [EOS]]) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return np.concatenate(docs).astype(np.uint16), offsets


@pytest.fixture(scope="module")
def sources() -> list[SourceSplit]:
    return [SourceSplit("web", 0.6, *packed(400, 1)), SourceSplit("code", 0.3, *packed(60, 2)),
            SourceSplit("zh", 0.1, *packed(9, 3))]


# ---------------------------------------------------------------------------
# Permutation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4099])
def test_permutation_is_a_bijection(n):
    perm = SeededPermutation(seed_key(1337, "web"))
    for pass_ in (0, 1, 12345):
        out = perm(np.arange(n), n, np.full(n, pass_))
        assert sorted(out.tolist()) == list(range(n))


def test_permutation_depends_on_pass_and_seed():
    n = 1000
    a = SeededPermutation(seed_key(1, "web"))(np.arange(n), n, np.zeros(n))
    assert not np.array_equal(a, SeededPermutation(seed_key(1, "web"))(np.arange(n), n, np.ones(n)))
    assert not np.array_equal(a, SeededPermutation(seed_key(2, "web"))(np.arange(n), n, np.zeros(n)))
    assert not np.array_equal(a, np.arange(n))
    # A seeded permutation is also a fair one: the first tenth lands evenly over the range.
    assert np.histogram(a[:100], bins=4, range=(0, n))[0].min() >= 10


def test_permutation_of_huge_ranges_is_instant():
    perm = SeededPermutation(seed_key(7, "web"))
    for n in (10**12, 2**63 - 1):
        t0 = time.perf_counter()
        out = perm(np.arange(64) * (n // 64), n, np.arange(64))
        assert time.perf_counter() - t0 < 0.5
        assert out.dtype == np.int64 and out.min() >= 0 and out.max() < n and len(set(out.tolist())) == 64


# ---------------------------------------------------------------------------
# Mixture
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [1, 1, 1], [0.0004, 1.0], [5, 0, 2], [0.05, 0.2, 0.25, 0.5]])
def test_mixture_shares_track_the_weights(weights):
    mix = Mixture(weights)
    share = np.array(weights, dtype=float) / sum(weights)
    n = 20_017
    sources, within = mix.locate(np.arange(n))
    onehot = sources[:, None] == np.arange(len(weights))[None, :]
    counts = np.cumsum(onehot, axis=0)  # counts[i, k]: samples of k among 0..i
    error = np.abs(counts - np.arange(1, n + 1)[:, None] * share)
    bound = 0.5 + len(weights) * share / 2  # per source, at every N
    assert (error <= bound + 1e-9).all(), f"{error.max(axis=0)} samples off, bound {bound}"
    for k in range(len(weights)):  # within-source indices: 0, 1, 2, ... each once, in order
        assert within[sources == k].tolist() == list(range(int(counts[-1, k])))
    for m in (0, 1, 999, 12345, n):
        assert mix.counts(m) == (counts[m - 1].tolist() if m else [0] * len(weights))
    s2, w2 = mix.locate(np.arange(777, 800))  # any range gives the same answer as the whole
    assert np.array_equal(s2, sources[777:800]) and np.array_equal(w2, within[777:800])
    if 0 in weights:
        assert not (sources == weights.index(0)).any()


def test_mixture_far_out_is_exact_and_fast():
    mix = Mixture([0.6, 0.3, 0.1])
    n = 10**12
    t0 = time.perf_counter()
    assert mix.counts(n) == [6 * 10**11, 3 * 10**11, 10**11]
    sources, within = mix.locate(np.arange(n, n + 64))
    assert time.perf_counter() - t0 < 0.5
    assert within.dtype == np.int64 and within.min() > 2**32
    assert np.bincount(sources, minlength=3).tolist() in ([38, 19, 7], [39, 19, 6], [38, 20, 6], [39, 18, 7])


def test_bad_weights_are_refused():
    for weights in ([], [0, 0], [-1, 2], [float("nan")]):
        with pytest.raises(ValueError):
            Mixture(weights)


# ---------------------------------------------------------------------------
# Order: process count, micro-batches, resume
# ---------------------------------------------------------------------------


def global_step(sampler: MixtureSampler, step: int, world: int, micro: int, accum: int) -> torch.Tensor:
    rows = [torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
            for r in range(world) for b in sampler.micro_batches(step, r, world, micro, accum)]
    return torch.cat(rows)


@pytest.mark.parametrize("window_start", ["stream", "document"])
def test_order_is_independent_of_processes_and_micro_batches(sources, window_start):
    sampler = MixtureSampler(sources, seq_len=16, seed=11, window_start=window_start)
    for step in (0, 1, 7, 40):  # 40 · 16 samples: past the first block and over the small sources' passes
        want = global_step(sampler, step, 1, 16, 1)
        for world, micro, accum in ((1, 4, 4), (2, 8, 1), (2, 2, 4), (4, 4, 1)):
            assert torch.equal(global_step(sampler, step, world, micro, accum), want), (step, world, micro, accum)


@pytest.mark.parametrize("window_start", ["stream", "document"])
def test_a_fresh_sampler_continues_the_same_order(sources, window_start):
    """Resume: the data position is the step; the sampler keeps no state between steps."""
    used = MixtureSampler(sources, seq_len=16, seed=11, window_start=window_start)
    straight = [global_step(used, s, 1, 8, 2) for s in range(30)]
    fresh = MixtureSampler(sources, seq_len=16, seed=11, window_start=window_start)
    for s in (29, 15, 16):
        assert torch.equal(global_step(fresh, s, 2, 4, 2), straight[s])
    other_seed = MixtureSampler(sources, seq_len=16, seed=12, window_start=window_start)
    assert not torch.equal(global_step(other_seed, 0, 1, 8, 2), straight[0])


@pytest.mark.parametrize("window_start", ["stream", "document"])
def test_every_window_once_per_pass(sources, window_start):
    sampler = MixtureSampler(sources, seq_len=16, seed=5, window_start=window_start)
    n = sampler.windows[2].n_windows  # the small source: many passes in 3 blocks
    src, win = sampler.window_ids(0, 3000)
    visits = win[src == 2]
    assert len(visits) >= 3 * n
    for p in range(len(visits) // n):
        assert sorted(visits[p * n : (p + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(visits[:n], visits[n : 2 * n])  # a fresh order each pass


# ---------------------------------------------------------------------------
# Windows and batches
# ---------------------------------------------------------------------------


def test_windows_start_where_the_mode_says(sources):
    tokens, offsets = sources[0].tokens, sources[0].doc_offsets
    stream = Windows(tokens, offsets, 16, "stream")
    assert stream.n_windows == (len(tokens) - 1) // 16
    assert np.array_equal(stream.rows(np.array([0, 5]))[1], tokens[80:97])
    doc = Windows(tokens, offsets, 16, "document")
    last = doc.n_windows - 1
    assert offsets[last] + 17 <= len(tokens) < offsets[last + 1] + 17  # every document that fits
    rows = doc.rows(np.arange(doc.n_windows))
    assert (rows[:, 0] == BOS).all()
    assert np.array_equal(rows[3], tokens[offsets[3] : offsets[3] + 17])

    sampler = MixtureSampler(sources, seq_len=16, seed=5, window_start="document")
    batch = next(sampler.micro_batches(0, 0, 1, 8, 1))
    assert batch.inputs.shape == batch.doc_ids.shape == (8, 16) and batch.sources.shape == (8,)
    assert torch.equal(batch.doc_ids, torch.cumsum(batch.inputs == BOS, dim=1))
    assert (batch.doc_ids[:, 0] == 1).all() and torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def test_eval_windows_are_evenly_spread_and_exact():
    assert eval_windows(10, 3).tolist() == [0, 5, 9]
    assert eval_windows(2, 8).tolist() == [0, 1]
    huge = eval_windows(10**15 + 1, 5)
    assert huge.tolist() == [0, 25 * 10**13, 5 * 10**14, 75 * 10**13, 10**15]


# ---------------------------------------------------------------------------
# Scale: O(1) memory and time whatever the number of tokens and windows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("window_start", ["stream", "document"])
def test_sampler_memory_does_not_grow_with_the_store(window_start):
    peaks = {}
    for n_tokens in (10**6, 10**12):
        src = [SourceSplit("big", 0.7, SyntheticTokens(n_tokens), SyntheticOffsets(n_tokens)),
               SourceSplit("small", 0.3, SyntheticTokens(10**5), SyntheticOffsets(10**5))]
        tracemalloc.start()
        t0 = time.perf_counter()
        sampler = MixtureSampler(src, seq_len=256, seed=1, window_start=window_start)
        batches = [b for step in (0, 10**7) for b in sampler.micro_batches(step, 0, 1, 8, 2)]
        elapsed = time.perf_counter() - t0
        peaks[n_tokens] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 2.0, f"{n_tokens} tokens: {elapsed:.2f} s"
        if window_start == "document":
            assert all((b.inputs[:, 0] == BOS).all() for b in batches)
    assert peaks[10**12] < 2 * peaks[10**6] + 100_000, peaks
