"""Which source each global sample comes from: the Sainte-Laguë mixture and the weight schedule.

`Mixture` interleaves sources by weight in exact proportion. A `Schedule` is a
list of segments, each (first global sample, weights): the mixture restarts at
every segment boundary with the segment's weights, and each source's
within-source sample index carries on from what the earlier segments drew
from it. So a source never re-reads windows it has already trained on and
never skips any when its weight changes, and the whole data position stays a
pure function of (seed, segments, global sample):

    schedule = Schedule([Segment(0, (("web", 0.9), ("books", 0.1))),
                         Segment(8000, (("web", 0.3), ("books", 0.7)))])
    schedule.locate(np.arange(8000, 8016))   # (source index in schedule.names, within-source index)
    schedule.counts(10_000)                   # {"web": ..., "books": ...}: exact, O(segments · K)

Segments come from `data.phases` (`phase_segments`) and from resumes that change
the weights (`resumed`): the checkpoint records the segments of its run.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline.errors import UserError


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
# Segments and the schedule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """From global sample `start` on, draw by `weights`: ((source name, weight), ...) in source order."""

    start: int
    weights: tuple[tuple[str, float], ...]

    @property
    def mix(self) -> tuple[tuple[str, str], ...]:
        """The drawn sources and their normalised weights (15 significant digits): what decides the order."""
        total = sum(w for _, w in self.weights)
        return tuple((n, f"{w / total:.15g}") for n, w in self.weights if w > 0)

    def record(self) -> dict:
        """Plain values for a checkpoint (torch.load(weights_only=True) reads them back)."""
        return {"start": self.start, "weights": {n: float(w) for n, w in self.weights}}

    @classmethod
    def from_record(cls, record: dict) -> Segment:
        return cls(int(record["start"]), tuple((str(n), float(w)) for n, w in record["weights"].items()))


class Schedule:
    """Segments in order, the first at sample 0; see the module docstring."""

    def __init__(self, segments: list[Segment]):
        starts = [s.start for s in segments]
        if not segments or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"segments must start at sample 0 and increase: {starts}")
        self.segments, self.starts = list(segments), starts
        self.names = list(dict.fromkeys(n for s in segments for n, w in s.weights if w > 0))
        self.mixtures = [Mixture([w for _, w in s.weights]) for s in segments]
        # offsets[i][name]: samples drawn from `name` before segment i starts.
        self.offsets = [dict.fromkeys(self.names, 0)]
        for i in range(len(segments) - 1):
            drawn = self._local_counts(i, starts[i + 1] - starts[i])
            self.offsets.append({n: self.offsets[i][n] + drawn.get(n, 0) for n in self.names})

    def _local_counts(self, i: int, n: int) -> dict[str, int]:
        names = [name for name, _ in self.segments[i].weights]
        return dict(zip(names, self.mixtures[i].counts(n), strict=True))

    def counts(self, n_samples: int) -> dict[str, int]:
        """Samples of each source among global samples 0 .. n_samples-1 (exact)."""
        i = max(0, bisect.bisect_right(self.starts, n_samples) - 1)
        drawn = self._local_counts(i, n_samples - self.starts[i])
        return {n: self.offsets[i][n] + drawn.get(n, 0) for n in self.names}

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into self.names, within-source index) of each global sample: int64 arrays."""
        samples = np.asarray(samples, dtype=np.int64)
        source, within = np.empty_like(samples), np.empty_like(samples)
        segment = np.searchsorted(np.asarray(self.starts, dtype=np.int64), samples, side="right") - 1
        for i in np.unique(segment).tolist():
            mask = segment == i
            k, c = self.mixtures[i].locate(samples[mask] - self.starts[i])
            names = [name for name, _ in self.segments[i].weights]
            index = np.array([self.names.index(n) if w > 0 else -1 for n, w in self.segments[i].weights],
                             dtype=np.int64)  # only drawn sources (w > 0) are ever located
            source[mask] = index[k]
            within[mask] = c + np.array([self.offsets[i].get(n, 0) for n in names], dtype=np.int64)[k]
        return source, within

    def records(self) -> list[dict]:
        return [s.record() for s in self.segments]

    def key(self) -> str:
        """The schedule in words, compared on resume: 'a=0.9 b=0.1; from sample 800: a=0.3 b=0.7'."""
        parts = []
        for s in self.segments:
            mix = " ".join(f"{n}={w}" for n, w in s.mix)
            parts.append(mix if s.start == 0 else f"from sample {s.start}: {mix}")
        return "; ".join(parts)


def resumed(history: list[Segment], plan: list[Segment], at: int) -> list[Segment]:
    """The segments of a run resumed at global sample `at`: the checkpoint's segments before `at`
    (what was trained), then the plan's from `at` on. A plan whose mix at `at` is the one the
    checkpoint's run had there continues that run's segment (no restart, also when that segment
    starts exactly at `at`, so an unchanged resume is exact); another mix starts a segment at `at`,
    and each source carries on from its consumed position."""
    if at <= 0 or not history:
        return list(plan)
    running = [s for s in history if s.start <= at]
    current = [s for s in plan if s.start <= at][-1]
    if current.mix != running[-1].mix:
        running = [s for s in running if s.start < at] + [Segment(at, current.weights)]
    return running + [s for s in plan if s.start > at]


def phase_segments(phases: list[dict], names: list[str], total_steps: int, global_batch: int) -> list[Segment]:
    """data.phases → segments. Phase i runs from the previous phase's end (step 0 for the first) to
    its `until`: a fraction of total_steps (a float ≤ 1, rounded to the nearest step) or a step
    (an integer > 1). The last phase's weights also cover any steps after its `until`. Phases that
    round to no step are left out; adjacent phases with the same mix are one segment."""
    segments, begin = [], 0
    for i, phase in enumerate(phases):
        until = phase["until"]
        end = until if isinstance(until, int) and until > 1 else math.floor(Fraction(str(until)) * total_steps
                                                                            + Fraction(1, 2))
        if end < begin:
            raise UserError(f"data.phases[{i}].until: ends at step {end}, before the previous phase's end "
                            f"(step {begin}) in a run of {total_steps} steps")
        segment = Segment(begin * global_batch, tuple((n, float(phase["weights"].get(n, 0))) for n in names))
        if end > begin or i == len(phases) - 1:
            if segments and segments[-1].mix == segment.mix:
                pass
            elif segments and segments[-1].start == segment.start:
                segments[-1] = segment
            else:
                segments.append(segment)
        begin = end
    return segments
