"""Which checkpoint a run continues from, and what happens to the ones it cannot use.

`--resume auto` takes the newest checkpoint in out_dir that verifies. A newer one
that is corrupt (CheckpointCorrupt) is skipped and moved to out_dir/quarantine/
with a note; one that cannot be read (CheckpointUnreadable: EIO, permission,
memory) stops the run instead, because falling back would let retention delete
it later. See docs/reliability.md.
"""

from __future__ import annotations

import fnmatch
import os
import time
from pathlib import Path

from pipeline.atomic import fsync_dir
from pipeline.checkpoint.format import LATEST, STEP_FILE, load_checkpoint, point_latest, step_checkpoints
from pipeline.checkpoint.read import CheckpointCorrupt
from pipeline.errors import UserError

QUARANTINE = "quarantine"


def find_resumable(out_dir: Path, warn=print, quarantine: bool = True) -> dict | None:
    """The newest checkpoint in out_dir that verifies; each one skipped is reported through warn.

    Step files are tried newest first, then ckpt.pth (it is normally a hard link to the
    newest step file, and only matters when the step files are gone). A kill between a step
    file's rename and the ckpt.pth update leaves the step file newer: it is complete, so it wins.

    Only corruption is skipped. A file that cannot be read (CheckpointUnreadable: EIO,
    permission, memory) stops the search with that error: falling back would let retention
    later prune the newer file that is probably fine. Corrupt step files newer than the one
    found are moved to out_dir/quarantine/ with a note (by one process: `quarantine`), out
    of retention's reach; when none verifies, nothing is moved."""
    candidates = [path for _, path in sorted(step_checkpoints(out_dir), reverse=True)]
    if (out_dir / LATEST).exists():
        candidates.append(out_dir / LATEST)
    tried: list[Path] = []
    corrupt: list[tuple[Path, str]] = []
    for path in candidates:
        if any(_same_file(path, t) for t in tried):
            continue  # ckpt.pth and its step file are one file: verify (and report) it once
        tried.append(path)
        try:
            state = load_checkpoint(path)
        except CheckpointCorrupt as e:
            warn(f"skipping checkpoint: {e}")
            corrupt.append((path, str(e)))
            continue
        except UserError:
            if not path.exists():
                continue  # another rank of this job moved it to quarantine/ meanwhile
            raise  # unreadable: stop rather than fall back
        if quarantine:
            for bad, reason in corrupt:
                latest_too = _same_file(out_dir / LATEST, bad)
                moved = quarantine_file(out_dir, bad, reason) if STEP_FILE.search(bad.name) else None
                if moved is not None:
                    warn(f"moved {bad} to {moved}")
                    if latest_too:  # ckpt.pth is another name of the quarantined file: name the good one
                        point_latest(out_dir, path)
        state["path"] = str(path)
        return state
    return None


def pick_checkpoint(resume: str, out_dir: Path, warn, supersede: bool = False) -> dict | None:
    """The checkpoint `--resume` names: none, auto (newest in out_dir that verifies) or a path.

    With `supersede` (the one process that writes out_dir), `none` first moves an earlier run
    with checkpoints aside (`supersede_run`) and says so through warn."""
    if resume == "none":
        moved = supersede_run(out_dir) if supersede else None
        if moved is not None:
            warn(f"--resume none: moved the earlier run in {out_dir} ({moved[1]}) to {moved[0]}; "
                 "nothing was deleted")
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


SUPERSEDED = "superseded"  # also where the trackers move their earlier files (pipeline/train/trackers.py)


# What a run writes in its out_dir (checkpoints, logs, metrics, plots, tracker files, eval results):
# what moves aside. Anything else there (train.out_dir=. holds the project) stays where it is.
RUN_FILES = (LATEST, "step_*.pth", "*.tsv", "metrics.json", "loss.png", QUARANTINE, "tb", "wandb", "swanlog",
             "eval.json", "bench.json", "bench")


def supersede_run(out_dir: Path) -> tuple[Path, str] | None:
    """Move an earlier run out of the way of a fresh one: its files (RUN_FILES) go to
    out_dir/superseded/<time>/, never deleted (the new run would prune its
    checkpoints and cut its logs). Returns (where, what it held), or None when out_dir holds no
    ckpt.pth: every run that saved once has one, unless DVC removed it (its output, kept in its
    cache) before rerunning the stage; the step files left then are not a run to keep a second copy
    of at every `dvc repro`, and logs alone are what a run killed before its first save leaves."""
    if not (out_dir / LATEST).exists():
        return None
    steps = step_checkpoints(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out_dir / SUPERSEDED / stamp, 1
    while target.exists():  # two fresh starts within a second
        target, n = out_dir / SUPERSEDED / f"{stamp}.{n}", n + 1
    target.mkdir(parents=True)
    for path in sorted(out_dir.iterdir()):
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in RUN_FILES):  # not what else out_dir holds
            os.replace(path, target / path.name)
    fsync_dir(target)
    fsync_dir(out_dir)
    last = f"checkpoints up to step {max(s for s, _ in steps)}" if steps else LATEST
    return target, last


def quarantine_file(out_dir: Path, path: Path, reason: str) -> Path | None:
    """Move a corrupt checkpoint to out_dir/quarantine/ with a note saying why; never delete it.

    None when the file is already gone: another rank of the same job moved it first."""
    directory = out_dir / QUARANTINE
    directory.mkdir(exist_ok=True)
    target, n = directory / path.name, 1
    while target.exists():  # an earlier quarantined file of the same step stays too
        target, n = directory / f"{path.stem}.{n}{path.suffix}", n + 1
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    target.with_name(target.name + ".txt").write_text(
        f"{reason}\nmoved here from {out_dir} by mm train at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
        "which resumed from an older checkpoint instead; mm never deletes this file\n", encoding="utf-8")
    fsync_dir(directory)
    fsync_dir(out_dir)
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
