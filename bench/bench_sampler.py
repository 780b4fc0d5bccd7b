"""The sampler's cost does not grow with the store: time to build, time per step, peak memory.

Three sources whose tokens and document offsets are synthetic views (computed
on read, no storage), from 10^6 to 10^12 tokens per source, in both window
modes. For each size: the time to build the sampler, the mean time to produce
one step's batches (global batch 64 of seq 256) at steps 0 and 10^9, and the
peak Python heap traced while doing so (tracemalloc). The windows of the big
source number up to 4·10^9 (stream) or 10^9 (document).

    python bench/bench_sampler.py            # prints a markdown table
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

from pipeline.data.sampler import MixtureSampler, SourceSplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import SyntheticOffsets, SyntheticTokens  # noqa: E402  (tests/synthetic.py: shared with the tests)


def measure(n_tokens: int, window_start: str, seq_len: int, micro: int, accum: int, steps: int) -> dict:
    sources = [SourceSplit(name, w, SyntheticTokens(n), SyntheticOffsets(n))
               for name, w, n in (("big", 0.6, n_tokens), ("mid", 0.3, max(n_tokens // 10, 10**5)),
                                  ("small", 0.1, 10**5))]
    tracemalloc.start()
    t0 = time.perf_counter()
    sampler = MixtureSampler(sources, seq_len, seed=1, window_start=window_start)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in (0, 10**9):
        for step in range(start, start + steps):
            for _ in sampler.micro_batches(step, 0, 1, micro, accum):
                pass
    per_step = (time.perf_counter() - t0) / (2 * steps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"windows": sampler.windows[0].n_windows, "build_s": build, "step_ms": per_step * 1e3,
            "peak_kib": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print("| window_start | tokens (big source) | windows (big source) | build | per step (64 × 257 tokens) "
          "| peak heap |")
    print("|---|---:|---:|---:|---:|---:|")
    for window_start in ("stream", "document"):
        for exp in (6, 8, 10, 12):
            r = measure(10**exp, window_start, args.seq_len, args.micro_batch, args.accumulation, args.steps)
            print(f"| {window_start} | 10^{exp} | {r['windows']:,} | {r['build_s'] * 1e3:.2f} ms | "
                  f"{r['step_ms']:.2f} ms | {r['peak_kib']:.0f} KiB |", flush=True)


if __name__ == "__main__":
    main()
