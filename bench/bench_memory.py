"""Peak memory and step time of a training step: the fused chunked loss, activation checkpointing.

Each variant trains in its own process (peak RSS is per process: `ru_maxrss`);
the two variants of a comparison run at the same time, one thread each, so
whatever else the machine is doing slows both alike, and they start from the
same seed on the same batches, so their losses can be compared step by step.

  loss           minimind2-small with a 65,536-token vocabulary, batch 8 × 512:
                 full logits (F.cross_entropy over logits.float(), as before) vs
                 Transformer(targets=...) (LinearCrossEntropy, chunked)
  checkpointing  minimind2 at seq 1024: activation checkpointing none vs blocks

    python bench/bench_memory.py loss --steps 4
    python bench/bench_memory.py checkpointing --steps 20 --batch 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import cpu_name, report

SETUPS = {
    "loss": {"preset": "minimind2-small", "vocab": 65536, "seq_len": 512, "batch": 8,
             "variants": ["full_logits", "chunked"]},
    "checkpointing": {"preset": "minimind2", "vocab": 6400, "seq_len": 1024, "batch": 4,
                      "variants": ["none", "blocks"]},
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(setup: dict, variant: str, steps: int, dtype_name: str) -> dict:
    from pipeline.architecture import build_config
    from pipeline.hardware import resolve_dtype
    from pipeline.model.transformer import Transformer

    torch.set_num_threads(1)
    dtype = resolve_dtype(dtype_name, torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(build_config(setup["preset"], setup["vocab"], {"max_seq_len": setup["seq_len"]}))
    model.checkpoint_blocks = variant == "blocks"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    g = torch.Generator().manual_seed(1)
    B, T, V = setup["batch"], setup["seq_len"], setup["vocab"]
    batches = [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g))
               for _ in range(steps)]
    baseline = rss_mib()

    losses, times = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        with autocast:
            if variant == "full_logits":
                logits, _ = model(x)
                loss = F.cross_entropy(logits.float().view(-1, V), y.reshape(-1), reduction="sum")
            else:
                loss, _ = model(x, targets=y)
        (loss / (B * T)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item() / (B * T))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"variant": variant, "rss_before_mib": round(baseline), "peak_rss_mib": round(peak),
            "step_s_median": round(statistics.median(times[1:] or times), 3), "step_s": [round(t, 3) for t in times],
            "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=list(SETUPS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, help="override the setup's batch")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup = dict(SETUPS[args.what], **({"batch": args.batch} if args.batch else {}))
    if args.child:
        print(json.dumps(child(setup, args.child, args.steps, args.dtype)))
        return

    argv = [sys.executable, __file__, args.what, "--steps", str(args.steps), "--dtype", args.dtype]
    if args.batch:
        argv += ["--batch", str(args.batch)]
    procs = {v: subprocess.Popen(argv + ["--child", v], stdout=subprocess.PIPE, text=True) for v in setup["variants"]}
    results = {}
    for v, p in procs.items():
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{v}: exit code {p.returncode}")
        results[v] = json.loads(out.strip().splitlines()[-1])
    a, b = (results[v] for v in setup["variants"])
    summary = {
        "cpu": cpu_name(), "torch": torch.__version__, "threads_per_variant": 1,
        **{k: setup[k] for k in ("preset", "vocab", "seq_len", "batch")}, "dtype": args.dtype, "steps": args.steps,
        "variants": results,
        "peak_rss_ratio": round(b["peak_rss_mib"] / a["peak_rss_mib"], 3),
        "peak_above_baseline_ratio": round((b["peak_rss_mib"] - b["rss_before_mib"])
                                          / (a["peak_rss_mib"] - a["rss_before_mib"]), 3),
        "speed_ratio": round(a["step_s_median"] / b["step_s_median"], 3),
        "max_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)),
    }
    report(summary, args.json)


if __name__ == "__main__":
    main()
