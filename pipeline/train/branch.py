"""Resuming with other learning-rate settings, and branching a run into another out_dir.

A checkpoint records its train config, so the schedule it was trained on is known
(`saved_schedule`; checkpoints older than train.schedule were cosine). On resume
`schedule_change` compares the old and new learning rate of every step:

  unchanged                        nothing to say
  only steps not yet taken differ  accepted, with a note giving the resumed step's lr before → after
                                   and the first step that differs (a longer stable phase, a new min_lr)
  steps already taken differ       the curve would no longer be one schedule: refused in the same
                                   out_dir, naming the ways out; accepted with a note in a branch
                                   or with train.lr_change=allow

A branch is a resume from a checkpoint of another directory (`mm train --resume
out/step_00004000.pth --set train.out_dir=out-decay-4500`): the step is the data
position, so it continues the same data order; its logs start as a copy of the
parent's up to the checkpoint's step (`copy_branch_logs`); the parent's directory is
only read. docs/training.md ("Decay branches") has the recipe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import atomic
from pipeline.errors import UserError
from pipeline.params import TrainParams
from pipeline.train.optim import lr_at

# What lr_at reads, besides the run's length: a change of any of them may move the learning rate.
SCHEDULE_KEYS = ("max_steps", "max_tokens", "epochs", "lr", "min_lr", "warmup_steps", "schedule",
                 "decay_fraction", "decay_steps", "decay_shape")
BRANCH_LOGS = ("train_log.tsv", "val_log.tsv", "spikes.tsv", "perf_log.tsv")  # what a branch starts from


def saved_schedule(train_config: dict) -> TrainParams:
    """A checkpoint's train config as TrainParams; keys it lacks (older checkpoints) take the defaults,
    which are what those runs used (schedule: cosine)."""
    known = {f.name for f in dataclasses.fields(TrainParams)}
    return dataclasses.replace(TrainParams(), **{k: v for k, v in train_config.items() if k in known})


def branch_parent(checkpoint_path: str, out_dir: Path) -> Path | None:
    """The directory a run branches from: the checkpoint's, when it is not out_dir; else None."""
    parent = Path(checkpoint_path).resolve().parent
    return None if parent == Path(out_dir).resolve() else parent


def schedule_change(where: str, step: int, old: TrainParams, old_total: int, new: TrainParams, new_total: int,
                    branch: bool) -> str | None:
    """A note for a resume at `step` that changes the learning rate of later steps, None when nothing
    changes; a UserError when steps already taken would change, unless this is a branch or the new
    params say train.lr_change=allow."""
    changed = [f"train.{k} {getattr(old, k)} → {getattr(new, k)}" for k in SCHEDULE_KEYS
               if getattr(old, k) != getattr(new, k)]
    if not changed and old_total == new_total:
        return None
    what = ", ".join(changed) or f"the run's length ({old_total} → {new_total} steps)"

    def before(s: int) -> float:
        return lr_at(s, old, old_total)

    def after(s: int) -> float:
        return lr_at(s, new, new_total)

    taken = next((s for s in range(step) if before(s) != after(s)), None)
    ahead = next((s for s in range(step, max(old_total, new_total)) if before(s) != after(s)), None)
    if taken is None and ahead is None:
        return None
    here = f"step {step + 1}: lr {before(step):.4g} → {after(step):.4g}"
    if taken is not None and not branch and new.lr_change != "allow":
        raise UserError(
            f"{where}: cannot resume, {what} changes the learning rate of steps already taken "
            f"(step {taken + 1}: {before(taken):.4g} → {after(taken):.4g}), so the curve would jump at the "
            f"resumed {here}; keep the old values, branch into another train.out_dir (it starts from this "
            f"run's first {step} steps and leaves this run as it is), start over with --resume none, or "
            "take the jump with train.lr_change=allow")
    if taken is not None:
        who = "this branch takes" if branch else "train.lr_change=allow: this run takes"
        return (f"note: {what}: {who} the new schedule from {here} (a jump: the first {step} steps keep "
                "the learning rate they were trained with)")
    first = "" if ahead == step else f"; it first differs at step {ahead + 1}: {before(ahead):.4g} → {after(ahead):.4g}"
    return f"note: {what} changes the learning rate of steps not yet taken ({here}{first})"


def copy_branch_logs(parent: Path, out_dir: Path, step: int) -> None:
    """Start a branch's logs as the parent's rows up to `step` (the parent's files are only read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in BRANCH_LOGS:
        source = parent / name
        if not source.is_file():
            continue
        header, *rows = source.read_text().splitlines()
        kept = [r for r in rows if r.split("\t", 1)[0].isdigit() and int(r.split("\t", 1)[0]) <= step]
        atomic.write_text(out_dir / name, "\n".join([header, *kept]) + "\n")


def check_resume_schedule(checkpoint: dict, tp: TrainParams, total_steps: int, resolve_total,
                          out_dir: Path) -> tuple[Path | None, str | None]:
    """At resume: the directory this run branches from (None unless another out_dir), and the note about
    the learning rate (None when it does not change); UserError when it may not change.
    resolve_total(train params) is the run length those params give on this run's data."""
    branch_of = branch_parent(checkpoint["path"], out_dir)
    old = saved_schedule(checkpoint["train_config"])
    change = schedule_change(checkpoint["path"], checkpoint["step"], old, resolve_total(old), tp, total_steps,
                             branch=branch_of is not None)
    return branch_of, change
