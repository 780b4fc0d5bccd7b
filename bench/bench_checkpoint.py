"""Checkpoint save time: what `mm train` does at a save, before and after the one-pass hash.

A preemption (SLURM: SIGTERM, then SIGKILL 30 s later by default) stops the run at
the next step boundary and saves; the save has to fit in that grace period. This
builds the model of a preset, gives AdamW its state with one step, gathers the
full state as train.py does, then times, alternating in one run:

    before  the previous save path: torch.isfinite over every tensor (model and
            optimizer), then save_checkpoint hashing a bytes copy of each tensor
    after   save_checkpoint(require_finite=True): hash and finiteness check in one
            pass over each tensor (no copy), then the write

Both write the same file (torch.save, fsync, rename, ckpt.pth link, retention).

    python bench/bench_checkpoint.py                         # minimind2 and minimind3, vocab 6400
    python bench/bench_checkpoint.py --preset minimind2 --rounds 3 --out /scratch/ckpt-bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from pipeline.architecture import build_config, count_params
from pipeline.checkpoint import format as checkpoint
from pipeline.model.transformer import Transformer
from pipeline.train.distributed import World, full_state


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


# --------------------------------------------------------------------------- the previous save path


def isfinite_all(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(isfinite_all(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(isfinite_all(v) for v in state)
    return True


def copy_digest(obj, nonfinite=None) -> str:
    h = hashlib.sha256()
    _copy_feed(h, obj)
    return h.hexdigest()


def _copy_feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _copy_feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _copy_feed(h, item)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


# --------------------------------------------------------------------------- timing


def bench(preset: str, vocab: int, out: Path, rounds: int) -> dict:
    config = build_config(preset, vocab)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # AdamW's exp_avg / exp_avg_sq exist from here on
    t0 = time.perf_counter()
    model_state, optimizer_state = full_state(model, optimizer, World())
    gather = time.perf_counter() - t0
    state = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 1, "model": model_state,
             "optimizer": optimizer_state, "scaler": None, "rng": {"torch": torch.get_rng_state()},
             "model_config": {}, "train_config": {}, "data": {}, "tokenizer": {}, "metrics": {}}
    keys = {k: state[k] for k in checkpoint.CHECKPOINT_KEYS}
    assert copy_digest(keys) == checkpoint.state_digest(keys)  # the same checksum, so old files still verify
    times: dict[str, list[float]] = {k: [] for k in ("before: isfinite", "before: hash (copy)", "before: save",
                                                     "after: hash+check", "after: save", "write")}
    one_pass = checkpoint.state_digest
    for _ in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        assert isfinite_all(model_state) and isfinite_all(optimizer_state)
        t1 = time.perf_counter()
        checkpoint.state_digest = copy_digest  # save_checkpoint looks it up at call time
        try:
            checkpoint.save_checkpoint(state, out, keep_last=1)
        finally:
            checkpoint.state_digest = one_pass
        t2 = time.perf_counter()
        copy_digest(keys)
        t3 = time.perf_counter()
        times["before: isfinite"].append(t1 - t0)
        times["before: hash (copy)"].append(t3 - t2)
        times["before: save"].append(t2 - t0)

        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        path = checkpoint.save_checkpoint(state, out, keep_last=1, require_finite=True)
        t1 = time.perf_counter()
        one_pass(keys, [])
        t2 = time.perf_counter()
        times["after: save"].append(t1 - t0)
        times["after: hash+check"].append(t2 - t1)
        times["write"].append((t1 - t0) - (t2 - t1))
        size = path.stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return {"preset": preset, "params_M": round(count_params(config)["total"] / 1e6, 1),
            "file_MiB": round(size / 2**20), "gather": round(gather, 2),
            **{k: round(min(v), 2) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="repeatable (default: minimind2 and minimind3)")
    ap.add_argument("--vocab", type=int, default=6400, help="vocabulary size (MiniMind's tokenizer: 6400)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mm-bench-checkpoint"), help="directory to save into")
    ap.add_argument("--rounds", type=int, default=3, help="saves per preset and path; the fastest is reported")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"writing to {args.out}", flush=True)
    for preset in args.preset or ["minimind2", "minimind3"]:
        print(json.dumps(bench(preset, args.vocab, args.out, args.rounds)), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
