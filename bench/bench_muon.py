"""Muon vs AdamW on the embedded corpus: same model, same tokens, each optimizer at its best of three learning rates.

Runs `mm train` six times (all at once, one thread each, so machine load hits all alike):
AdamW at train.lr ∈ LRS["adamw"], Muon at train.muon_lr ∈ LRS["muon"] (its AdamW part at
the default train.lr). Then, for the best run of each (lowest final validation loss), writes
the validation curves (PNG), a markdown table, and the step at which Muon's validation loss
first reaches AdamW's final one.

    mm sample data/sample.jsonl && mm tokenizer data/sample.jsonl && mm tokenize data/sample.jsonl && mm config
    python bench/bench_muon.py --out bench-out/muon        # then copy the PNG and table into docs/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LRS = {"adamw": [1e-3, 3e-3, 1e-2], "muon": [0.01, 0.02, 0.04]}


def read_tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, map(float, line.split("\t")), strict=True)) for line in lines[1:] if line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/muon"))
    ap.add_argument("--set", action="append", default=[], help="extra train.* overrides for every run")
    ap.add_argument("--eval-interval", type=int, default=25)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mm = str(Path(sys.executable).with_name("mm"))
    runs, procs = {}, {}
    for optimizer, lrs in LRS.items():
        for lr in lrs:
            name = f"{optimizer}_{lr:g}"
            key = "lr" if optimizer == "adamw" else "muon_lr"
            sets = [f"train.optimizer={optimizer}", f"train.{key}={lr}", f"train.out_dir={args.out / name}",
                    f"train.eval_interval={args.eval_interval}", "train.compile=false", "train.save_interval=100000",
                    *args.set]
            cmd = [mm, "train", "--resume", "none", "--device", "cpu", *[a for s in sets for a in ("--set", s)]]
            log = open(args.out / f"{name}.log", "w")
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs[name] = (optimizer, lr)
    for name, p in procs.items():
        if p.wait() != 0:
            sys.exit(f"{name} failed: see {args.out / (name + '.log')}")

    results = {}
    for name, (optimizer, lr) in runs.items():
        val = read_tsv(args.out / name / "val_log.tsv")
        metrics = json.loads((args.out / name / "metrics.json").read_text())
        results[name] = {"optimizer": optimizer, "lr": lr, "val": [(int(r["step"]), r["val_loss"]) for r in val],
                         "final_val": val[-1]["val_loss"], "tokens_per_s": metrics["tokens_per_s"]}
    best = {o: min((r for r in results.values() if r["optimizer"] == o), key=lambda r: r["final_val"]) for o in LRS}
    target = best["adamw"]["final_val"]
    reached = next((s for s, v in best["muon"]["val"] if v <= target), None)
    summary = {"runs": results, "best": {o: f"{r['optimizer']}_{r['lr']:g}" for o, r in best.items()},
               "adamw_final_val": target, "muon_reaches_it_at_step": reached}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for _, r in sorted(results.items()):
        is_best = r is best[r["optimizer"]]
        steps, losses = zip(*r["val"], strict=True)
        label = f"{'Muon' if r['optimizer'] == 'muon' else 'AdamW'} lr {r['lr']:g}" + (" (best)" if is_best else "")
        ax.plot(steps, losses, label=label, color="tab:red" if r["optimizer"] == "muon" else "tab:blue",
                linewidth=2.2 if is_best else 0.9, alpha=1.0 if is_best else 0.5)
    ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.5))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "muon_vs_adamw.png", dpi=110)

    steps = [s for s, _ in best["adamw"]["val"]]
    lines = ["| step | " + " | ".join(str(s) for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
    for o in ("adamw", "muon"):
        r = best[o]
        lines.append(f"| {'AdamW' if o == 'adamw' else 'Muon'} (lr {r['lr']:g}) | "
                     + " | ".join(f"{v:.3f}" for _, v in r["val"]) + " |")
    lines.append("")
    lines.append("| run | final val loss | tokens/s |")
    lines.append("| --- | --- | --- |")
    for name, r in sorted(results.items()):
        lines.append(f"| {name} | {r['final_val']:.4f} | {r['tokens_per_s']:,.0f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Muon reaches AdamW's final val loss {target:.4f} at step {reached}")


if __name__ == "__main__":
    main()
