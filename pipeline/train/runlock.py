"""One writer per run directory: an advisory lock on `out_dir/.lock` for the whole run.

Two `mm train` on one out_dir would interleave their log rows and prune each
other's checkpoints. The first takes `fcntl.flock` on out_dir/.lock and writes
its PID there; a second finds the lock taken and stops with one line naming that
PID. The kernel drops the lock when the holder dies, however it dies (kill -9
included), so there is never a stale lock to clean up; the file itself stays,
except in a folder the run created and left holding nothing else (it failed at
start-up): that folder is removed again, lock file and all.

Within one job only one process locks: the `mm train` that launches torchrun
(it passes the locked descriptor on to torchrun, so an orphaned torchrun still
holds it, and sets MM_RUN_LOCK so its ranks know), or rank 0 when torchrun was
started by hand. On several nodes only node 0 locks: out_dir is shared.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

LOCK_FILE = ".lock"
HELD_ENV = "MM_RUN_LOCK"  # the lock path, set by the holder for the processes it launches
_held: dict[str, int] = {}  # lock path → descriptor, while held by this process


@contextmanager
def run_lock(out_dir: Path, enabled: bool = True):
    """Hold out_dir/.lock for the body; UserError naming the holder's PID when another run has it."""
    path = (Path(out_dir) / LOCK_FILE).absolute()
    if not enabled or os.environ.get(HELD_ENV) == str(path):  # off, or the process that launched us holds it
        yield
        return
    made = _missing_dirs(path.parent)  # removed again if the run leaves nothing in them
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            raise UserError(f"{out_dir}: another mm train (PID {holder}) is writing this run directory (lock "
                            f"{LOCK_FILE}); wait for it to finish, stop it, or set train.out_dir elsewhere") from None
        if _same_file(path, fd):  # else a run that failed at start-up removed the file we locked: retry
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[str(path)], os.environ[HELD_ENV] = fd, str(path)
    try:
        yield
    finally:
        del _held[str(path)]
        os.environ.pop(HELD_ENV, None)
        if made and [p.name for p in path.parent.iterdir()] == [LOCK_FILE]:
            # A run that failed at start-up leaves no empty folder behind; unlinked while still held (see above).
            path.unlink()
            for d in made:
                try:
                    d.rmdir()
                except OSError:  # something else was put there meanwhile
                    break
        os.close(fd)  # releases the lock (a launched torchrun that inherited it keeps it until it exits)


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def held_fds() -> tuple[int, ...]:
    """Descriptors of the locks this process holds, for subprocess.Popen(pass_fds=...)."""
    return tuple(_held.values())


def _holder_pid(fd: int) -> str:
    # The holder writes its PID just after locking: a file read in between is still empty.
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "unknown"
