"""`mm config` and `mm train` through the real CLI, in subprocesses, on the tiny store.

What the tests show:
  exact resume     40 steps straight == 20 steps (train.stop_after) + `--resume auto` for 20 more,
                   bit for bit (train_log rows and final weights), in fp32 and bf16
  accumulation     micro 8×1 == 4×2 == 2×4 per-step losses within 1e-5 (fp32)
  learning         the first loss is about ln(vocab), the last val loss clearly below it
  bf16 vs fp32     the two loss curves of the same run stay within a few percent
  user errors      exit code 1, one line "error: ..." naming the key/field/file, no traceback
  progress         plain "step N/M ... loss ..." lines every log_interval when not on a terminal

Speed: independent runs are started together (each with one thread, OMP_NUM_THREADS=1, so
two cores are shared without oversubscription and every run computes with the same thread
count), and every run is reused by several tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint.format import load_checkpoint
from pipeline.train.progress import read_log

MM = str(Path(sys.executable).parent / "mm")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MM_INJECT_NAN_STEPS": ""}
VOCAB = 1024  # tests/conftest.py: the tiny tokenizer


class Run:
    """One `mm` process started in the background; stdout/stderr go to files."""

    def __init__(self, args: list[str], cwd: Path, name: str):
        self.args, self.name = args, name
        self.out_path, self.err_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([MM, *args], cwd=cwd, stdout=out, stderr=err, env=ENV)

    def wait(self, timeout: float = 600) -> "Run":
        self.returncode = self.proc.wait(timeout)
        self.stdout, self.stderr = self.out_path.read_text(), self.err_path.read_text()
        return self

    def check(self) -> "Run":
        assert self.returncode == 0, f"mm {' '.join(self.args)} failed ({self.returncode}):\n{self.stderr[-3000:]}"
        return self


def run_all(runs: list[Run]) -> list[Run]:
    return [r.wait() for r in runs]


def train_args(data, model: Path, out: Path, *sets: str, resume: str = "auto") -> list[str]:
    base = ["seq_len=32", "lr=3e-3", "warmup_steps=5", "eval_interval=20", "eval_batches=4",
            "save_interval=100", "log_interval=10", "dtype=fp32", "seed=1234"]
    args = ["train", "--data", str(data.store), "--tokenizer", str(data.tokenizer), "--model", str(model),
            "--resume", resume, "--device", "cpu", "--set", f"train.out_dir={out}"]
    for s in [*base, *sets]:
        args += ["--set", f"train.{s}"]
    return args


def log_rows(out: Path, name: str = "train_log.tsv") -> list[list[str]]:
    """Rows of a metrics TSV as exact strings, without the wall-clock column."""
    lines = (out / name).read_text().splitlines()
    header = lines[0].split("\t")
    keep = [i for i, c in enumerate(header) if c != "tokens_per_s"]
    return [[line.split("\t")[i] for i in keep] for line in lines[1:] if line]


# ---------------------------------------------------------------------------
# Fixtures: the runs, each made once per module
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def model_json(tiny_store, work) -> tuple[Path, Run]:
    path = work / "model.json"
    run = Run(["config", "--tokenizer", str(tiny_store.tokenizer), "--out", str(path),
               "--set", "model.dim=64", "--set", "model.n_layers=2"], work, "config").wait().check()
    return path, run


@pytest.fixture(scope="module")
def resume_runs(tiny_store, work, model_json) -> dict:
    """Per dtype: 40 steps straight, and 20 (stop_after) + 20 resumed in a new process."""
    model, _ = model_json
    first = {}
    for dtype in ("fp32", "bf16"):
        common = (f"dtype={dtype}", "max_steps=40", "micro_batch_size=4", "accumulation_steps=2")
        first[dtype, "straight"] = Run(train_args(tiny_store, model, work / f"straight_{dtype}", *common),
                                       work, f"straight_{dtype}")
        first[dtype, "stopped"] = Run(train_args(tiny_store, model, work / f"split_{dtype}", *common, "stop_after=20"),
                                      work, f"stopped_{dtype}")
    for r in run_all(list(first.values())):
        r.check()
    resumed = {}
    for dtype in ("fp32", "bf16"):
        common = (f"dtype={dtype}", "max_steps=40", "micro_batch_size=4", "accumulation_steps=2")
        resumed[dtype] = Run(train_args(tiny_store, model, work / f"split_{dtype}", *common), work, f"resumed_{dtype}")
    for r in run_all(list(resumed.values())):
        r.check()
    return {"first": first, "resumed": resumed}


@pytest.fixture(scope="module")
def accumulation_runs(tiny_store, work, model_json) -> dict:
    """Global batch 8 as micro 8×1, 4×2, 2×4 (fp32), 30 steps, val every 10, a log line every 5."""
    model, _ = model_json
    runs = {}
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        runs[micro, accum] = Run(train_args(tiny_store, model, work / f"accum_{micro}x{accum}",
                                            "max_steps=30", "lr=6e-3", "eval_interval=10", "log_interval=5",
                                            f"micro_batch_size={micro}", f"accumulation_steps={accum}"),
                                 work, f"accum_{micro}x{accum}")
    for r in run_all(list(runs.values())):
        r.check()
    return runs


# ---------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_is_bit_exact(resume_runs, work, dtype):
    stopped, resumed = resume_runs["first"][dtype, "stopped"], resume_runs["resumed"][dtype]
    straight_out, split_out = work / f"straight_{dtype}", work / f"split_{dtype}"

    # The first half stopped at 20 of 40 on purpose (exit 0) with a checkpoint; the second resumed there.
    assert "train.stop_after=20: saved step 20 of 40" in stopped.stderr
    assert re.search(r"resuming from .* at step 20", resumed.stderr), resumed.stderr

    straight, split = log_rows(straight_out), log_rows(split_out)
    assert [int(r[0]) for r in straight] == list(range(1, 41))
    assert split == straight  # steps 1-40: step, loss (float repr), lr, grad_norm, tokens, skipped
    assert log_rows(split_out, "val_log.tsv") == log_rows(straight_out, "val_log.tsv")

    a, b = load_checkpoint(straight_out / "ckpt.pth"), load_checkpoint(split_out / "ckpt.pth")
    assert a["step"] == b["step"] == 40
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key


def test_stop_after_leaves_a_resumable_checkpoint(resume_runs, work):
    out = work / "split_fp32"
    assert (out / "step_00000020.pth").is_file() and (out / "step_00000040.pth").is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40


# ---------------------------------------------------------------------------
# bf16 follows fp32 (a short run; bench/bench_precision.py measures the long one)
# ---------------------------------------------------------------------------


def test_bf16_loss_curve_tracks_fp32(resume_runs, work):
    fp32 = [r["loss"] for r in read_log(work / "straight_fp32" / "train_log.tsv")]
    bf16 = [r["loss"] for r in read_log(work / "straight_bf16" / "train_log.tsv")]
    assert len(fp32) == len(bf16) == 40
    assert fp32 != bf16  # bf16 autocast really ran: the numbers differ ...
    worst = max(abs(b - f) / f for f, b in zip(fp32, bf16, strict=True))
    assert worst < 0.03, f"bf16 loss differs from fp32 by up to {worst:.2%}"  # ... but by little
    metrics = json.loads((work / "straight_bf16" / "metrics.json").read_text())
    assert metrics["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------
# Accumulation is exact; the loss falls; progress lines
# ---------------------------------------------------------------------------


def test_accumulation_is_exact(accumulation_runs, work):
    curves = {k: [r["loss"] for r in read_log(work / f"accum_{k[0]}x{k[1]}" / "train_log.tsv")]
              for k in accumulation_runs}
    reference = curves[8, 1]
    assert len(reference) == 30
    for key, curve in curves.items():
        worst = max(abs(a - b) for a, b in zip(reference, curve, strict=True))
        assert len(curve) == 30 and worst < 1e-5, f"micro {key[0]} × {key[1]}: max |Δloss| {worst:.2e}"


def test_loss_falls_from_ln_vocab(accumulation_runs, work):
    out = work / "accum_8x1"
    first_loss = read_log(out / "train_log.tsv")[0]["loss"]
    val = read_log(out / "val_log.tsv")
    assert [int(r["step"]) for r in val] == [10, 20, 30]
    assert abs(first_loss - math.log(VOCAB)) < 0.15, first_loss  # the init is near uniform
    # Still learning after step 10: by 0.05-0.1 nats over steps 10-30, depending on the data order.
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.03
    assert val[-1]["val_loss"] < math.log(VOCAB) - 0.8, val
    assert json.loads((out / "metrics.json").read_text())["val_loss"] == val[-1]["val_loss"]


def test_plain_progress_lines_when_not_a_terminal(accumulation_runs):
    stderr = accumulation_runs[8, 1].stderr
    lines = [line for line in stderr.splitlines() if line.startswith("step ")]
    steps = [int(re.match(r"step (\d+)/30\s", line).group(1)) for line in lines]
    assert steps == [5, 10, 15, 20, 25, 30], stderr
    for line in lines:
        assert re.search(r"loss \d+\.\d{4}\s.*lr \d\.\d\de-\d\d\s.*tok/s\s.*MFU [\d.]+%\s.*eta \d+s$", line), line
    assert "val nan" not in lines[-1]  # the val loss shows once measured
    assert "\x1b[" not in stderr  # no terminal control codes in a log file
    assert "done: " in stderr


# ---------------------------------------------------------------------------
# CLI basics and user errors
# ---------------------------------------------------------------------------


def test_config_writes_model_json_and_prints_its_size(model_json):
    path, run = model_json
    doc = json.loads(path.read_text())
    assert doc["format"] == "mm-model" and doc["vocab_size"] == VOCAB and doc["dim"] == 64 and doc["n_layers"] == 2
    for word in ("parameters", "non-embedding", "FLOPs/token", "AdamW"):
        assert word in run.stdout, run.stdout


ERROR_CASES = {
    # name: (how to break the run, words the one-line message must contain)
    "missing_store": ("data=missing", ["missing.zarr"]),
    "vocab_mismatch": ("model=vocab2048", ["vocab_size", "2048", "1024"]),
    "tokenizer_mismatch": ("tokenizer=edited", ["tokenizer"]),
    "seq_len_too_long": ("set=seq_len=4096", ["train.seq_len", "4096", "max_seq_len"]),
    "unknown_key": ("set=bogus=1", ["train.bogus"]),
    "micro_batch_zero": ("set=micro_batch_size=0", ["train.micro_batch_size"]),
    "incompatible_checkpoint": ("model=dim96", ["cannot resume", "model.dim", "64", "96"]),
    "bad_yaml_value": ("set=lr=[", ["--set", "train.lr=["]),
    "negative_grad_clip": ("set=grad_clip=-1", ["train.grad_clip", "-1"]),
    "eval_without_batches": ("set=eval_batches=0", ["train.eval_batches"]),
    "bad_beta": ("set=beta2=1.5", ["train.beta2", "1.5"]),
}


@pytest.fixture(scope="module")
def error_runs(tiny_store, work, model_json, resume_runs) -> dict:
    model, _ = model_json
    bad = work / "bad"
    bad.mkdir()
    doc = json.loads(model.read_text())
    (bad / "vocab2048.json").write_text(json.dumps({**doc, "vocab_size": 2048}))
    (bad / "dim96.json").write_text(json.dumps({**doc, "dim": 96}))
    shutil.copytree(tiny_store.tokenizer, bad / "edited")
    tok = json.loads((bad / "edited" / "tokenizer.json").read_text())
    (bad / "edited" / "tokenizer.json").write_text(json.dumps(tok, indent=1))  # same vocab, other bytes
    ckpt = work / "straight_fp32" / "ckpt.pth"
    runs = {}
    for name, (how, _) in ERROR_CASES.items():
        kind, _, value = how.partition("=")
        data = tiny_store
        if kind == "data":
            data = type(tiny_store)(tiny_store.root, tiny_store.corpus, tiny_store.tokenizer, bad / "missing.zarr")
        if kind == "tokenizer":
            data = type(tiny_store)(tiny_store.root, tiny_store.corpus, bad / "edited", tiny_store.store)
        args = train_args(data, bad / f"{value}.json" if kind == "model" else model, bad / f"out_{name}",
                          "max_steps=5", *([value] if kind == "set" else []),
                          resume=str(ckpt) if name == "incompatible_checkpoint" else "auto")
        runs[name] = Run(args, bad, name)
    runs["help"] = Run(["train", "--help"], bad, "help")
    return {name: r.wait() for name, r in runs.items()}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_error_is_one_line_exit_1(error_runs, case):
    run = error_runs[case]
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    for word in ERROR_CASES[case][1]:
        assert word in lines[0], lines[0]
    assert not list((run.out_path.parent / f"out_{case}").glob("*.pth"))  # nothing was trained or saved


def test_rerun_of_a_finished_run_keeps_its_metrics(tiny_store, work, model_json, resume_runs):
    """--resume auto on a run that already reached max_steps trains nothing and rewrites nothing."""
    model, _ = model_json
    out = work / "straight_fp32"
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "train_log.tsv")}
    common = ("dtype=fp32", "max_steps=40", "micro_batch_size=4", "accumulation_steps=2")
    run = Run(train_args(tiny_store, model, out, *common), work, "rerun_finished").wait().check()
    assert "nothing to do" in run.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_train_help(error_runs):
    run = error_runs["help"]
    assert run.returncode == 0, run.stderr
    for option in ("--resume", "--data", "--model", "--set", "--params", "--gpus", "--procs"):
        assert option in run.stdout


# ---------------------------------------------------------------------------
# The metric logs across a resume that adds or removes a source
# ---------------------------------------------------------------------------


def test_metric_log_migrates_columns_and_drops_only_partial_rows(tmp_path):
    """Reopened with other columns, every whole row up to the resumed step stays, matched by column
    name: a new column is empty in the earlier rows, a column no longer written stays at the end."""
    from pipeline.train.progress import MetricLog

    path = tmp_path / "log.tsv"
    log = MetricLog(path, ["step", "loss", "tokens/a"], 0)
    for step in (1, 2, 3):
        log.write(step=step, loss=1.0 / step, **{"tokens/a": 64 * step})
    log.close()
    with open(path, "a") as f:
        f.write("4\t0.2")  # what a kill -9 mid-write leaves
    log = MetricLog(path, ["step", "loss", "tokens/b"], 2)  # resumed at step 2 without source a
    log.write(step=3, loss=0.3, **{"tokens/b": 32})
    log.close()
    assert path.read_text().splitlines() == [
        "step\tloss\ttokens/b\ttokens/a", "1\t1.0\t\t64", "2\t0.5\t\t128", "3\t0.3\t32\t"]
    assert read_log(path) == [{"step": 1.0, "loss": 1.0, "tokens/a": 64.0},
                              {"step": 2.0, "loss": 0.5, "tokens/a": 128.0},
                              {"step": 3.0, "loss": 0.3, "tokens/b": 32.0}]


@pytest.fixture(scope="module")
def two_sources(tiny_store, work) -> Path:
    from pipeline.data.tokenize import tokenize_files

    lines = tiny_store.corpus.read_text().splitlines()
    store = work / "two_sources.zarr"
    for name, part in (("a", lines[:300]), ("b", lines[300:600])):
        (work / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        tokenize_files([work / f"{name}.jsonl"], tiny_store.tokenizer, store, source=name, val_fraction=0.1,
                       progress=False)
    return store


def test_resume_adding_then_removing_a_source_keeps_every_row(tiny_store, work, model_json, two_sources):
    """Source a for 3 steps, then a and b to step 5, then b alone to step 6 (--allow-data-change):
    train_log.tsv and val_log.tsv hold every step, each source's column empty where it was not trained."""
    model, _ = model_json
    out = work / "sources_change"
    data = dataclasses.replace(tiny_store, store=two_sources)
    plan = [({"a": 1.0}, 3), ({"a": 0.5, "b": 0.5}, 5), ({"b": 1.0}, 6)]
    for i, (weights, steps) in enumerate(plan):
        params = work / f"sources_{i}.yaml"
        params.write_text(json.dumps({"data": {"sources": {n: {"path": f"{n}.jsonl", "weight": w}
                                                           for n, w in weights.items()}}}))
        args = train_args(data, model, out, f"max_steps={steps}", "micro_batch_size=2", "eval_interval=1",
                          "eval_batches=1") + ["--params", str(params), "--allow-data-change"]
        Run(args, work, f"sources_change_{i}").wait().check()
    train = read_log(out / "train_log.tsv")
    assert [int(r["step"]) for r in train] == [1, 2, 3, 4, 5, 6]
    assert [("tokens/a" in r, "tokens/b" in r) for r in train] == [(True, False)] * 3 + [(True, True)] * 2 + \
        [(False, True)]
    assert all(math.isfinite(r["loss"]) for r in train)
    val = read_log(out / "val_log.tsv")
    assert [int(r["step"]) for r in val] == [1, 2, 3, 4, 5, 6]
    assert [("val_loss/a" in r, "val_loss/b" in r) for r in val] == [(True, False)] * 3 + [(True, True)] * 2 + \
        [(False, True)]
