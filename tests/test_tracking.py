"""Experiment trackers through the real `mm train`, read back with each library's own reader.

What is shown:
  history        a 60-step run streaming to TensorBoard, W&B (offline) and SwanLab (offline):
                 each holds the train_log.tsv loss/lr and val_log.tsv val_loss of every step,
                 bit for bit, plus the run description and generated samples
  one run        killed with SIGKILL while saving step 40 (so it resumes from step 20, and
                 steps 21..40 were streamed before the crash), then resumed to 60: each tracker
                 holds one run whose loss has exactly one value per step 1..60, equal to the
                 uninterrupted run's, and train/mfu and train/peak_memory_mb one per step, as
                 perf_log.tsv records them
  a failing      a tracker raising in its log call from step 30: one warning, the run finishes,
  tracker        the losses are those of the run above
  optional       with no trackers, importing the trainer imports none of the libraries; an
                 unknown or missing tracker is one line naming the fix, before any work

The three runs of the first phase start together (one thread each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tracker_files import (
    swanlab_history,
    swanlab_runs,
    swanlab_texts,
    tensorboard_history,
    tensorboard_texts,
    wandb_history,
    wandb_runs,
)

from pipeline.errors import UserError
from pipeline.train.progress import read_log

MM = str(Path(sys.executable).parent / "mm")
ALL = "tensorboard,wandb,swanlab"


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MM_INJECT_", "WANDB_", "SWANLAB_"))}  # offline defaults, whatever the user set
    # The libraries keep settings and caches under $HOME: a private one per test session.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HOME=str(home), **extra)
    return env


def _start(setup, out: Path, trackers: str, env: dict, steps: int = 60) -> subprocess.Popen:
    sets = [f"train.{s}" for s in ("seq_len=32", "micro_batch_size=4", f"max_steps={steps}", "warmup_steps=5",
                                   "eval_interval=20", "eval_batches=2", "save_interval=20", "log_interval=20",
                                   "dtype=fp32", "seed=7", f"out_dir={out}", f"trackers={trackers}")]
    args = [MM, "train", "--data", str(setup["data"].store), "--tokenizer", str(setup["data"].tokenizer),
            "--model", str(setup["model"]), "--device", "cpu", *[a for s in sets for a in ("--set", s)],
            "--set", "tracking.project=mm-test"]
    return subprocess.Popen(args, cwd=setup["cwd"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("tracking")
    model = cwd / "model.json"
    subprocess.run([MM, "config", "--tokenizer", str(tiny_store.tokenizer), "--out", str(model),
                    "--set", "model.dim=32", "--set", "model.n_layers=1"], cwd=cwd, check=True, capture_output=True)
    setup = {"cwd": cwd, "data": tiny_store, "model": model}
    home = cwd / "home"
    home.mkdir()
    procs = {
        "straight": _start(setup, cwd / "straight", ALL, _env(home)),
        "killed": _start(setup, cwd / "killed", ALL, _env(home, MM_INJECT_SAVE_FAULT="40:kill")),
        "faulty": _start(setup, cwd / "faulty", "tensorboard", _env(home, MM_INJECT_TRACKER_FAULT="tensorboard:30")),
    }
    done = {name: _finish(p) for name, p in procs.items()}
    done["resumed"] = _finish(_start(setup, cwd / "killed", ALL, _env(home)))
    return {"cwd": cwd, "done": done}


def _tsv(out: Path, name: str, column: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), row[column]) for row in read_log(out / name)]


def _only_run(runs_by_id: dict) -> list[Path]:
    assert len(runs_by_id) == 1, runs_by_id
    return next(iter(runs_by_id.values()))


def _histories(out: Path) -> dict[str, dict]:
    tb_runs = [p for p in (out / "tb").iterdir() if p.is_dir()]
    assert len(tb_runs) == 1, tb_runs
    return {
        "tensorboard": tensorboard_history(tb_runs[0]),
        "wandb": wandb_history(_only_run(wandb_runs(out / "wandb"))),
        "swanlab": swanlab_history(_only_run(swanlab_runs(out / "swanlog"))),
    }


def test_each_tracker_holds_the_tsv_history(runs):
    code, err = runs["done"]["straight"]
    assert code == 0, err[-3000:]
    out = runs["cwd"] / "straight"
    loss, lr = _tsv(out, "train_log.tsv", "loss"), _tsv(out, "train_log.tsv", "lr")
    val = _tsv(out, "val_log.tsv", "val_loss")
    assert [s for s, _ in loss] == list(range(1, 61)) and [s for s, _ in val] == [20, 40, 60]
    for name, history in _histories(out).items():
        assert history["train/loss"] == loss, name
        assert history["train/lr"] == lr, name
        assert history["val/val_loss"] == val, name
        assert [s for s, _ in history["train/peak_memory_mb"]] == list(range(1, 61)), name
    tb_dir = next(p for p in (out / "tb").iterdir() if p.is_dir())
    texts = tensorboard_texts(tb_dir)
    assert any(t.startswith("config") for t in texts) and any(t.startswith("samples") for t in texts), texts
    assert "samples" in swanlab_texts(_only_run(swanlab_runs(out / "swanlog")))
    assert "warning" not in err


def test_kill_and_resume_gives_one_run_with_one_value_per_step(runs):
    code, err = runs["done"]["killed"]
    assert code == -signal.SIGKILL, (code, err[-3000:])
    code, err = runs["done"]["resumed"]
    assert code == 0, err[-3000:]
    assert "resuming from" in err and "step_00000020.pth" in err  # the save of step 40 never completed
    straight = _tsv(runs["cwd"] / "straight", "train_log.tsv", "loss")
    out = runs["cwd"] / "killed"
    mfu, memory = _tsv(out, "perf_log.tsv", "mfu"), _tsv(out, "perf_log.tsv", "peak_memory_mb")
    assert [s for s, _ in mfu] == list(range(1, 61))
    for name, history in _histories(out).items():
        assert history["train/loss"] == straight, name  # steps 1..60 once each, the uninterrupted values
        # Measured per run, so not the straight run's; steps 1..20 re-logged from perf_log.tsv, no gap.
        assert history["train/mfu"] == mfu and history["train/peak_memory_mb"] == memory, name
    # What was streamed before the crash is kept, out of the trackers' directories.
    assert sorted(p.name for p in (out / "superseded").iterdir()) == ["swanlab", "tensorboard", "wandb"]


def test_a_failing_tracker_is_dropped_with_one_warning(runs):
    code, err = runs["done"]["faulty"]
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "tracker tensorboard failed" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "injected fault" in warnings[0] and "training goes on" in warnings[0]
    out = runs["cwd"] / "faulty"
    assert _tsv(out, "train_log.tsv", "loss") == _tsv(runs["cwd"] / "straight", "train_log.tsv", "loss")
    tb_dir = next(p for p in (out / "tb").iterdir() if p.is_dir())
    assert [s for s, _ in tensorboard_history(tb_dir)["train/loss"]] == list(range(1, 30))


def test_no_trackers_imports_none_of_them():
    code = ("import sys, pipeline.train.loop, stages.train, stages.cli\n"
            "loaded = [m for m in ('tensorboard', 'torch.utils.tensorboard', 'wandb', 'swanlab') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_unknown_or_missing_tracker_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.train.tracking import check_trackers

    r = subprocess.run([MM, "train", "--data", str(tmp_path / "nothing.zarr"),
                        "--set", "train.trackers=tensorboard,mlflow"], cwd=tmp_path, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "'train.trackers' must be one of tensorboard, wandb, swanlab, got 'mlflow'" in r.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"wandb is not installed; install it with: pip install 'mm\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])


def test_wandb_online_resume_asks_for_a_rewind_wandb_accepts():
    """Online, a resume asks W&B to rewind the run to the checkpoint's step (`resume_from`), so values an
    earlier invocation logged after that step do not stay; the arguments are ones wandb's own settings
    accept (resume_from and resume are exclusive there). The rewind itself needs a W&B server."""
    import wandb

    from pipeline.train.trackers import wandb_resume

    moment = wandb.Settings(**wandb_resume("abc12345", 20, offline=False)).resume_from
    assert (moment.run, moment.value, moment.metric) == ("abc12345", 20, "_step")
    for args in (wandb_resume("abc12345", 20, offline=True), wandb_resume("abc12345", 20, False, rewind=False),
                 wandb_resume("abc12345", 0, offline=False)):
        settings = wandb.Settings(run_id=args["id"], resume=args["resume"])
        assert (settings.run_id, settings.resume, settings.resume_from) == ("abc12345", "allow", None)
    assert wandb.Settings(run_id=wandb_resume(None, 0, offline=False)["id"]).run_id  # a new id
