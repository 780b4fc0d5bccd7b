"""Checkpoints: atomic, checksummed, and safe to load.

A checkpoint is one `torch.save`d dict (built by `checkpoint_state`) of tensors and
plain Python values only, so `torch.load(weights_only=True)` reads it and a
file crafted to run code when unpickled is refused, never executed.

Writing: serialise to a temporary file in the same directory, flush, fsync,
rename, fsync the directory; only then point `ckpt.pth` at it (a hard link
renamed over the old one). A crash at any moment leaves the previous
checkpoint complete. Each file carries a sha256 of its contents (`checksum`),
so a truncated or bit-rotted file is detected at load, and resume falls back
to the newest checkpoint that verifies.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import os
import re
import shutil
import signal
from pathlib import Path

import torch

from pipeline.atomic import fsync_dir
from pipeline.errors import UserError

FORMAT = "mm-checkpoint"
VERSION = 1
LATEST = "ckpt.pth"
STEP_FILE = re.compile(r"step_(\d+)\.pth$")

CHECKPOINT_KEYS = (
    "format", "version", "step", "model", "optimizer", "scaler", "rng",
    "model_config", "train_config", "data", "tokenizer", "metrics",
)


def checkpoint_state(
    step: int, model_state: dict, optimizer_state: dict, scaler, model_config, train_config,
    data: dict, tokenizer: dict[str, str], metrics: dict,
) -> dict:
    """What a checkpoint holds (one entry per CHECKPOINT_KEYS; `save_checkpoint` adds the checksum).

    format, version      "mm-checkpoint", 1
    step                 optimizer steps completed (= the data position, see pipeline/sampler.py)
    model                fp32 state dict of pipeline.model.Transformer (HF-style names)
    optimizer, scaler    state dicts (scaler None unless fp16)
    rng                  torch CPU RNG state (nothing in training draws from CUDA's)
    model_config         dataclasses.asdict(ModelConfig)
    train_config         dataclasses.asdict(TrainParams)
    data                 tokenizer_sha256, store_fingerprint, vocab_size, seq_len, global_batch
    tokenizer            {file name: text} of the tokenizer directory, so export needs nothing else
    metrics              train_loss, val_loss, tokens_seen, skipped_steps, ...
    checksum             sha256 over everything above (added when saved)
    """
    return {
        "format": FORMAT, "version": VERSION, "step": step,
        "model": model_state, "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"torch": torch.get_rng_state()},
        "model_config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(train_config),
        "data": data, "tokenizer": tokenizer, "metrics": metrics,
    }


def step_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"step_{step:08d}.pth"


def save_checkpoint(state: dict, out_dir: Path, keep_last: int) -> Path:
    """Write a step checkpoint atomically, then move ckpt.pth to it, then prune old ones."""
    state = {k: state[k] for k in CHECKPOINT_KEYS}
    state["checksum"] = state_digest(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = step_path(out_dir, state["step"])
    _remove_stale_tmp(out_dir)  # a writer killed mid-save leaves its tmp file: free that space first
    tmp = out_dir / f".{path.name}.tmp-{os.getpid()}"
    fault = injected_save_fault(state["step"])
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f, fail_after=64 << 10 if fault == "enospc" else None)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        if fault == "kill":  # the complete tmp file exists, the rename has not happened
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
        fsync_dir(out_dir)
        _point_latest(out_dir, path)
    except (OSError, RuntimeError) as e:
        # torch.save turns the OSError of a failed write (ENOSPC, EIO) into a RuntimeError
        # ("unexpected pos"); the writer kept the real one.
        cause = (writer.error if writer is not None and writer.error else None) or e
        tmp.unlink(missing_ok=True)
        if isinstance(cause, OSError) and cause.errno:
            reason = os.strerror(cause.errno)
        else:
            reason = str(cause).splitlines()[0][:200]
        raise UserError(f"{path}: saving the checkpoint failed ({reason}); the previous checkpoint is intact") from None
    _prune(out_dir, keep_last, state["step"])
    return path


class _Writer:
    """The file object torch.save writes through: remembers the OSError that torch.save hides."""

    def __init__(self, f, fail_after: int | None = None):
        self.f, self.fail_after, self.written, self.error = f, fail_after, 0, None

    def write(self, data) -> int:
        try:
            if self.fail_after is not None and self.written + len(data) > self.fail_after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # MM_INJECT_SAVE_FAULT=<step>:enospc
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def injected_save_fault(step: int) -> str | None:
    """Fault injection for the reliability tests, like MM_INJECT_NAN_STEPS in pipeline/run_setup.py.

    MM_INJECT_SAVE_FAULT=6:kill,9:enospc: while saving step 6 the process SIGKILLs itself
    after the temporary file is complete but before the rename; saving step 9 fails with
    ENOSPC after 64 KiB, as on a full disk."""
    for item in os.environ.get("MM_INJECT_SAVE_FAULT", "").split(","):
        at, _, kind = item.partition(":")
        if at.strip() and int(at) == step:
            return kind.strip()
    return None


def _point_latest(out_dir: Path, target: Path) -> None:
    tmp = out_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(target, tmp)  # no copy: ckpt.pth is another name for the newest step file
        except OSError:
            shutil.copyfile(target, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out_dir / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)


def _prune(out_dir: Path, keep_last: int, saved_step: int) -> None:
    """Keep the newest keep_last step files up to the one just saved, which is never deleted.

    Step files newer than it belong to an abandoned future (a resume from an older
    checkpoint, or a corrupt file that resume skipped): the run being saved replaces
    them, so they go, as train_log.tsv is cut back on resume."""
    steps = sorted(step_checkpoints(out_dir))
    older = [path for step, path in steps if step <= saved_step]
    stale = [path for step, path in steps if step > saved_step]
    for path in older[: -max(keep_last, 1)] + stale:
        path.unlink(missing_ok=True)


def _remove_stale_tmp(out_dir: Path) -> None:
    for path in out_dir.glob(".*.tmp-*"):
        if STEP_FILE.search(path.name.partition(".tmp-")[0]) or path.name.startswith(f".{LATEST}.tmp-"):
            path.unlink(missing_ok=True)


def step_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in out_dir.glob("step_*.pth"):
        m = STEP_FILE.search(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return found


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and verify one checkpoint; every failure is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, code-running pickle: all refused here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{path}: not a loadable mm checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an mm checkpoint (no format '{FORMAT}')")
    if state.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint format version {state.get('version')} is not supported "
                        f"(this mm reads {VERSION})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise UserError(f"{path}: checkpoint lacks field(s) {', '.join(missing)}")
    if state.get("checksum") != state_digest({k: state[k] for k in CHECKPOINT_KEYS}):
        raise UserError(f"{path}: checksum mismatch, the file is corrupt")
    return state


def find_resumable(out_dir: Path, warn=print) -> dict | None:
    """The newest checkpoint in out_dir that verifies; each one skipped is reported through warn.

    Step files are tried newest first, then ckpt.pth (it is normally a hard link to the
    newest step file, and only matters when the step files are gone). A kill between a step
    file's rename and the ckpt.pth update leaves the step file newer: it is complete, so it wins."""
    candidates = [path for _, path in sorted(step_checkpoints(out_dir), reverse=True)]
    if (out_dir / LATEST).exists():
        candidates.append(out_dir / LATEST)
    tried: list[Path] = []
    for path in candidates:
        if any(_same_file(path, t) for t in tried):
            continue  # ckpt.pth and its step file are one file: verify (and report) it once
        tried.append(path)
        try:
            state = load_checkpoint(path)
        except UserError as e:
            warn(f"skipping checkpoint: {e}")
            continue
        state["path"] = str(path)
        return state
    return None


def pick_checkpoint(resume: str, out_dir: Path, warn) -> dict | None:
    """The checkpoint `--resume` names: none, auto (newest in out_dir that verifies) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        if not out_dir.exists():
            return None
        state = find_resumable(out_dir, warn)
        if state is None and (step_checkpoints(out_dir) or (out_dir / LATEST).exists()):
            # Never quietly start a long run over because its checkpoints are damaged.
            raise UserError(f"{out_dir}: none of its checkpoints verifies (reasons above); move them away, "
                            "or pass --resume none to start over")
        return state
    state = load_checkpoint(resume)
    state["path"] = resume
    return state


def check_compatible(checkpoint: dict, model_config, fingerprints: dict, allow_data_change: bool) -> None:
    """Refuse to resume into a different model, tokenizer, data or batch, naming each field."""
    where = checkpoint["path"]
    differing = [f"model.{k} ({checkpoint['model_config'].get(k)} → {v})"
                 for k, v in dataclasses.asdict(model_config).items() if checkpoint["model_config"].get(k) != v]
    data_fields = ["tokenizer_sha256", "vocab_size", "seq_len", "global_batch"]
    if not allow_data_change:
        data_fields += ["store_fingerprint", "data_mixture"]
    differing += [f"{k} ({_short(checkpoint['data'].get(k))} → {_short(fingerprints[k])})"
                  for k in data_fields if checkpoint["data"].get(k) != fingerprints[k]]
    if differing:
        data_changed = any(d.startswith(("store_", "data_mixture")) for d in differing)
        hint = " (new data on purpose? pass --allow-data-change)" if data_changed else ""
        raise UserError(f"{where}: cannot resume, the run differs in {', '.join(differing)}{hint}")


def _short(value) -> str:
    return value[:12] if isinstance(value, str) else str(value)


def all_finite(state) -> bool:
    """No NaN or inf in any floating tensor of a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return not isinstance(state, float) or math.isfinite(state)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def state_digest(obj) -> str:
    """sha256 over a nested structure of dicts, lists, tensors and scalars, in a canonical order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def model_config(state: dict, source: str = "checkpoint"):
    """The ModelConfig a checkpoint describes, checked field by field."""
    from pipeline.architecture import config_from_dict

    return config_from_dict(dict(state["model_config"]), source=f"{source} model_config")


def model_from_checkpoint(state: dict):
    """The Transformer a checkpoint describes, with its weights loaded strictly."""
    from pipeline.model import Transformer

    model = Transformer(model_config(state))
    model.load_state_dict(state["model"], strict=True)
    return model
