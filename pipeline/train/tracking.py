"""Experiment tracking for a training run: which trackers, what they get, and their failures.

`train.trackers` names them (pipeline/train/trackers.py has one class each). Rank 0
alone opens them. What they receive:

  at the start   the run's description (`run_description`): full params, model size
                 and FLOPs/token, data fingerprint, world size, precision, mm version
                 and commit; W&B and SwanLab take it as the run config, TensorBoard
                 as text
  every step     each train_log.tsv and perf_log.tsv column as `train/<column>`
                 (perf_log.tsv: train/mfu, train/peak_memory_mb); each val_log.tsv
                 column as `val/<column>`
  at the end     the final metrics and samples generated from fixed prompts (text)

The metrics of one step are gathered and handed over as one row when the next
step begins (or at a checkpoint, or the end): W&B commits a step once.

A tracker that raises is reported once and dropped; training and the TSV files go
on. The TSVs stay the record: on resume each tracker that starts with an empty
history (see pipeline/train/trackers.py) is given the steps up to the resumed one from
train_log.tsv, perf_log.tsv and val_log.tsv, so it shows one curve, one value per step,
for every metric it was given live (an empty cell, a column an earlier row lacked, is
left out).

The run's identity (its name and each tracker's run id) is kept in every
checkpoint (`state()`), so `--resume auto` continues the same runs and
`--resume none` starts new ones.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import UserError

SAMPLE_PROMPTS = ("def ", "The ", "import ")  # fixed, so samples of different runs compare


def check_trackers(names: list[str]) -> None:
    """Before any work: every name is known and its library installed, else one UserError naming the fix."""
    from pipeline.train.trackers import BACKENDS

    for name in names:
        if name not in BACKENDS:
            raise UserError(f"train.trackers: unknown tracker '{name}' (known: {', '.join(BACKENDS)})")
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.trackers: {name} is not installed; install it with: {BACKENDS[name].install}")


def default_run_name(out_dir: Path) -> str:
    """out_dir and a timestamp: `out-20261129-104502` (tracking.run_name overrides)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(out_dir).resolve().name).strip("-") or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


class Trackers:
    """The trackers of one invocation; the empty set (the default) is false and does nothing."""

    def __init__(self, names: list[str] = (), out_dir: Path = Path("."), project: str = "", run_name: str = "",
                 warn=print):
        self.names, self.out_dir, self.project, self.run_name, self.warn = names, Path(out_dir), project, run_name, warn
        self.active: list = []
        self.ids: dict[str, str] = {}
        self.pending_step, self.pending = None, {}

    def __bool__(self) -> bool:
        return bool(self.active)

    # ------------------------------------------------------------------ start
    def start(self, saved: dict | None, start_step: int, description: dict) -> None:
        """Open every tracker, continuing the runs named in `saved` (a checkpoint's "trackers")."""
        from pipeline.train.trackers import BACKENDS

        saved = saved or {}
        self.run_name = saved.get("run_name") or self.run_name
        backfill = []
        for name in self.names:
            tracker = BACKENDS[name](self.out_dir, self.project, self.run_name, description)
            try:
                self.ids[name], empty = tracker.start(saved.get("ids", {}).get(name), start_step)
            except Exception as e:  # a tracker never stops training: not even a failing start
                self._drop(tracker, "start", e)
                continue
            self.active.append(tracker)
            if empty and start_step:
                backfill.append(tracker)
        if backfill:
            self._backfill(backfill, start_step)

    def _backfill(self, trackers: list, upto: int) -> None:
        """Re-log steps 1..upto from the TSVs (already cut back to upto) into trackers that start empty."""
        from pipeline.train.progress import read_log

        rows: dict[int, dict] = {}
        for file, prefix in (("train_log.tsv", "train"), ("perf_log.tsv", "train"), ("val_log.tsv", "val")):
            path = self.out_dir / file
            for row in read_log(path) if path.exists() else []:
                step = int(row.pop("step"))
                if step <= upto:
                    rows.setdefault(step, {}).update({f"{prefix}/{k}": v for k, v in row.items()})
        for step in sorted(rows):
            for tracker in trackers:
                if tracker in self.active:
                    self._call(tracker, "log", step, rows[step])

    # ------------------------------------------------------------------ during the run
    def log_row(self, step: int, prefix: str, row: dict) -> None:
        """A TSV row (its step column dropped) as `prefix/<column>`."""
        if self.active:
            self.log(step, {f"{prefix}/{k}": v for k, v in row.items() if k != "step"})

    def log(self, step: int, metrics: dict) -> None:
        """Add metrics to step `step`'s row; the row goes out once a later step begins."""
        if not self.active:
            return
        if self.pending_step is not None and step != self.pending_step:
            self.flush_row()
        self.pending_step = step
        self.pending.update(metrics)

    def flush_row(self) -> None:
        if self.pending_step is not None:
            row = {k: float(v) for k, v in self.pending.items() if v is not None}
            for tracker in list(self.active):
                self._call(tracker, "log", self.pending_step, row)
        self.pending_step, self.pending = None, {}

    def log_text(self, step: int, key: str, text: str) -> None:
        self.flush_row()
        for tracker in list(self.active):
            self._call(tracker, "log_text", step, key, text)

    def flush(self) -> None:
        """At a checkpoint: everything up to it is handed over and written out."""
        self.flush_row()
        for tracker in list(self.active):
            self._call(tracker, "flush")

    def state(self) -> dict:
        """What a checkpoint keeps so that a resume continues these runs."""
        return {"run_name": self.run_name, "ids": dict(self.ids)} if self.names else {}

    def finish(self, summary: dict | None = None) -> None:
        """Close every tracker (the cleanup calls this however the run ends; a second call does nothing)."""
        self.flush_row()
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in (summary or {}).items()}
        for tracker in list(self.active):
            self._call(tracker, "finish", clean)
        self.active = []

    def _call(self, tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as e:
            self._drop(tracker, method, e)

    def _drop(self, tracker, method: str, error: Exception) -> None:
        if tracker in self.active:
            self.active.remove(tracker)
            try:  # best effort: write out what it holds and release its files
                tracker.finish({})
            except Exception:
                pass
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        self.warn(f"warning: tracker {tracker.name} failed in {method} ({error.__class__.__name__}: {reason}); "
                  "it is dropped for the rest of the run, training goes on and the TSV logs stay complete")


# ---------------------------------------------------------------------------
# Wiring into a training run (pipeline/train/loop.py)
# ---------------------------------------------------------------------------


def open_trackers(run, params, cleanup) -> None:
    """Rank 0 starts the trackers train.trackers names (continuing the checkpoint's runs); the
    cleanup closes them however the run ends. With none named, nothing is imported or started."""
    if not (run.world.is_main and params.train.trackers):
        return
    from dataclasses import asdict

    from pipeline.architecture import flops_per_token

    run.trackers = Trackers(params.train.trackers, run.out_dir, params.tracking.project or Path.cwd().name,
                            params.tracking.run_name or default_run_name(run.out_dir), run.display.message)
    cleanup.callback(run.trackers.finish)
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    description = run_description(asdict(params), asdict(run.model_config), n_params,
                                  flops_per_token(run.model_config, run.tp.seq_len), run.fingerprints,
                                  run.world.size, str(run.amp_dtype).removeprefix("torch."))
    run.trackers.start(run.tracker_state, run.start_step, description)


def finish_trackers(run, step: int, metrics: dict) -> None:
    """Rank 0 at the end: samples from the fixed prompts, the final metrics, close."""
    if not run.trackers:
        return
    if run.tp.parallel != "fsdp":  # FSDP's shards cannot generate on rank 0 alone
        run.trackers.log_text(step, "samples", sample_texts(run.raw_model, run.tokenizer_files))
    run.trackers.finish(metrics)


# ---------------------------------------------------------------------------
# What the trackers are told
# ---------------------------------------------------------------------------


def run_description(params: dict, model_config: dict, n_params: int, flops_per_token: int, data: dict,
                    world_size: int, precision: str) -> dict:
    """Logged once at the start: everything needed to know what this run is."""
    return {
        "params": params,
        "model": {**model_config, "parameters": n_params, "flops_per_token": flops_per_token},
        "data": data, "world_size": world_size, "precision": precision, "mm": mm_version(),
    }


def mm_version() -> dict:
    """The installed mm version and, in a git checkout, its commit (and whether it has local edits)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        info = {"version": version("mm")}
    except PackageNotFoundError:
        info = {"version": None}
    repo = Path(__file__).resolve().parents[2]  # pipeline/train/tracking.py → the checkout
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    info["commit"] = commit or None
    info["dirty"] = bool(dirty) if commit else None
    return info


def peak_memory_mb(device) -> float:
    """CUDA: the most memory torch has allocated; CPU: the process's peak resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**20 if sys.platform == "darwin" else 2**10)


def sample_texts(model, tokenizer_files: dict, max_new_tokens: int = 48) -> str:
    """Greedy continuations of SAMPLE_PROMPTS (the model is put back into training mode after)."""
    from pipeline.data.tokenizer import tokenizer_from_files
    from pipeline.evaluate.generate import generate
    from pipeline.export.loading import LoadedModel

    tokenizer, info = tokenizer_from_files(tokenizer_files, "checkpoint tokenizer")
    loaded = LoadedModel(model, tokenizer, info["bos_id"], info["eos_id"], "checkpoint")
    was_training = model.training
    model.eval()
    try:
        parts = [f"{prompt!r} → {''.join(generate(loaded, prompt, max_new_tokens, temperature=0.0))!r}"
                 for prompt in SAMPLE_PROMPTS]
    finally:
        model.train(was_training)
    return "\n\n".join(parts)
