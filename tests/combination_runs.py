"""How tests/test_combinations.py runs its matrix: the tap, the plan of invocations, two at a time.

The tap (`TAP`) is a sitecustomize module the training processes import (PYTHONPATH): it wraps
MixtureSampler.micro_batches and .batch, changing nothing they return, and appends one JSON line per
micro-batch to $MM_TEST_TAP/<pid>.jsonl: the step, rank, micro-batch, each row's source, window id
and document ids. So the tests compare what a run reports (metrics.json, the checkpoint, train_log.tsv)
with what its processes actually read, not with the formula the reports come from.

`Plan` collects the `mm` invocations the cells need, each once by name: the uninterrupted run of a
configuration (`straight-KEY`), a killed run and its resume (`killed-kill9-KEY`, `resumed-kill9-KEY`),
a resume with other weights from the straight run's step-4 checkpoint (`reweight-KEY`), an export and
its `mm eval`. Invocations that depend on each other form one job; jobs run two at a time, one
thread per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = ("sources", "attention", "window", "dtype", "procs", "optimizer")  # what shapes a run's numbers
STEPS, BATCH, SEQ, SEED = 8, 8, 32, 7
KILL_AT, REWEIGHT_AT = 6, 4
W1 = {"jsonl": 0.5, "gz": 0.3, "parquet": 0.2}
W2 = {"jsonl": 0.2, "gz": 0.3, "parquet": 0.5}


def cell_id(c: dict) -> str:
    return (f"{c['sources']}-{c['attention']}attn-{c['window']}start-{c['dtype']}-{c['procs']}p-{c['optimizer']}"
            f"-{c['mid']}-{c['after']}")


def config_key(c: dict, **change) -> str:
    c = {**c, **change}
    return "-".join(str(c[k]) for k in CONFIG)


# ---------------------------------------------------------------------------
# The tap: what each training process consumed, one JSON line per micro-batch
# ---------------------------------------------------------------------------

TAP = '''
import inspect, json, os
if os.environ.get("MM_TEST_TAP"):
    from pipeline.data import sampler as _s
    os.makedirs(os.environ["MM_TEST_TAP"], exist_ok=True)
    _path = os.path.join(os.environ["MM_TEST_TAP"], f"{os.getpid()}.jsonl")
    _micro, _batch, _at = _s.MixtureSampler.micro_batches, _s.MixtureSampler.batch, {}

    def micro_batches(self, *args, **kwargs):
        bound = inspect.signature(_micro).bind(self, *args, **kwargs).arguments
        inner, m = _micro(self, *args, **kwargs), 0
        while True:
            _at.update(step=int(bound["step"]), rank=int(bound["rank"]), micro=m)
            try:
                batch = next(inner)
            except StopIteration:
                return
            yield batch
            m += 1

    def batch(self, sources, window_ids):
        out = _batch(self, sources, window_ids)
        with open(_path, "a") as f:
            f.write(json.dumps({**_at, "sources": [self.names[int(k)] for k in sources],
                                "windows": [int(w) for w in window_ids], "doc_ids": out.doc_ids.tolist()}) + "\\n")
        return out

    _s.MixtureSampler.micro_batches, _s.MixtureSampler.batch = micro_batches, batch
'''


def consumed(taps: list[Path]) -> dict[int, list[dict]]:
    """step → the rows trained at that step in global sample order (rank, then micro-batch), each
    {source, window, doc_ids}, from the taps of a run's invocations in order: a step redone after a
    resume counts as the later invocation did it."""
    by_step: dict[int, list] = {}
    for tap in taps:
        records = [json.loads(line) for f in sorted(tap.glob("*.jsonl")) for line in f.read_text().splitlines()]
        for step in {r["step"] for r in records}:
            batches = sorted((r for r in records if r["step"] == step), key=lambda r: (r["rank"], r["micro"]))
            by_step[step] = [{"source": s, "window": w, "doc_ids": d} for r in batches
                             for s, w, d in zip(r["sources"], r["windows"], r["doc_ids"], strict=True)]
    return by_step


# ---------------------------------------------------------------------------
# Running `mm`: this checkout, the tap on the path, one thread per process
# ---------------------------------------------------------------------------


def env(work: Path, **extra) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MM_")}
    return {**clean, "PYTHONPATH": f"{work / 'tap'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def mm(*args) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *map(str, args)]


def run(cmd: list[str], work: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env(work, **extra), timeout=600)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{' '.join(done.args)}\nexit {done.returncode}\n{done.stderr[-3000:]}"
    return done


# ---------------------------------------------------------------------------
# The runs: every invocation the cells need, each once, two at a time
# ---------------------------------------------------------------------------


class Plan:
    """Invocations by name (`mm train`, `mm export`, `mm eval`), grouped in jobs that run in order."""

    def __init__(self, work: Path, tiny_store):
        self.work, self.tokenizer = work, tiny_store.tokenizer
        self.stores = {"one": tiny_store.store, "three": work / "three.zarr"}
        self.jobs: dict[str, list[tuple[str, list[str], dict]]] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def out(self, name: str) -> Path:
        return self.work / "runs" / name

    def train(self, c: dict, out: str, weights: str, resume: str = "none", *extra: str) -> list[str]:
        sets = [f"seq_len={SEQ}", "micro_batch_size=4", f"accumulation_steps={2 // c['procs']}", f"seed={SEED}",
                f"max_steps={STEPS}", "lr=3e-3", "warmup_steps=2", "eval_interval=0", "save_interval=2",
                "keep_last=10", "log_interval=4", "compile=false", f"dtype={c['dtype']}", f"out_dir={self.out(out)}",
                f"attention={c['attention']}", f"window_start={c['window']}", f"optimizer={c['optimizer']}"]
        cmd = mm("train", "--data", self.stores[c["sources"]], "--tokenizer", self.tokenizer, "--model",
                 self.work / "model.json", "--device", "cpu", "--resume", resume, "--params",
                 self.work / f"{weights}.yaml", *extra)
        cmd += [a for s in sets for a in ("--set", f"train.{s}")]
        return cmd + (["--procs", "2", "--master-port", "PORT"] if c["procs"] == 2 else [])

    def add(self, job: str, name: str, cmd: list[str], **extra) -> None:
        steps = self.jobs.setdefault(job, [])
        if name not in [s[0] for s in steps]:
            tap = {"MM_TEST_TAP": str(self.work / "taps" / name)} if "train" in cmd else {}  # training only
            steps.append((name, cmd, {**tap, **extra}))

    def straight(self, c: dict, **change) -> str:
        """The uninterrupted run of c's configuration (with `change`): added once, named by its key."""
        c, key = {**c, **change}, config_key(c, **change)
        self.add(key, f"straight-{key}", self.train(c, f"straight-{key}", weights(c)))
        return key

    def cell(self, c: dict) -> None:
        key = self.straight(c)
        if c["procs"] == 2 and c["mid"] == "none":
            self.straight(c, procs=1)
        if c["mid"] == "kill9":
            key = f"kill9-{config_key(c)}"
            self.add(key, f"killed-{key}", self.train(c, key, weights(c)),
                     MM_INJECT_SAVE_FAULT=f"{KILL_AT}:kill")
            self.add(key, f"resumed-{key}", self.train(c, key, weights(c), "auto"))
        elif c["mid"] == "reweight":
            parent = self.out(f"straight-{key}") / f"step_{REWEIGHT_AT:08d}.pth"
            self.add(key, f"reweight-{key}", self.train(c, f"reweight-{key}", "w2", str(parent),
                                                        "--allow-data-change"))
        if c["after"] == "export":
            export = self.work / "exports" / cell_id(c)
            self.add(key, f"export-{cell_id(c)}", mm("export", final_dir(self, c) / "ckpt.pth", "--out", export,
                                                     "--params", self.work / "none.yaml"))
            self.add(key, f"eval-{cell_id(c)}", mm("eval", export, "--data", self.stores[c["sources"]], "--out",
                                                   export.with_suffix(".json"), "--seq-len", SEQ, "--device", "cpu",
                                                   "--params", self.work / f"{final_weights(c)}.yaml", "--set",
                                                   "eval.batches=2", "--set", "eval.batch_size=4"))

    def run_job(self, job: str) -> None:
        for name, cmd, extra in self.jobs[job]:
            cmd = [free_port() if a == "PORT" else a for a in cmd]
            done = run([str(a) for a in cmd], self.work, **extra)
            self.results[name] = done
            if done.returncode != 0 and not name.startswith("killed-"):
                return  # the later invocations of this job need this one

    def run_all(self) -> None:
        cost = {job: sum(2 if "--procs" in cmd else 1 for _, cmd, _ in steps) for job, steps in self.jobs.items()}
        with ThreadPoolExecutor(2) as pool:  # two at a time, one thread each: the two cores
            list(pool.map(self.run_job, sorted(self.jobs, key=lambda j: -cost[j])))

    def result(self, name: str) -> subprocess.CompletedProcess:
        assert name in self.results, f"{name} did not run: an earlier invocation of its job failed"
        return self.results[name]


def weights(c: dict) -> str:
    return "w1" if c["sources"] == "three" else "one"


def final_weights(c: dict) -> str:
    return "w2" if c["mid"] == "reweight" else weights(c)


def final_dir(plan: Plan, c: dict) -> Path:
    prefix = {"none": "straight", "kill9": "kill9", "reweight": "reweight"}[c["mid"]]
    return plan.out(f"{prefix}-{config_key(c)}")


def invocations(c: dict) -> list[str]:
    """The training invocations whose rows make up the cell's final model, in order."""
    key = config_key(c)
    return {"none": [f"straight-{key}"], "kill9": [f"killed-kill9-{key}", f"resumed-kill9-{key}"],
            "reweight": [f"straight-{key}", f"reweight-{key}"]}[c["mid"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
