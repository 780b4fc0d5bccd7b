"""`mm train` speed with no trackers, against the code before trackers existed, in one run.

Three variants of the same training run alternate over several rounds, so the
machine's drift hits all alike:

  base        `mm train` of a git revision without trackers (--base; default: the parent of
              the commit that added pipeline/train/tracking.py), extracted with `git archive`
  none        this checkout, train.trackers empty
  tensorboard this checkout, streaming to TensorBoard (what a tracker costs per step)

Speed = the median of train_log.tsv's per-step tokens/s (it excludes evaluation,
checkpoints and start-up). Each variant runs as a subprocess with its own code on
PYTHONPATH, from the same token store.

    python bench/bench_tracking.py                  # tiny preset, seq 128, micro 8, 100 steps, 3 rounds
    python bench/bench_tracking.py --rounds 5 --steps 200
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def default_base() -> str:
    added = git("log", "--diff-filter=A", "--format=%H", "--", "pipeline/train/tracking.py").splitlines()
    if not added:
        sys.exit("no commit adds pipeline/train/tracking.py: pass --base REV")
    return git("rev-parse", f"{added[-1]}^")


def extract(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pipeline", "stages"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def make_data(work: Path, vocab_size: int) -> dict[str, Path]:
    """The demo chain on the embedded corpus: sample, tokenizer, store, tiny model.json (kept in --data-dir)."""
    mm = [sys.executable, "-m", "stages.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    work.mkdir(parents=True, exist_ok=True)
    steps = {"sample.jsonl": ["sample", "sample.jsonl"],
             "tokenizer": ["tokenizer", "sample.jsonl", "--out", "tokenizer", "--vocab-size", str(vocab_size)],
             "tokens.zarr": ["tokenize", "sample.jsonl", "--tokenizer", "tokenizer", "--out", "tokens.zarr"],
             "model.json": ["config", "--tokenizer", "tokenizer", "--out", "model.json"]}
    for made, args in steps.items():
        if not (work / made).exists():
            subprocess.run(mm + args, cwd=work, env=env, check=True, capture_output=True)
    return {"data": work / "tokens.zarr", "tokenizer": work / "tokenizer", "model": work / "model.json"}


def train(code: Path, paths: dict, out: Path, args, trackers: str | None) -> float:
    sets = [f"train.{s}" for s in (f"seq_len={args.seq_len}", f"micro_batch_size={args.micro_batch}",
                                   f"max_steps={args.steps}", "eval_interval=0", f"save_interval={args.steps}",
                                   f"log_interval={args.steps}", f"dtype={args.dtype}", f"out_dir={out}")]
    if trackers is not None:
        sets.append(f"train.trackers={trackers}")
    cmd = [sys.executable, "-m", "stages.cli", "train", "--data", str(paths["data"]), "--tokenizer",
           str(paths["tokenizer"]), "--model", str(paths["model"]), "--resume", "none", "--device", "cpu",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(code), "WANDB_MODE": "offline"}
    subprocess.run(cmd, cwd=out.parent, env=env, check=True, capture_output=True)
    lines = (out / "train_log.tsv").read_text().splitlines()
    column = lines[0].split("\t").index("tokens_per_s")
    return statistics.median(float(line.split("\t")[column]) for line in lines[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="git revision without trackers (default: before pipeline/train/tracking.py)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--vocab-size", type=int, default=6400)
    ap.add_argument("--data-dir", type=Path, help="keep the token store here and reuse it (default: a temp dir)")
    args = ap.parse_args()
    base = args.base or default_base()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {"base": (extract(base, work / "base"), None), "none": (REPO, ""),
                    "tensorboard": (REPO, "tensorboard")}
        paths = make_data(args.data_dir or work / "data", args.vocab_size)
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (code, trackers) in variants.items():
                speeds[name].append(train(code, paths, work / f"{name}-{r}", args, trackers))
            print(f"round {r + 1}: " + "  ".join(f"{n} {s[-1]:,.0f} tok/s" for n, s in speeds.items()), flush=True)
    median = {name: statistics.median(s) for name, s in speeds.items()}
    print(f"base {base[:10]} vs this checkout ({git('rev-parse', '--short', 'HEAD')}), median per-step tokens/s "
          f"over {args.rounds} rounds of {args.steps} steps:")
    for name in variants:
        print(f"  {name:12s} {median[name]:10,.0f}   ratio to base {median[name] / median['base']:.3f}")


if __name__ == "__main__":
    main()
