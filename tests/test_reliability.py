"""Reliability: nothing is lost under kill -9, preemption, full disks, corrupt files and hostile checkpoints.

Every test runs the real `mm` CLI in subprocesses (real torchrun for the
two-process case) on the session's tiny store, with a 64-dim, 2-layer model,
seq_len 32, fp32, so "identical" means bit-identical: losses are compared as the
exact floats train_log.tsv records, weights with torch.equal.

Fault injection (documented in docs/training.md, "Reliability"):
  MM_INJECT_NAN_STEPS=3        poison step 3's loss (pipeline/train/setup.py)
  MM_INJECT_SAVE_FAULT=8:kill  SIGKILL inside the save of step 8, after the tmp file is
                               complete and before the rename (pipeline/checkpoint/format.py)
  MM_INJECT_SAVE_FAULT=4:enospc  the save of step 4 fails with ENOSPC after 64 KiB
  MM_INJECT_SPIKE_STEPS=20     step 20's update at 1000x the learning rate: the next loss spikes
                               (pipeline/train/spike.py)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, mm, mm_env

from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
RUN = [  # everything that shapes the numbers; save/keep/log settings do not
    "train.seq_len=32", "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.dtype=fp32",
    "train.warmup_steps=2", "train.eval_interval=4", "train.eval_batches=2", "train.log_interval=1",
    "train.save_interval=2", "train.keep_last=3",
]
STEP_LINE = re.compile(r"^step (\d+)/\d+ ")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def train_cmd(setup, out: Path, *extra: str, sets=(), model=None, data=None, tokenizer=None) -> list[str]:
    cmd = [sys.executable, "-m", "stages.cli", "train", "--device", "cpu",
           "--data", str(data or setup.store), "--tokenizer", str(tokenizer or setup.tokenizer),
           "--model", str(model or setup.model)]
    for s in [*RUN, f"train.out_dir={out}", *sets]:
        cmd += ["--set", s]
    return cmd + list(extra)


def mm_train(setup, out: Path, *extra: str, sets=(), env=None, **paths) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(setup, out, *extra, sets=sets, **paths), cwd=setup.cwd, env=env or mm_env(),
                          capture_output=True, text=True, timeout=600)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    return r


def user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 with one `error:` line (no traceback) that contains every needle; warnings may precede it."""
    return assert_user_error(r, *needles, alone=False)


def log_rows(path: Path) -> list[dict]:
    """train_log.tsv rows as exact strings, minus the wall-clock column."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:] if line]
    return [{k: v for k, v in zip(header, row, strict=False) if k != "tokens_per_s"} for row in rows]


def load(path: Path) -> dict:
    from pipeline.checkpoint.format import load_checkpoint

    return load_checkpoint(path)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    _assert_equal_nested(a["optimizer"], b["optimizer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def _assert_equal_nested(x, y, where="optimizer") -> None:
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_equal_nested(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_equal_nested(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def assert_matches_reference(out: Path, ref: Path) -> None:
    """Same per-step rows (loss, lr, grad_norm, tokens, skipped), val losses and final state."""
    assert log_rows(out / "train_log.tsv") == log_rows(ref / "train_log.tsv")
    assert (out / "val_log.tsv").read_text() == (ref / "val_log.tsv").read_text()
    assert_same_state(load(out / "ckpt.pth"), load(ref / "ckpt.pth"))


def step_files(out: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in out.glob("step_*.pth"))


def tmp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*tmp*"))


def all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Fixtures: the model config and one uninterrupted reference run
# ---------------------------------------------------------------------------


class Setup:
    def __init__(self, cwd: Path, data):
        self.cwd, self.store, self.tokenizer = cwd, data.store, data.tokenizer
        self.corpus = data.corpus
        self.model = cwd / "model.json"


@pytest.fixture(scope="module")
def setup(tiny_store, tmp_path_factory) -> Setup:
    cwd = tmp_path_factory.mktemp("reliability")
    s = Setup(cwd, tiny_store)
    ok(mm("config", "--tokenizer", s.tokenizer, "--out", s.model, "--set", "model.dim=64", "--set", "model.n_layers=2",
          cwd=cwd))
    return s


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """12 uninterrupted steps, checkpoints every 2, the last 3 kept."""
    out = setup.cwd / "reference"
    ok(mm_train(setup, out))
    assert step_files(out) == [8, 10, 12]
    assert os.path.samefile(out / "ckpt.pth", out / "step_00000012.pth")
    return out


# ---------------------------------------------------------------------------
# 1. kill -9 at random moments, including inside a checkpoint write
# ---------------------------------------------------------------------------


def test_kill9_at_random_moments_then_resume_is_identical(setup, reference, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(20240605)
    last_step = 0
    for _ in range(2):
        # Kill after a seeded-random number of step lines plus a seeded-random delay: the
        # kill lands mid-step, mid-evaluation or mid-save, wherever the run happens to be.
        proc = subprocess.Popen(train_cmd(setup, out), cwd=setup.cwd, env=mm_env(),
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        want_lines, seen = rng.randint(3, 4), 0  # >= 3 lines: the step-2 save of a fresh run is done
        for line in proc.stderr:
            m = STEP_LINE.match(line)
            if m:
                seen, last_step = seen + 1, int(m.group(1))
                if seen == want_lines:
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        assert last_step < STEPS

    # Now a kill inside save_checkpoint, between the complete tmp file and the rename.
    from pipeline.train.resume import find_resumable

    resumable = find_resumable(out)["step"]
    fault_step = resumable + 2
    assert fault_step <= STEPS
    r = mm_train(setup, out, env=mm_env(MM_INJECT_SAVE_FAULT=f"{fault_step}:kill"))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert any(name.startswith(f".step_{fault_step:08d}.pth.tmp-") for name in tmp_files(out)), tmp_files(out)
    assert max(step_files(out)) == fault_step - 2  # the rename never happened
    assert find_resumable(out)["step"] == fault_step - 2

    r = ok(mm_train(setup, out))
    assert f"resuming from {out / f'step_{fault_step - 2:08d}.pth'} at step {fault_step - 2}" in r.stderr, r.stderr
    assert "skipping checkpoint" not in r.stderr
    assert_matches_reference(out, reference)
    assert tmp_files(out) == []  # the killed writer's tmp file was cleaned up
    assert step_files(out) == [8, 10, 12]  # retention: the last 3


# ---------------------------------------------------------------------------
# 2. SIGTERM to a two-process CPU run
# ---------------------------------------------------------------------------


def test_sigterm_two_processes_stop_at_one_step_and_resume_identically(setup, tmp_path):
    sets = ["train.max_steps=8", "train.eval_interval=0"]

    def launch(out: Path) -> list[str]:
        return train_cmd(setup, out, "--procs", "2", "--master-port", str(free_port()), sets=sets)

    ref = tmp_path / "ref"
    ok(subprocess.run(launch(ref), cwd=setup.cwd, env=mm_env(), capture_output=True, text=True, timeout=600))

    out = tmp_path / "out"
    proc = subprocess.Popen(launch(out), cwd=setup.cwd, env=mm_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if STEP_LINE.match(line) and int(STEP_LINE.match(line).group(1)) >= 3:
            proc.send_signal(signal.SIGTERM)  # the `mm` parent forwards it to torchrun's process group
            break
    rest = proc.communicate(timeout=120)[1]
    stderr = "".join(lines) + rest
    assert proc.returncode == 75, (proc.returncode, stderr[-3000:])
    stopped = {int(r): int(s) for r, s in re.findall(r"rank (\d+): stopped after step (\d+)", stderr)}
    assert sorted(stopped) == [0, 1], stderr[-3000:]
    step = stopped[0]
    assert stopped[1] == step and 3 <= step < 8
    assert f"stop requested: saved step {step}" in stderr
    assert load(out / "ckpt.pth")["step"] == step
    assert int(log_rows(out / "train_log.tsv")[-1]["step"]) == step

    r = subprocess.run(launch(out), cwd=setup.cwd, env=mm_env(), capture_output=True, text=True, timeout=600)
    assert f"at step {step}" in ok(r).stderr
    assert log_rows(out / "train_log.tsv") == log_rows(ref / "train_log.tsv")
    assert_same_state(load(out / "ckpt.pth"), load(ref / "ckpt.pth"))


# ---------------------------------------------------------------------------
# 3. A truncated newest checkpoint is skipped, the previous one is used
# ---------------------------------------------------------------------------


def test_truncated_newest_checkpoint_is_skipped(setup, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "ckpt.pth").unlink()  # as mm writes it: ckpt.pth is a hard link to the newest step file
    os.link(out / "step_00000012.pth", out / "ckpt.pth")
    size = (out / "ckpt.pth").stat().st_size
    os.truncate(out / "ckpt.pth", size // 2)  # truncates step_00000012.pth too: one file
    assert (out / "step_00000012.pth").stat().st_size == size // 2

    r = ok(mm_train(setup, out))
    skipped = [line for line in r.stderr.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skipped) == 1, r.stderr
    assert "step_00000012.pth: not an mm checkpoint (not a complete zip archive" in skipped[0], r.stderr
    assert f"resuming from {out / 'step_00000010.pth'} at step 10" in r.stderr
    assert_matches_reference(out, reference)  # steps 11-12 rerun to the same numbers
    assert load(out / "step_00000012.pth")["step"] == 12  # rewritten whole (the truncated one is in quarantine/)
    assert (out / "quarantine/step_00000012.pth").stat().st_size == size // 2

    # A flipped byte inside the tensor data (same size) fails the checksum or the zip check.
    from pipeline.checkpoint.format import load_checkpoint

    bad = tmp_path / "flipped.pth"
    shutil.copyfile(reference / "step_00000010.pth", bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"flipped\.pth: (checksum mismatch|not an mm checkpoint)"):
        load_checkpoint(bad)


# ---------------------------------------------------------------------------
# 4. A full disk during a save
# ---------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path, reference):
    """A tmpfs that holds one checkpoint but not two (needs root; skipped where mount is refused)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    size = int((reference / "ckpt.pth").stat().st_size * 1.5) // 4096 * 4096
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the injected ENOSPC case covers the path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("how", ["injected", "tmpfs"])
def test_full_disk_during_save_keeps_previous_checkpoint(setup, how, request, tmp_path):
    if how == "tmpfs":
        out, env = request.getfixturevalue("tiny_fs") / "out", mm_env()
    else:
        out, env = tmp_path / "out", mm_env(MM_INJECT_SAVE_FAULT="4:enospc")
    r = mm_train(setup, out, sets=["train.keep_last=1", "train.eval_interval=0"], env=env)
    user_error(r, f"{out / 'step_00000004.pth'}: saving the checkpoint failed (No space left on device)",
               "the previous checkpoint is intact")
    assert step_files(out) == [2] and tmp_files(out) == []
    state = load(out / "ckpt.pth")
    assert state["step"] == 2 and os.path.samefile(out / "ckpt.pth", out / "step_00000002.pth")
    assert not (out / "metrics.json").exists()  # it stopped, it did not carry on without checkpoints


# ---------------------------------------------------------------------------
# 5. Non-finite loss: skip and count, or abort; never saved
# ---------------------------------------------------------------------------


def test_nan_loss_is_skipped_and_counted(setup, tmp_path):
    out = tmp_path / "out"
    sets = ["train.max_steps=5", "train.save_interval=1", "train.keep_last=10", "train.eval_interval=0"]
    r = ok(mm_train(setup, out, sets=sets, env=mm_env(MM_INJECT_NAN_STEPS="3")))
    assert "step 3: non-finite loss (nan)" in r.stderr
    rows = log_rows(out / "train_log.tsv")
    assert [row["loss"] for row in rows][2] == "nan"
    assert [int(row["skipped"]) for row in rows] == [0, 0, 1, 1, 1]
    assert json.loads((out / "metrics.json").read_text())["skipped_steps"] == 1
    states = {s: load(out / f"step_{s:08d}.pth") for s in step_files(out)}
    assert sorted(states) == [1, 2, 3, 4, 5]
    assert all(all_finite(st["model"]) and all_finite(st["optimizer"]) for st in states.values())
    assert states[5]["metrics"]["skipped_steps"] == 1
    # Skipped means skipped: step 3 left weights and optimizer state as step 2 had them.
    for k in states[2]["model"]:
        assert torch.equal(states[2]["model"][k], states[3]["model"][k])
    _assert_equal_nested(states[2]["optimizer"]["state"], states[3]["optimizer"]["state"])  # (the lr moves on)
    assert not all(torch.equal(states[3]["model"][k], states[4]["model"][k]) for k in states[3]["model"])


def test_nan_loss_aborts_under_abort(setup, tmp_path):
    out = tmp_path / "out"
    sets = ["train.max_steps=5", "train.save_interval=1", "train.keep_last=10", "train.eval_interval=0",
            "train.nonfinite=abort"]
    r = mm_train(setup, out, sets=sets, env=mm_env(MM_INJECT_NAN_STEPS="3"))
    user_error(r, "step 3: non-finite loss", "train.nonfinite=abort")
    assert step_files(out) == [1, 2]
    assert load(out / "ckpt.pth")["step"] == 2
    assert all(all_finite(load(out / f"step_{s:08d}.pth")["model"]) for s in (1, 2))
    assert not (out / "metrics.json").exists()


def test_fp16_grad_scaler_skips_a_nonfinite_loss_and_finishes(setup, tmp_path):
    """train.dtype=fp16 on the CPU runs the GPU's loss-scaling path (fp16 autocast, a GradScaler). A
    non-finite loss at step 3 is skipped and counted, and the scaler is updated all the same: without
    that update the next step's unscale_() raised. The run finishes; a resume loads the scaler's state."""
    out = tmp_path / "out"
    sets = ["train.max_steps=5", "train.save_interval=2", "train.eval_interval=0", "train.dtype=fp16"]
    r = ok(mm_train(setup, out, sets=[*sets, "train.stop_after=4"], env=mm_env(MM_INJECT_NAN_STEPS="3")))
    assert "step 3: non-finite loss (nan)" in r.stderr
    ok(mm_train(setup, out, sets=sets))  # resumes at step 4 with the scaler's saved scale
    rows = log_rows(out / "train_log.tsv")
    losses = [row["loss"] for row in rows]
    assert len(losses) == 5 and losses[2] == "nan"
    assert all(float(x) > 0 for i, x in enumerate(losses) if i != 2)
    assert [int(row["skipped"]) for row in rows] == [0, 0, 1, 1, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dtype"] == "float16" and metrics["skipped_steps"] == 1
    state = load(out / "ckpt.pth")
    assert state["step"] == 5 and state["scaler"]["scale"] > 0 and all_finite(state["model"])


# ---------------------------------------------------------------------------
# 6. A checkpoint crafted to run code is refused and the code never runs
# ---------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"format": "mm-checkpoint", "version": 1, "model": _Payload(marker)}, path)
    return path


def test_code_running_pickle_is_refused(setup, tmp_path):
    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.train.resume import find_resumable

    # The payload is live: a plain (weights_only=False) load runs it.
    live_marker = tmp_path / "ran-live"
    live = _hostile(tmp_path / "live.pth", live_marker)
    torch.load(live, weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "ran"
    evil = _hostile(tmp_path / "evil.pth", marker)
    hostile = (f"{evil}: not an mm checkpoint (it holds objects other than tensors and plain values, "
               "refused without running them)")
    user_error(mm_train(setup, tmp_path / "out", "--resume", str(evil)), hostile)
    user_error(mm("export", evil, "--out", tmp_path / "export", cwd=setup.cwd), hostile)
    with pytest.raises(UserError, match="not an mm checkpoint"):
        load_checkpoint(evil)
    # As out/ckpt.pth, `--resume auto` skips it with a message.
    auto = tmp_path / "auto"
    auto.mkdir()
    _hostile(auto / "ckpt.pth", marker)
    warnings = []
    assert find_resumable(auto, warnings.append) is None
    assert len(warnings) == 1 and "ckpt.pth: not an mm checkpoint" in warnings[0]
    assert not marker.exists()


# ---------------------------------------------------------------------------
# 7. Changed model, tokenizer or data at resume
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_data(setup):
    """A second tokenizer (trained on part of the corpus) with its store, and a smaller store
    tokenized with the original tokenizer."""
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer_training import train_tokenizer

    root = setup.cwd / "other"
    root.mkdir()
    part = root / "part.jsonl"
    with open(setup.corpus, encoding="utf-8") as f:
        part.write_text("".join(line for _, line in zip(range(1500), f, strict=False)), encoding="utf-8")
    train_tokenizer([part], root / "tokenizer", vocab_size=1024)
    tokenize_files([part], root / "tokenizer", root / "tok2.zarr", source="sample", workers=1,
                   val_fraction=0.05, progress=False)
    tokenize_files([part], setup.tokenizer, root / "part.zarr", source="sample", workers=1,
                   val_fraction=0.05, progress=False)
    return root


def test_resume_refuses_changed_model_tokenizer_or_store(setup, reference, other_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    more = ["train.max_steps=14", "train.lr_change=allow"]  # a longer cosine moves the lr of steps taken
    wider = setup.cwd / "model96.json"
    ok(mm("config", "--tokenizer", setup.tokenizer, "--out", wider, "--set", "model.dim=96",
          "--set", "model.n_layers=2", cwd=setup.cwd))

    # Hidden size and token store both changed: one line naming both fields.
    line = user_error(mm_train(setup, out, sets=more, model=wider, data=other_data / "part.zarr"),
                      f"{out / 'step_00000012.pth'}: cannot resume", "model.dim (64 → 96)", "store_fingerprint",
                      "--allow-data-change")
    assert "tokenizer_sha256" not in line

    # Another tokenizer (and its store): refused even with --allow-data-change.
    line = user_error(mm_train(setup, out, "--allow-data-change", sets=more, tokenizer=other_data / "tokenizer",
                               data=other_data / "tok2.zarr"), "cannot resume", "tokenizer_sha256")
    assert "store_fingerprint" not in line and "model." not in line

    # A changed store alone: --allow-data-change lets it through, and training goes on.
    r = ok(mm_train(setup, out, "--allow-data-change", sets=more, data=other_data / "part.zarr"))
    assert "resuming from" in r.stderr and "at step 12" in r.stderr
    assert [int(row["step"]) for row in log_rows(out / "train_log.tsv")] == list(range(1, 15))
    assert load(out / "ckpt.pth")["step"] == 14
    assert log_rows(out / "train_log.tsv")[:12] == log_rows(reference / "train_log.tsv")


# ---------------------------------------------------------------------------
# Token store corruption is caught when the store is opened, naming the file
# ---------------------------------------------------------------------------


def test_resume_refuses_a_changed_seed_unless_data_change_is_allowed(setup, reference, tmp_path):
    """train.seed keys the window order: a new seed at resume is refused, naming it; --allow-data-change
    takes it (the order from the resumed step on follows the new seed) and the checkpoint records it."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    seed = load(reference / "ckpt.pth")["train_config"]["seed"]  # written before data.seed was recorded
    sets = ["train.max_steps=13", f"train.seed={seed + 1}", "train.lr_change=allow"]
    user_error(mm_train(setup, out, sets=sets), "cannot resume", f"train.seed ({seed} → {seed + 1})",
               "--allow-data-change")
    assert load(out / "ckpt.pth")["step"] == 12
    r = ok(mm_train(setup, out, "--allow-data-change", sets=sets))
    assert "at step 12" in r.stderr
    state = load(out / "ckpt.pth")
    assert state["step"] == 13 and state["data"]["seed"] == seed + 1


def _edit_attrs(store: Path, fn) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    fn(meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, needle", [
    (lambda s: os.truncate(s / "train/tokens/c/0", (s / "train/tokens/c/0").stat().st_size - 2),
     "train/tokens/c/0: chunk file is"),
    (lambda s: (s / "val/doc_offsets/c/0").unlink(), "val/doc_offsets/c/0: chunk file missing"),
    (lambda s: _edit_attrs(s, lambda a: a["counts"]["train"].update(tokens=5)), "zarr.json: attributes say train"),
    (lambda s: _edit_attrs(s, lambda a: a["tokenizer"].update(vocab_size=512)), "zarr.json: attributes altered"),
    (lambda s: _edit_attrs(s, lambda a: a["inputs"][0].update(sha256="0" * 64)), "zarr.json: attributes altered"),
], ids=["truncated-chunk", "missing-chunk", "altered-counts", "altered-vocab", "altered-inputs"])
def test_store_corruption_detected_on_open(setup, tmp_path, damage, needle):
    from pipeline.data.store.reader import open_store

    store = tmp_path / "tokens.zarr"
    shutil.copytree(setup.store, store)
    part = next(store.glob("*/part-00000-of-00001"))  # the copy itself is fine; its one part is what gets damaged
    damage(part)
    with pytest.raises(UserError, match=re.escape(str(part / needle))):
        open_store(store)


def test_store_corruption_stops_mm_train(setup, tmp_path):
    store = tmp_path / "tokens.zarr"
    shutil.copytree(setup.store, store)
    chunk = next(store.glob("*/part-00000-of-00001")) / "train/tokens/c/0"
    os.truncate(chunk, chunk.stat().st_size // 2)
    user_error(mm_train(setup, tmp_path / "out", data=store), f"{chunk}: chunk file is")


# ---------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------


def _fake_state(step: int) -> dict:
    from pipeline.checkpoint.format import CHECKPOINT_KEYS

    state = {k: {} for k in CHECKPOINT_KEYS}
    state.update(format="mm-checkpoint", version=1, step=step, model={"w": torch.full((4,), float(step))},
                 scaler=None, rng={"torch": torch.get_rng_state()})
    return state


def test_retention_keeps_last_k_and_never_the_only_complete_one(tmp_path, monkeypatch):
    from pipeline.checkpoint.format import save_checkpoint
    from pipeline.train.resume import find_resumable

    out = tmp_path / "out"
    for step in range(1, 6):
        save_checkpoint(_fake_state(step), out, keep_last=2)
    assert step_files(out) == [4, 5] and os.path.samefile(out / "ckpt.pth", out / "step_00000005.pth")

    # The newest (5) is truncated: resume reports it once (ckpt.pth is the same file), moves it to
    # quarantine/, points ckpt.pth at 4 and takes 4.
    os.truncate(out / "ckpt.pth", 100)
    warnings = []
    assert find_resumable(out, warnings.append)["step"] == 4
    assert len(warnings) == 2 and warnings[0].startswith(f"skipping checkpoint: {out / 'step_00000005.pth'}")
    assert warnings[1] == f"moved {out / 'step_00000005.pth'} to {out / 'quarantine/step_00000005.pth'}"
    assert step_files(out) == [4] and os.path.samefile(out / "ckpt.pth", out / "step_00000004.pth")
    # keep_last=1: saving 5 again drops 4; a save of 3 (a run resumed from an older checkpoint)
    # drops the abandoned 5 and keeps the file just written. The quarantined 5 stays.
    save_checkpoint(_fake_state(5), out, keep_last=1)
    assert step_files(out) == [5]
    save_checkpoint(_fake_state(3), out, keep_last=1)
    assert step_files(out) == [3] and os.path.samefile(out / "ckpt.pth", out / "step_00000003.pth")
    assert find_resumable(out, warnings.append)["step"] == 3 and len(warnings) == 2
    assert (out / "quarantine/step_00000005.pth").stat().st_size == 100

    # A failed save prunes nothing: the only complete checkpoint survives.
    monkeypatch.setenv("MM_INJECT_SAVE_FAULT", "4:enospc")
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint(_fake_state(4) | {"model": {"w": torch.zeros(1 << 16)}}, out, keep_last=1)
    assert step_files(out) == [3] and tmp_files(out) == [] and find_resumable(out)["step"] == 3

    # Only damaged checkpoints: `--resume auto` refuses to start over quietly.
    from pipeline.train.resume import pick_checkpoint

    os.truncate(out / "ckpt.pth", 100)
    with pytest.raises(UserError, match="none of its checkpoints verifies"):
        pick_checkpoint("auto", out, warnings.append)
    assert pick_checkpoint("none", out, warnings.append) is None


# ---------------------------------------------------------------------------
# 8. An unreadable checkpoint stops the run; a corrupt one goes to quarantine/
# ---------------------------------------------------------------------------


def _as_mm_wrote_it(out: Path) -> None:
    """copytree copied ckpt.pth as a file of its own: make it the hard link mm makes."""
    (out / "ckpt.pth").unlink()
    os.link(out / f"step_{max(step_files(out)):08d}.pth", out / "ckpt.pth")


def test_unreadable_newer_checkpoint_stops_resume_and_deletes_nothing(setup, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    _as_mm_wrote_it(out)
    newest = out / "step_00000012.pth"
    more = ["train.max_steps=14", "train.lr_change=allow"]  # a longer cosine moves the lr of steps taken
    r = mm_train(setup, out, sets=more, env=mm_env(MM_INJECT_LOAD_FAULT=f"{newest.name}:eio"))
    user_error(r, f"{newest}: cannot read the checkpoint (Input/output error, errno 5 EIO)")
    assert "resuming from" not in r.stderr
    assert step_files(out) == [8, 10, 12] and not (out / "quarantine").exists()
    assert os.path.samefile(out / "ckpt.pth", newest)  # nothing moved, nothing re-pointed
    # The disk is back: the run continues from that newer checkpoint.
    r = ok(mm_train(setup, out, sets=more))
    assert f"resuming from {newest} at step 12" in r.stderr and "skipping" not in r.stderr
    assert load(out / "ckpt.pth")["step"] == 14


def test_corrupt_newer_checkpoint_is_quarantined_never_pruned(setup, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    _as_mm_wrote_it(out)
    newest = out / "step_00000012.pth"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the checksum (or the zip's CRC) fails
    newest.write_bytes(bytes(data))
    # keep_last=1 and three more saves (12, 14, 16): retention runs after each.
    r = ok(mm_train(setup, out, sets=["train.max_steps=16", "train.keep_last=1", "train.lr_change=allow"]))
    assert f"skipping checkpoint: {newest}: " in r.stderr
    quarantined = out / "quarantine" / newest.name
    assert f"moved {newest} to {quarantined}" in r.stderr
    assert f"resuming from {out / 'step_00000010.pth'} at step 10" in r.stderr
    assert quarantined.read_bytes() == bytes(data)  # kept byte for byte
    note = quarantined.with_name(newest.name + ".txt").read_text()
    assert str(newest) in note and "never deletes" in note
    assert step_files(out) == [16] and load(out / "ckpt.pth")["step"] == 16
    assert sorted(p.name for p in (out / "quarantine").iterdir()) == [newest.name, newest.name + ".txt"]


# ---------------------------------------------------------------------------
# 9. A token id >= vocab_size is stopped before the embedding indexes it
# ---------------------------------------------------------------------------


def test_token_id_equal_to_vocab_stops_training_naming_the_store(setup, tmp_path):
    import numpy as np

    from pipeline.params import load_params
    from pipeline.train.run_data import open_train_data, source_weights

    store = tmp_path / "tokens.zarr"
    shutil.copytree(setup.store, store)
    params = load_params(REPO / "params.yaml", ["train.seq_len=32"])
    # The first sample of step 1, as the trainer's sampler draws it (one source of one part here).
    data = open_train_data(store, source_weights(params), params.train, lambda _: None)
    sources, ids = data.sampler.window_ids(0, 1)
    start = int(data.sampler.windows[int(sources[0])].starts(ids)[0])
    (part,) = store.glob(f"{data.names[int(sources[0])]}/part-*")
    tokens = np.memmap(part / "train/tokens/c/0", dtype="<u2", mode="r+")
    tokens[start + 5] = data.store.vocab_size
    tokens.flush()
    del tokens, data
    r = mm_train(setup, tmp_path / "out", data=store, sets=["train.max_steps=2"])
    user_error(r, f"{store}: token id 1024 is not below vocab_size 1024 (a batch of step 1)", "`mm verify`")
    assert not step_files(tmp_path / "out")


# ---------------------------------------------------------------------------
# 10. A non-finite gradient with a finite loss is skipped too
# ---------------------------------------------------------------------------


def test_nan_gradient_with_finite_loss_is_skipped(setup, tmp_path):
    out = tmp_path / "out"
    sets = ["train.max_steps=4", "train.save_interval=4", "train.eval_interval=0"]
    r = ok(mm_train(setup, out, sets=sets, env=mm_env(MM_INJECT_NAN_GRAD_STEPS="3")))
    assert "step 3: non-finite" in r.stderr
    rows = log_rows(out / "train_log.tsv")
    assert rows[2]["loss"] != "nan" and float(rows[2]["loss"]) > 0  # the loss was finite
    assert rows[2]["grad_norm"] == "nan"
    assert [int(row["skipped"]) for row in rows] == [0, 0, 1, 1]
    assert all_finite(load(out / "ckpt.pth")["model"])


# ---------------------------------------------------------------------------
# 11. SIGUSR1 (what SLURM sends with --signal) stops a run like SIGTERM
# ---------------------------------------------------------------------------


def test_sigusr1_stops_at_a_step_boundary_with_a_checkpoint(setup, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(setup, out, sets=["train.max_steps=200", "train.eval_interval=0"]),
                            cwd=setup.cwd, env=mm_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if STEP_LINE.match(line) and int(STEP_LINE.match(line).group(1)) >= 2:
            proc.send_signal(signal.SIGUSR1)
            break
    stderr = "".join(lines) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, (proc.returncode, stderr[-3000:])
    step = int(re.search(r"stop requested: saved step (\d+)", stderr).group(1))
    assert 2 <= step < 200 and load(out / "ckpt.pth")["step"] == step


# ---------------------------------------------------------------------------
# 12. One writer per run directory
# ---------------------------------------------------------------------------


def test_second_run_on_the_same_out_dir_is_refused_until_the_first_dies(setup, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(train_cmd(setup, out, sets=["train.max_steps=100000", "train.eval_interval=0",
                                                         "train.save_interval=100000"]),
                             cwd=setup.cwd, env=mm_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in first.stderr:  # training has started: the lock is held since before torch was imported
            if STEP_LINE.match(line):
                break
        assert (out / ".lock").read_text().strip() == str(first.pid)
        # How long the machine takes to start `mm train` at all (the interpreter, typer parsing the train
        # command's options): on a loaded machine that alone can exceed 2 s, and is not what is tested here.
        t0 = time.perf_counter()
        mm("train", "--help", cwd=setup.cwd)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = mm_train(setup, out, sets=["train.max_steps=2"])
        elapsed = time.perf_counter() - t0
        user_error(second, f"{out}: another mm train (PID {first.pid}) is writing this run directory")
        assert elapsed < max(2.0, startup + 1.0), (elapsed, startup)
        assert first.poll() is None  # the first one never noticed
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    third = ok(mm_train(setup, out, "--resume", "none", sets=["train.max_steps=2", "train.eval_interval=0"]))
    assert "step 2/2" in third.stderr
    assert (out / ".lock").read_text().strip() != str(first.pid)


# ---------------------------------------------------------------------------
# 13. Ctrl-C keeps progress: the first SIGINT stops like SIGTERM (exit 130), a second one at once
# ---------------------------------------------------------------------------


def test_sigint_saves_the_step_it_stopped_at_and_resumes_identically(setup, reference, tmp_path):
    out = tmp_path / "out"
    no_saves = ["train.save_interval=100"]  # every step before 12 is one that would not be saved
    proc = subprocess.Popen(train_cmd(setup, out, sets=no_saves), cwd=setup.cwd, env=mm_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if STEP_LINE.match(line) and int(STEP_LINE.match(line).group(1)) >= 3:
            proc.send_signal(signal.SIGINT)
            break
    stderr = "".join(lines) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    assert "Ctrl-C: finishing this step and saving a checkpoint" in stderr and "Traceback" not in stderr
    step = int(re.search(r"stop requested: saved step (\d+) in .*; rerun with --resume auto", stderr).group(1))
    assert 3 <= step < STEPS and step_files(out) == [step] and load(out / "ckpt.pth")["step"] == step

    r = ok(mm_train(setup, out, sets=no_saves))
    assert f"resuming from {out / f'step_{step:08d}.pth'} at step {step}" in r.stderr
    assert_matches_reference(out, reference)  # bit for bit in fp32, as after SIGTERM


def test_a_second_sigint_stops_at_once():
    from pipeline.train.setup import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.interrupted  # the first: a request, no exception
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; this never finishes
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------
# 14. Starting over never deletes a run
# ---------------------------------------------------------------------------


def test_resume_none_moves_the_earlier_run_aside(setup, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    sets = ["train.max_steps=2", "train.eval_interval=0"]
    r = ok(mm_train(setup, out, "--resume", "none", sets=sets))
    said = [line for line in r.stderr.splitlines() if line.startswith("--resume none: moved")]
    assert len(said) == 1 and f"in {out} (checkpoints up to step 12) to {out / 'superseded'}/" in said[0], r.stderr
    moved = Path(re.search(r" to (\S+); nothing was deleted$", said[0]).group(1))
    assert moved.parent == out / "superseded"
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before
    assert step_files(out) == [2] and load(out / "ckpt.pth")["step"] == 2  # the new run, beside the old
    assert len(log_rows(out / "train_log.tsv")) == 2 and len(log_rows(moved / "train_log.tsv")) == STEPS

    # A second fresh start moves the second run aside too; the first stays where it was.
    ok(mm_train(setup, out, "--resume", "none", sets=sets))
    assert len(list((out / "superseded").iterdir())) == 2 and step_files(moved) == [8, 10, 12]

    # What `dvc repro` leaves (it removed ckpt.pth, its output, which its cache keeps) is not copied again.
    (out / "ckpt.pth").unlink()
    r = ok(mm_train(setup, out, "--resume", "none", sets=sets))
    assert "--resume none: moved" not in r.stderr and len(list((out / "superseded").iterdir())) == 2


# ---------------------------------------------------------------------------
# 14. The loss-spike guard: rollback, abort, the rollback limit, and no false alarms
# ---------------------------------------------------------------------------

SPIKE_RUN = ["train.max_steps=30", "train.spike_window=8", "train.eval_interval=30", "train.save_interval=6",
             "train.keep_last=10", "train.log_interval=100"]


@pytest.fixture(scope="module")
def spike_runs(setup) -> dict:
    """30 steps with the guard at its defaults but an 8-step window: clean; with step 20's update
    injected (rollback, and abort); that run stopped at 24 and resumed; two spikes with one rollback allowed."""
    cases = {
        "clean": ([], {}),
        "rollback": (["train.trackers=tensorboard"], {"MM_INJECT_SPIKE_STEPS": "20"}),
        "abort": (["train.spike_action=abort"], {"MM_INJECT_SPIKE_STEPS": "20"}),
        "split": (["train.stop_after=24"], {"MM_INJECT_SPIKE_STEPS": "20"}),
        "limit": (["train.spike_max_rollbacks=1"], {"MM_INJECT_SPIKE_STEPS": "14,22"}),
    }

    def start(name: str, sets: list, env: dict) -> subprocess.Popen:
        return subprocess.Popen(train_cmd(setup, setup.cwd / f"spike_{name}", sets=[*SPIKE_RUN, *sets]),
                                cwd=setup.cwd, env=mm_env(OMP_NUM_THREADS="1", **env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    done = {}
    names = list(cases)
    for pair in (names[:2], names[2:4], names[4:]):
        procs = {k: start(k, *cases[k]) for k in pair}
        for k, p in procs.items():
            stderr = p.communicate(timeout=600)[1]
            done[k] = subprocess.CompletedProcess(p.args, p.returncode, "", stderr)
    env = mm_env(OMP_NUM_THREADS="1", MM_INJECT_SPIKE_STEPS="20")  # as the first half: the same thread count
    done["resumed"] = subprocess.run(train_cmd(setup, setup.cwd / "spike_split", sets=SPIKE_RUN), cwd=setup.cwd,
                                     env=env, capture_output=True, text=True, timeout=600)
    return done


def spike_rows(out: Path) -> list[dict]:
    lines = (out / "spikes.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def test_a_spike_is_rolled_back_once_its_data_skipped_and_the_run_finishes(setup, spike_runs):
    r = ok(spike_runs["rollback"])
    out, clean = setup.cwd / "spike_rollback", setup.cwd / "spike_clean"
    # Step 20's update was oversized; step 21's loss (computed before its update) shows it.
    (event,) = spike_rows(out)
    assert event["step"] == "21" and event["event"] == "rollback" and event["restored_step"] == "19"
    assert event["discarded_steps"] == "20-21" and event["discarded_samples"] == "76-83"  # 4 samples a step
    assert float(event["loss"]) > 2 * float(event["median"])
    assert "step 21: loss spike" in r.stderr and "rolled back to the state after step 19" in r.stderr
    rows = log_rows(out / "train_log.tsv")
    assert [int(row["step"]) for row in rows] == list(range(1, 31))  # every step logged, the spike included
    assert rows[:20] == log_rows(clean / "train_log.tsv")[:20]  # identical until the injected update
    # Rolled back means the weights of step 19 again: step 22 trains from them on step 22's data.
    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((clean / "metrics.json").read_text())
    assert metrics["rollbacks"] == 1 and metrics["spike_skips"] == 0 and metrics["steps"] == 30
    assert abs(metrics["val_loss"] - reference["val_loss"]) < 0.02 * reference["val_loss"], (metrics, reference)
    assert load(out / "ckpt.pth")["metrics"]["spike_guard"]["rollbacks"] == 1


def test_a_rollback_is_a_row_of_the_trackers(setup, spike_runs):
    pytest.importorskip("tensorboard")
    from tracker_files import tensorboard_history

    (run_dir,) = (setup.cwd / "spike_rollback" / "tb").iterdir()
    history = tensorboard_history(run_dir)
    assert history["spike/rollbacks"] == [(21, 1.0)] and history["spike/discarded_steps"] == [(21, 2.0)]
    assert [s for s, _ in history["train/loss"]] == list(range(1, 31))


def test_a_run_with_the_guard_and_no_spike_has_no_events(setup, spike_runs):
    r = ok(spike_runs["clean"])
    out = setup.cwd / "spike_clean"
    assert spike_rows(out) == [] and "loss spike" not in r.stderr
    assert json.loads((out / "metrics.json").read_text())["rollbacks"] == 0


def test_a_spike_under_abort_exits_1_with_one_line(setup, spike_runs):
    line = user_error(spike_runs["abort"], "step 21: loss spike", "train.spike_action=abort")
    assert spike_runs["abort"].stderr.count("loss spike") == 1, spike_runs["abort"].stderr  # that line only
    assert "lower train.lr" in line
    assert [row["event"] for row in spike_rows(setup.cwd / "spike_abort")] == ["abort"]
    out = setup.cwd / "spike_abort"
    assert not (out / "metrics.json").exists() and max(step_files(out)) == 18  # nothing saved after the spike


def test_more_spikes_than_train_spike_max_rollbacks_abort(setup, spike_runs):
    user_error(spike_runs["limit"], "step 23: loss spike", "after 1 (train.spike_max_rollbacks)")
    assert [row["event"] for row in spike_rows(setup.cwd / "spike_limit")] == ["rollback", "abort"]


def test_a_resume_after_a_rollback_continues_identically(setup, spike_runs):
    ok(spike_runs["split"])
    assert "at step 24" in ok(spike_runs["resumed"]).stderr
    out, ref = setup.cwd / "spike_split", setup.cwd / "spike_rollback"
    assert log_rows(out / "train_log.tsv") == log_rows(ref / "train_log.tsv")
    assert (out / "spikes.tsv").read_text() == (ref / "spikes.tsv").read_text()
    assert_same_state(load(out / "ckpt.pth"), load(ref / "ckpt.pth"))
    assert json.loads((out / "metrics.json").read_text())["rollbacks"] == 1


def _guarded_run(tmp_path: Path, **spike):
    """A real Run around a 1-block model and its AdamW, as setup() builds one, for the guard alone."""
    from pipeline.architecture import build_config
    from pipeline.model.transformer import Transformer
    from pipeline.params import TrainParams
    from pipeline.train.distributed import World
    from pipeline.train.optim import make_optimizer
    from pipeline.train.progress import Display
    from pipeline.train.setup import Run
    from pipeline.train.spike import SpikeGuard

    tp = TrainParams(dtype="fp32", spike_window=4, **spike)
    torch.manual_seed(0)
    model = Transformer(build_config("tiny", 256, {"dim": 32, "n_layers": 1}))
    return Run(tp=tp, world=World(), stop=None, out_dir=tmp_path, spike=SpikeGuard(tp), model=model,
               optimizer=make_optimizer(model, tp, torch.device("cpu")), display=Display(10, 0, 1, enabled=False))


def _guarded_steps(run, losses: list[float]) -> list[tuple[bool, list, list]]:
    """Each step: backward on a fixed batch, the guard judges the given loss, then the optimizer steps.
    Returns (dropped, weights, AdamW's first moments) as the guard left them, before each update."""
    x = torch.arange(32).reshape(2, 16) * 7 % 256
    seen = []
    for step, loss in enumerate(losses, start=1):
        token_loss, _ = run.model(x, targets=x)
        (token_loss / x.numel()).backward()
        run.loss = loss
        dropped = run.spike.judge(run, step)
        seen.append((dropped, [p.detach().clone() for p in run.model.parameters()],
                     [s["exp_avg"].clone() for s in run.optimizer.state.values() if "exp_avg" in s]))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return seen


def test_spike_guard_restores_the_state_its_last_normal_loss_vouched_for(tmp_path):
    run = _guarded_run(tmp_path, spike_lr_factor=0.5, spike_lr_steps=3)
    seen = _guarded_steps(run, [5.0, 4.9, 5.1, 4.8, 4.9, 30.0, 4.7])
    assert [d for d, _, _ in seen] == [False] * 5 + [True, False]
    # Step 5's normal loss vouched for the state after step 4; step 6 spiked: that state is back.
    for a, b in zip(seen[5][1] + seen[5][2], seen[4][1] + seen[4][2], strict=True):  # weights and AdamW state
        assert torch.equal(a, b)
    assert len(seen[5][2]) == len(seen[5][1])
    assert not all(torch.equal(a, b) for a, b in zip(seen[4][1], seen[3][1], strict=True))  # it was not older
    # ... and the spiking step's update changed nothing: step 7 starts from it too.
    for a, b in zip(seen[6][1], seen[4][1], strict=True):
        assert torch.equal(a, b)
    assert run.spike.metrics() == {"rollbacks": 1, "spike_skips": 0}
    assert [run.spike.lr_scale(s) for s in (6, 7, 9, 10)] == [0.5, 0.5, 0.5, 1.0]  # 3 steps after step 6
    # What a checkpoint keeps gives a resumed guard the same window and counters.
    from pipeline.train.spike import SpikeGuard

    again = SpikeGuard(run.tp)
    again.restore(run.spike.state())
    assert again.state() == run.spike.state() and list(again.recent) == [5.1, 4.8, 4.9, 4.7]  # no 30.0


def test_spike_guard_skip_drops_the_update_and_rollback_without_a_state_says_so(tmp_path):
    run = _guarded_run(tmp_path, spike_action="skip")
    seen = _guarded_steps(run, [5.0, 4.9, 5.1, 4.8, 30.0, 4.7])
    assert [d for d, _, _ in seen] == [False] * 4 + [True, False]
    for a, b in zip(seen[5][1], seen[4][1], strict=True):  # the spiking step's update was dropped
        assert torch.equal(a, b)
    assert run.spike.metrics() == {"rollbacks": 0, "spike_skips": 1}

    fresh = _guarded_run(tmp_path, spike_action="rollback")  # e.g. just resumed: a full window, no state kept
    fresh.spike.restore({"recent": [5.0] * 4, "rollbacks": 0, "skips": 0, "lr_low_until": 0})
    with pytest.raises(UserError, match=r"step 1: loss spike with no earlier state to roll back to"):
        _guarded_steps(fresh, [30.0])
