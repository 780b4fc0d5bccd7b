"""Soak test for kill -9 and resume (slower than tests/test_reliability.py; optional).

    python bench/reliability_soak.py [--kills 10] [--steps 30] [--seed 1]

Builds the tiny data chain in a temporary directory, runs one uninterrupted
reference, then a run that is SIGKILLed --kills times at seeded random moments
(after a random number of step lines plus a random 0-0.5 s delay; with
save_interval=1 many kills land inside a checkpoint write) and resumed with
`--resume auto` each time until it finishes. Prints where each kill landed and
whether the final train_log.tsv (minus tokens_per_s) and weights are
bit-identical to the reference. Exit status 0 when they are.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/\d+ ")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.data.corpus import write_sample
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer_training import train_tokenizer
    from pipeline.train.resume import find_resumable

    root = Path(tempfile.mkdtemp(prefix="mm-soak-"))
    write_sample(root / "sample.jsonl")
    train_tokenizer([root / "sample.jsonl"], root / "tokenizer", vocab_size=1024)
    tokenize_files([root / "sample.jsonl"], root / "tokenizer", root / "tokens.zarr", workers=1,
                   val_fraction=0.05, progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MM_INJECT_")} | {"PYTHONPATH": str(REPO)}
    mm = [sys.executable, "-m", "stages.cli"]
    subprocess.run([*mm, "config", "--tokenizer", root / "tokenizer", "--out", root / "model.json",
                    "--set", "model.dim=64", "--set", "model.n_layers=2"], cwd=root, env=env, check=True,
                   capture_output=True)

    def cmd(out: Path) -> list[str]:
        sets = ["train.seq_len=32", "train.micro_batch_size=4", f"train.max_steps={args.steps}", "train.dtype=fp32",
                "train.warmup_steps=3", "train.eval_interval=5", "train.eval_batches=2", "train.log_interval=1",
                "train.save_interval=1", "train.keep_last=2", f"train.out_dir={out}"]
        return [*mm, "train", "--device", "cpu", "--data", str(root / "tokens.zarr"), "--tokenizer",
                str(root / "tokenizer"), "--model", str(root / "model.json"), *[a for s in sets for a in ("--set", s)]]

    t0 = time.time()
    subprocess.run(cmd(root / "ref"), cwd=root, env=env, check=True, capture_output=True)
    print(f"reference: {args.steps} steps in {time.time() - t0:.1f} s")

    rng, out, kills = random.Random(args.seed), root / "out", 0
    while True:
        before = find_resumable(out, lambda m: None)["step"] if out.exists() and any(out.glob("step_*")) else 0
        proc = subprocess.Popen(cmd(out), cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True)
        if kills < args.kills:
            want, seen, last = rng.randint(1, 4), 0, before
            for line in proc.stderr:
                m = STEP_LINE.match(line)
                if m:
                    seen, last = seen + 1, int(m.group(1))
                    if seen == want:
                        time.sleep(rng.uniform(0, 0.5))
                        proc.send_signal(signal.SIGKILL)
                        break
            proc.communicate()
            if proc.returncode == -signal.SIGKILL:
                kills += 1
                tmp = sorted(p.name for p in out.glob(".*tmp*"))
                after = find_resumable(out, lambda m: None)["step"] if any(out.glob("step_*")) else 0
                print(f"kill {kills}: resumed at {before}, last step line {last}, resumable now {after}"
                      + (f", torn write left {tmp}" if tmp else ""))
                continue
        err = proc.communicate()[1]
        if proc.returncode != 0:
            print(err[-2000:])
            return 1
        break

    def rows(p: Path) -> list[list[str]]:
        lines = p.read_text().splitlines()
        drop = lines[0].split("\t").index("tokens_per_s")
        return [[v for i, v in enumerate(line.split("\t")) if i != drop] for line in lines]

    same_log = rows(out / "train_log.tsv") == rows(root / "ref" / "train_log.tsv")
    a, b = load_checkpoint(out / "ckpt.pth"), load_checkpoint(root / "ref" / "ckpt.pth")
    same_weights = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same_rng = torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    leftovers = sorted(p.name for p in out.glob(".*tmp*"))
    print(f"{kills} kills: log identical {same_log}, weights identical {same_weights}, RNG identical {same_rng}, "
          f"leftover tmp files {leftovers}, step files {sorted(p.name for p in out.glob('step_*'))}")
    return 0 if same_log and same_weights and same_rng and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
