"""Checkpoints: atomic, checksummed, and safe to load.

A checkpoint is one `torch.save`d dict (see `CHECKPOINT_KEYS`) of tensors and
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

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from pipeline.errors import UserError

FORMAT = "mm-checkpoint"
VERSION = 1
LATEST = "ckpt.pth"
STEP_FILE = re.compile(r"step_(\d+)\.pth$")

# What a checkpoint holds:
#   format, version      "mm-checkpoint", 1
#   step                 optimizer steps completed (= the data position, see DESIGN.md)
#   model                fp32 state dict of pipeline.model.Transformer (HF-style names)
#   optimizer, scaler    state dicts (scaler None unless fp16)
#   rng                  torch CPU (and CUDA) RNG states
#   model_config         dataclasses.asdict(ModelConfig)
#   train_config         dataclasses.asdict(TrainParams)
#   data                 tokenizer_sha256, store_fingerprint, vocab_size, seq_len, global_batch
#   tokenizer            {file name: text} of the tokenizer directory, so export needs nothing else
#   metrics              train_loss, val_loss, tokens_seen, skipped_steps, ...
#   checksum             sha256 over everything above
CHECKPOINT_KEYS = (
    "format", "version", "step", "model", "optimizer", "scaler", "rng",
    "model_config", "train_config", "data", "tokenizer", "metrics",
)


def step_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"step_{step:08d}.pth"


def save_checkpoint(state: dict, out_dir: Path, keep_last: int) -> Path:
    """Write a step checkpoint atomically, then move ckpt.pth to it, then prune old ones."""
    state = {k: state[k] for k in CHECKPOINT_KEYS}
    state["checksum"] = state_digest(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = step_path(out_dir, state["step"])
    tmp = out_dir / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(out_dir)
        _point_latest(out_dir, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: saving the checkpoint failed ({e.strerror or e}); the previous checkpoint is intact") from None
    _prune(out_dir, keep_last)
    return path


def _point_latest(out_dir: Path, target: Path) -> None:
    tmp = out_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)  # no copy: ckpt.pth is another name for the newest step file
    except OSError:
        shutil.copyfile(target, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, out_dir / LATEST)
    _fsync_dir(out_dir)


def _prune(out_dir: Path, keep_last: int) -> None:
    steps = sorted(step_checkpoints(out_dir))
    # Never delete the newest: it is the one ckpt.pth names.
    for _, path in steps[: -max(keep_last, 1)]:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        raise UserError(f"{path}: checkpoint format version {state.get('version')} is not supported (this mm reads {VERSION})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise UserError(f"{path}: checkpoint lacks field(s) {', '.join(missing)}")
    if state.get("checksum") != state_digest({k: state[k] for k in CHECKPOINT_KEYS}):
        raise UserError(f"{path}: checksum mismatch, the file is corrupt")
    return state


def find_resumable(out_dir: Path, warn=print) -> dict | None:
    """The newest checkpoint in out_dir that verifies; each one skipped is reported through warn."""
    candidates = sorted(step_checkpoints(out_dir), reverse=True)
    latest = out_dir / LATEST
    if latest.exists():
        candidates.insert(0, (-1, latest))
    for _, path in candidates:
        try:
            state = load_checkpoint(path)
        except UserError as e:
            warn(f"skipping checkpoint: {e}")
            continue
        state["path"] = str(path)
        return state
    return None


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


def model_from_checkpoint(state: dict):
    """The Transformer a checkpoint describes, with its weights loaded strictly."""
    from pipeline.architecture import config_from_dict
    from pipeline.model import Transformer

    model = Transformer(config_from_dict(dict(state["model_config"]), source="checkpoint model_config"))
    model.load_state_dict(state["model"], strict=True)
    return model
