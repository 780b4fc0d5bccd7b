"""End-to-end wall time of `mm train` with train.compile=auto vs false, in the same run.

Both commands start together, one thread each (OMP_NUM_THREADS=1), on the same data
and params, so load from anything else on the machine hits both alike; the ratio of
their wall times (process start to exit: imports, compile, every step, evaluation,
checkpoints) is the figure. Cases:

    demo     the repo's params.yaml as is (tiny preset, 300 steps): auto must not be slower
    small    minimind2-small, 1,000 steps of 6 × 512 (5.5e14 FLOPs, just over auto's threshold), bf16
             where the CPU has it: auto must be faster

    mm sample data/sample.jsonl && mm tokenizer data/sample.jsonl && mm tokenize data/sample.jsonl
    python bench/bench_compile_e2e.py --case demo --case small --out bench-out/compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "demo": {"preset": "tiny", "sets": []},
    "small": {"preset": "minimind2-small", "sets": ["train.max_steps=1000", "train.seq_len=512",
                                                    "train.micro_batch_size=6", "train.warmup_steps=100",
                                                    "train.eval_interval=250", "train.save_interval=500"]},
}


def run_case(name: str, out: Path, mm: str) -> dict:
    case = CASES[name]
    model = out / f"{name}_model.json"
    subprocess.run([mm, "config", "--preset", case["preset"], "--out", str(model)], check=True, capture_output=True)
    procs, started = {}, {}
    for setting in ("false", "auto"):
        sets = [*case["sets"], f"train.compile={setting}", f"train.out_dir={out / f'{name}_{setting}'}"]
        cmd = [mm, "train", "--resume", "none", "--device", "cpu", "--model", str(model),
               *[a for s in sets for a in ("--set", s)]]
        log = open(out / f"{name}_{setting}.log", "w")
        started[setting] = time.perf_counter()
        procs[setting] = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = {}
    pending = dict(procs)
    while pending:  # note each one's end as it happens
        for setting, p in list(pending.items()):
            if p.poll() is not None:
                wall[setting] = time.perf_counter() - started[setting]
                if p.returncode:  # stop the other one too: a leftover run would load the next measurement
                    for other in pending.values():
                        other.kill()
                    sys.exit(f"{name} compile={setting} failed: see {out / f'{name}_{setting}.log'}")
                del pending[setting]
        time.sleep(0.5)
    metrics = {s: json.loads((out / f"{name}_{s}" / "metrics.json").read_text()) for s in procs}
    return {"case": name, "wall_s": wall, "ratio_false_over_auto": wall["false"] / wall["auto"],
            "compiled": {s: m["compiled"] for s, m in metrics.items()},
            "compile_reason": metrics["auto"]["compile_reason"],
            "val_loss": {s: m["val_loss"] for s, m in metrics.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--out", type=Path, default=Path("bench-out/compile"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mm = str(Path(sys.executable).with_name("mm"))
    results = [run_case(name, args.out, mm) for name in args.case or ["demo", "small"]]
    for r in results:
        print(f"{r['case']}: false {r['wall_s']['false']:.0f} s, auto {r['wall_s']['auto']:.0f} s "
              f"(compiled: {r['compiled']['auto']}), false/auto = {r['ratio_false_over_auto']:.3f}; "
              f"{r['compile_reason']}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
