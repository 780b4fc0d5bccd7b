"""Checkpoints: atomic, checksummed, and safe to load.

A checkpoint is one `torch.save`d dict (built by `checkpoint_state`) of tensors and
plain Python values only, so `torch.load(weights_only=True)` reads it and a
file crafted to run code when unpickled is refused, never executed.

Writing: serialise to a temporary file in the same directory, flush, fsync,
rename, fsync the directory; only then point `ckpt.pth` at it (a hard link
renamed over the old one). A crash at any moment leaves the previous
checkpoint complete. Each file carries a sha256 of its contents (`checksum`),
so a truncated or bit-rotted file is detected at load, and resume falls back
to the newest checkpoint that verifies (pipeline/train/resume.py).
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
from pipeline.checkpoint.read import CheckpointCorrupt, read_state
from pipeline.errors import UserError

FORMAT = "mm-checkpoint"
VERSION = 1
LATEST = "ckpt.pth"
STEP_FILE = re.compile(r"step_(\d+)\.pth$")

# Optional, checksummed when present (a checkpoint without them still loads):
#   trackers  {"run_name", "ids": {tracker: run id}} so a resume continues the same tracker runs
OPTIONAL_KEYS = ("trackers",)
CHECKPOINT_KEYS = (
    "format", "version", "step", "model", "optimizer", "scaler", "rng",
    "model_config", "train_config", "data", "tokenizer", "metrics",
)


def checkpoint_state(
    step: int, model_state: dict, optimizer_state: dict, scaler, model_config, train_config,
    data: dict, tokenizer: dict[str, str], metrics: dict, trackers: dict | None = None,
) -> dict:
    """What a checkpoint holds (one entry per CHECKPOINT_KEYS; `save_checkpoint` adds the checksum).

    format, version      "mm-checkpoint", 1
    step                 optimizer steps completed (= the data position, see pipeline/data/sampler.py)
    model                fp32 state dict of pipeline.model.transformer.Transformer (HF-style names)
    optimizer, scaler    state dicts (scaler None unless fp16)
    rng                  torch CPU RNG state (nothing in training draws from CUDA's)
    model_config         dataclasses.asdict(ModelConfig)
    train_config         dataclasses.asdict(TrainParams)
    data                 tokenizer_sha256, store_fingerprint, vocab_size, seq_len, global_batch,
                         data_mixture (the schedule in words), sources {name: {weight, train_tokens,
                         tokens_trained}} and segments [{start, weights}] (the data order's schedule,
                         pipeline/data/mixture.py, which a resume continues; both absent in older checkpoints)
    tokenizer            {file name: text} of the tokenizer directory, so export needs nothing else
    metrics              train_loss, val_loss, val_bits_per_byte, their *_by_source, tokens_seen, skipped_steps
    trackers             (optional, see OPTIONAL_KEYS) the tracker runs to continue on resume
    checksum             sha256 over everything above (added when saved)
    """
    state = {
        "format": FORMAT, "version": VERSION, "step": step,
        "model": model_state, "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"torch": torch.get_rng_state()},
        "model_config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(train_config),
        "data": data, "tokenizer": tokenizer, "metrics": metrics,
    }
    if trackers:
        state["trackers"] = trackers
    return state


def step_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"step_{step:08d}.pth"


def save_checkpoint(state: dict, out_dir: Path, keep_last: int, require_finite: bool = False) -> Path:
    """Write a step checkpoint atomically, then move ckpt.pth to it, then prune old ones.

    require_finite: refuse (UserError) when the model or optimizer state holds NaN or inf,
    found while hashing (one pass over the tensors instead of two)."""
    state = _covered(state)
    nonfinite: list[str] = []
    state["checksum"] = state_digest(state, nonfinite if require_finite else None)
    bad = [name for name in nonfinite if name.startswith(("model", "optimizer"))]
    if bad:
        raise UserError(f"step {state['step']}: the weights or optimizer state hold non-finite values "
                        f"({bad[0]}); refusing to save a checkpoint")
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
        point_latest(out_dir, path)
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
    """Fault injection for the reliability tests, like MM_INJECT_NAN_STEPS in pipeline/train/setup.py.

    MM_INJECT_SAVE_FAULT=6:kill,9:enospc: while saving step 6 the process SIGKILLs itself
    after the temporary file is complete but before the rename; saving step 9 fails with
    ENOSPC after 64 KiB, as on a full disk."""
    for item in os.environ.get("MM_INJECT_SAVE_FAULT", "").split(","):
        at, _, kind = item.partition(":")
        if at.strip() and int(at) == step:
            return kind.strip()
    return None


def point_latest(out_dir: Path, target: Path) -> None:
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
    """Load and verify one checkpoint; every failure is a UserError naming the file.

    CheckpointCorrupt when the bytes were read and are wrong; CheckpointUnreadable when
    they could not be read. Only the first may make resume fall back to an older checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    state = read_state(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{path}: not an mm checkpoint (no format '{FORMAT}')")
    if state.get("version") != VERSION:
        raise CheckpointCorrupt(f"{path}: checkpoint format version {state.get('version')} is not supported "
                                f"(this mm reads {VERSION})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointCorrupt(f"{path}: checkpoint lacks field(s) {', '.join(missing)}")
    if state.get("checksum") != state_digest(_covered(state)):
        raise CheckpointCorrupt(f"{path}: checksum mismatch, the file is corrupt")
    return state


def check_compatible(checkpoint: dict, model_config, fingerprints: dict, allow_data_change: bool) -> None:
    """Refuse to resume into a different model, tokenizer, data or batch, naming each field."""
    where = checkpoint["path"]
    differing = [f"model.{k} ({checkpoint['model_config'].get(k)} → {v})"
                 for k, v in dataclasses.asdict(model_config).items() if checkpoint["model_config"].get(k) != v]
    data_fields = ["tokenizer_sha256", "vocab_size", "seq_len", "global_batch"]
    if not allow_data_change:
        data_fields += ["store_fingerprint", "data_mixture"]
    differing += [f"{k} ({_short(checkpoint['data'].get(k), k)} → {_short(fingerprints[k], k)})"
                  for k in data_fields if checkpoint["data"].get(k) != fingerprints[k]]
    # The window permutations are keyed on train.seed: a new seed reorders the data from the resumed step
    # on, so windows of the current pass repeat or go unseen. Older checkpoints have it in train_config.
    saved_seed = checkpoint["data"].get("seed", checkpoint["train_config"].get("seed"))
    if "seed" in fingerprints and saved_seed != fingerprints["seed"] and not allow_data_change:
        differing.append(f"train.seed ({saved_seed} → {fingerprints['seed']})")
    if differing:
        data_changed = any(d.startswith(("store_", "data_mixture", "train.seed")) for d in differing)
        hint = " (new data on purpose? pass --allow-data-change)" if data_changed else ""
        raise UserError(f"{where}: cannot resume, the run differs in {', '.join(differing)}{hint}; {WAYS_OUT}")


# What a refused resume can do instead (also pipeline/train/setup.py's optimizer check).
WAYS_OUT = "keep the old values, start over with --resume none, or train into another train.out_dir"


def _short(value, key: str = "") -> str:
    """A hash cut to 12 characters; the mixture (weights in words, pipeline/data/mixture.py) whole."""
    return value[:12] if isinstance(value, str) and key != "data_mixture" else str(value)


def all_finite(state) -> bool:
    """No NaN or inf in any floating tensor of a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        if not state.is_floating_point() or not state.numel():
            return True
        lo, hi = torch.aminmax(state.detach())  # NaN propagates into both: ~9x faster than isfinite().all()
        return math.isfinite(lo.item()) and math.isfinite(hi.item())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return not isinstance(state, float) or math.isfinite(state)


def _covered(state: dict) -> dict:
    """The fields the checksum covers: every required key, and the optional ones present."""
    return {k: state[k] for k in (*CHECKPOINT_KEYS, *OPTIONAL_KEYS) if k in state}


def state_digest(obj, nonfinite: list[str] | None = None) -> str:
    """sha256 over a nested structure of dicts, lists, tensors and scalars, in a canonical order.

    With a `nonfinite` list, the names of floating tensors holding NaN or inf are appended
    to it in the same walk over the state (a save used to walk it twice more, with
    torch.isfinite, which is ~9x slower than the min/max reduction used here)."""
    h = hashlib.sha256()
    _feed(h, obj, nonfinite, "")
    return h.hexdigest()


def _feed(h, obj, nonfinite: list[str] | None, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the tensor's own buffer: no bytes copy
            if nonfinite is not None and t.is_floating_point():
                lo, hi = torch.aminmax(t)  # NaN propagates into both, inf into one
                if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
                    nonfinite.append(where)
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key], nonfinite, f"{where}.{key}" if where else str(key))
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for i, item in enumerate(obj):
            _feed(h, item, nonfinite, f"{where}[{i}]")
        h.update(b"]")
    else:
        if nonfinite is not None and isinstance(obj, float) and not math.isfinite(obj):
            nonfinite.append(where)
        h.update(repr(obj).encode())


def model_config(state: dict, source: str = "checkpoint"):
    """The ModelConfig a checkpoint describes, checked field by field."""
    from pipeline.architecture import config_from_dict

    return config_from_dict(dict(state["model_config"]), source=f"{source} model_config")


def model_from_checkpoint(state: dict):
    """The Transformer a checkpoint describes, with its weights loaded strictly."""
    from pipeline.model.transformer import Transformer

    model = Transformer(model_config(state))
    model.load_state_dict(state["model"], strict=True)
    return model
