"""Training from three sources mixed by weight: shares, process count and resume, through the CLI.

Three sources of text the tests never see, one per input format:
  web    JSONL          the long descriptions (METADATA) of the installed Python distributions
  code   .jsonl.gz      Python source files of the installed packages
  legal  Parquet        the license texts under /usr/share/common-licenses and /usr/share/doc
One tokenizer is trained on all three (`mm tokenizer`, tokenizer.sources), each source is
tokenized into one store (`mm tokenize --source`), and a tiny model is trained with
`--set data.sources.web.weight=0.6 ... code 0.3 ... legal 0.1` for --steps steps (fp32):

  ref      one process, accumulation 2
  procs2   two processes (gloo), accumulation 1: the same global batch
  resumed  the ref run stopped halfway (train.stop_after) and resumed in a new process

and reports each source's share of the tokens seen (metrics.json) against its weight, the
largest per-step loss difference of procs2 and resumed against ref, and the wall times.

    python bench/bench_mixture.py --out /tmp/mixture      # 1,000 steps; figures in docs/training.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MM = [sys.executable, "-m", "stages.cli"]
WEIGHTS = {"web": 0.6, "code": 0.3, "legal": 0.1}


def collect_texts(limit_bytes: int) -> dict[str, list[str]]:
    """Real text already on the machine, in a fixed order."""
    import importlib.metadata as md

    web = sorted({(d.metadata.get("Name") or "", d.metadata.get_payload() or "") for d in md.distributions()})
    web = [text for _, text in web if len(text) > 200]
    site = Path(__import__("numpy").__file__).parents[1]
    code = []
    for f in sorted(site.glob("*/**/*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) > 200:
            code.append(text)
        if sum(map(len, code)) > limit_bytes:
            break
    legal = []
    for f in sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright")):
        if f.is_file():
            legal.append(f.read_text(encoding="utf-8", errors="replace"))
        if sum(map(len, legal)) > limit_bytes:
            break
    return {"web": web, "code": code, "legal": legal}


def write_inputs(root: Path, texts: dict[str, list[str]]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"web": root / "web.jsonl", "code": root / "code.jsonl.gz", "legal": root / "legal.parquet"}
    paths["web"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["web"]))
    with gzip.open(paths["code"], "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts["code"])
    pq.write_table(pa.table({"text": texts["legal"]}), paths["legal"], row_group_size=256)
    return paths


def mm(*args, cwd: Path, log: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([*MM, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    if log:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"mm {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return done


def losses(out: Path) -> list[float]:
    rows = (out / "train_log.tsv").read_text().splitlines()
    col = rows[0].split("\t").index("loss")
    return [float(r.split("\t")[col]) for r in rows[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/mm_mixture"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--mb-per-source", type=float, default=1.5, help="text per source (code, legal)")
    args = ap.parse_args()
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)

    texts = collect_texts(int(args.mb_per_source * 2**20))
    paths = write_inputs(root, texts)
    params = {"data": {"sources": {n: {"path": str(p), "weight": 1.0} for n, p in paths.items()},
                       "val_fraction": 0.02},
              "tokenizer": {"vocab_size": 2048, "sources": list(paths)}}
    (root / "params.yaml").write_text(json.dumps(params, indent=1))
    t0 = time.perf_counter()
    mm("tokenizer", "--out", root / "tokenizer", "--params", root / "params.yaml", cwd=root)
    for name, path in paths.items():
        mm("tokenize", path, "--source", name, "--tokenizer", root / "tokenizer", "--out", root / "tokens.zarr",
           "--params", root / "params.yaml", "--force", cwd=root)
    mm("config", "--tokenizer", root / "tokenizer", "--out", root / "model.json", "--params", root / "params.yaml",
       "--set", "model.dim=64", "--set", "model.n_layers=2", cwd=root)
    prep = time.perf_counter() - t0

    sets = [f"data.sources.{n}.weight={w}" for n, w in WEIGHTS.items()] + [
        "train.seq_len=64", "train.micro_batch_size=8", f"train.max_steps={args.steps}", "train.dtype=fp32",
        "train.warmup_steps=50", "train.eval_interval=250", "train.eval_batches=4", "train.save_interval=250",
        "train.log_interval=100", "train.seed=7"]

    def train(name: str, *extra: str, procs: int = 0, accumulation: int = 2, resume: str = "none"):
        args_ = ["train", "--data", root / "tokens.zarr", "--tokenizer", root / "tokenizer", "--model",
                 root / "model.json", "--device", "cpu", "--resume", resume, "--params", root / "params.yaml"]
        for s in [*sets, f"train.accumulation_steps={accumulation}", f"train.out_dir={root / name}", *extra]:
            args_ += ["--set", s]
        if procs:
            args_ += ["--procs", str(procs)]
        t = time.perf_counter()
        mm(*args_, cwd=root, log=root / f"{name}.log")
        return time.perf_counter() - t

    times = {"ref": train("ref"), "procs2": train("procs2", procs=2, accumulation=1),
             "resumed (first half)": train("resumed", f"train.stop_after={args.steps // 2}")}
    times["resumed (second half)"] = train("resumed", resume="auto")

    ref = losses(root / "ref")
    metrics = json.loads((root / "ref" / "metrics.json").read_text())
    seen = metrics["tokens_by_source"]
    total = sum(seen.values())
    report = {
        "steps": args.steps, "prep_s": round(prep, 1), "wall_s": {k: round(v, 1) for k, v in times.items()},
        "documents": {n: len(t) for n, t in texts.items()},
        "share_pp_off": {n: round(100 * (seen[n] / total - WEIGHTS[n]), 4) for n in WEIGHTS},
        "tokens_by_source": seen,
        "max_dloss_procs2": max(abs(a - b) for a, b in zip(ref, losses(root / "procs2"), strict=True)),
        "max_dloss_resumed": max(abs(a - b) for a, b in zip(ref, losses(root / "resumed"), strict=True)),
        "logged_steps": [len(ref), len(losses(root / "procs2")), len(losses(root / "resumed"))],
        "val_loss_by_source": metrics.get("val_loss_by_source"),
    }
    (root / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
