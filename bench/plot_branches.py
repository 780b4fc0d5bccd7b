"""docs/decay_branches.png: one warmup-stable-decay run and three decay branches taken off its stable phase.

    python bench/plot_branches.py --data data/tokens.zarr --tokenizer data/tokenizer --model data/model.json

Runs `mm train` four times with the command of docs/training.md ("Decay branches"): a long
wsd run (decay over its last LONG_DECAY steps) saving every BRANCH_EVERY steps, then from
each of its stable checkpoints a branch into its own out_dir that decays over its last
BRANCH_DECAY steps. Plots validation loss and learning rate against the step, and prints
each run's final validation loss.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LONG, LONG_DECAY, BRANCH_EVERY, BRANCH_DECAY = 600, 120, 150, 60
RUN = ["seq_len=64", "micro_batch_size=8", "dtype=fp32", "lr=3e-3", "min_lr=3e-4", "warmup_steps=30",
       "schedule=wsd", "decay_shape=1-sqrt", "eval_interval=30", "eval_batches=8", "log_interval=100",
       f"save_interval={BRANCH_EVERY}", "keep_last=10", "seed=1337"]


def mm_train(args, out: Path, *sets: str, resume: str = "auto") -> None:
    cmd = [sys.executable, "-m", "stages.cli", "train", "--data", args.data, "--tokenizer", args.tokenizer,
           "--model", args.model, "--device", "cpu", "--params", os.devnull, "--resume", resume,
           "--set", f"train.out_dir={out}"]
    for s in [*RUN, *sets]:
        cmd += ["--set", f"train.{s}"]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def read(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, map(float, line.split("\t")), strict=True)) for line in lines[1:]]


def plot(runs: dict[str, tuple[Path, int]], png: Path) -> None:
    """Validation loss and learning rate; a branch from the step it branched at (before it, it is the long run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for label, (out, start) in runs.items():
        val = [r for r in read(out / "val_log.tsv") if r["step"] >= start]
        train = [r for r in read(out / "train_log.tsv") if r["step"] >= start]
        style = {"color": "black", "linewidth": 1.5} if label.startswith("long") else {"linewidth": 1.2}
        line, = top.plot([r["step"] for r in val], [r["val_loss"] for r in val], label=label, **style)
        bottom.plot([r["step"] for r in train], [r["lr"] for r in train], color=line.get_color(),
                    linewidth=style["linewidth"])
    top.set_ylabel("validation loss (nats/token)")
    top.grid(alpha=0.3)
    top.legend()
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/tokens.zarr")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--model", default="data/model.json")
    parser.add_argument("--work", default="bench-branches", help="where the four runs go")
    parser.add_argument("--plot-only", action="store_true", help="plot the runs already in --work")
    parser.add_argument("--png", default=str(REPO / "docs" / "decay_branches.png"))
    args = parser.parse_args()
    for name in ("data", "tokenizer", "model"):  # the runs start in the repository
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    work = Path(args.work).resolve()
    long = work / "long"
    if not args.plot_only:
        mm_train(args, long, f"max_steps={LONG}", f"decay_steps={LONG_DECAY}", resume="none")
    runs = {f"long run: {LONG} steps, decay over the last {LONG_DECAY}": (long, 0)}
    for at in range(BRANCH_EVERY, LONG - LONG_DECAY, BRANCH_EVERY):
        out = work / f"decay-{at + BRANCH_DECAY}"
        if not args.plot_only:
            mm_train(args, out, f"max_steps={at + BRANCH_DECAY}", f"decay_steps={BRANCH_DECAY}",
                     resume=str(long / f"step_{at:08d}.pth"))
        runs[f"branch at step {at}: decay to step {at + BRANCH_DECAY}"] = (out, at)
    plot(runs, Path(args.png))
    long_val = {r["step"]: r["val_loss"] for r in read(long / "val_log.tsv")}
    for label, (out, _) in runs.items():
        last = read(out / "val_log.tsv")[-1]
        print(f"{label}: val loss {last['val_loss']:.4f} at step {last['step']:.0f} "
              f"(the long run there: {long_val.get(last['step'], float('nan')):.4f})")


if __name__ == "__main__":
    main()
