"""Atomic file writes: a reader sees the old file or the new one, never a part of either.

Write to a temporary file in the same directory, flush, fsync it, rename it
over the target, fsync the directory (so the rename itself survives a power
cut). On any error the temporary file is removed and the target is untouched.
Everything the pipeline writes for someone else to read goes through here
(checkpoints have their own writer in pipeline/checkpoint/format.py for fault
injection and torch.save's error reporting, built on the same `fsync_dir`).
Writers that need a file name get one from `staged_file`; a directory
written as a whole (an export, a token store part) is built in `staged_dir`
or published with `publish_dir`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path`, for writers that want a file name (torch.save, safetensors, gguf).

    When the block ends cleanly the file is fsynced and renamed over `path`, and the directory
    fsynced; on any exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; it replaces `path` when the block ends cleanly.

    Text mode writes exactly the characters given (no newline translation)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', not {mode!r}")
    text = {} if mode == "wb" else {"encoding": encoding, "newline": ""}
    with staged_file(path) as tmp, open(tmp, mode, **text) as f:
        yield f


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """An empty temporary directory next to `path`; published over `path` (`publish_dir`) when the block
    ends cleanly, removed on any exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a writer with this pid that was killed
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_file(path, "w", encoding) as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def publish_dir(staged: str | Path, target: str | Path) -> None:
    """Make a fully written directory appear at `target` in one rename (`staged` is a sibling of it).

    Every file and directory under `staged` is fsynced first, so what appears is complete on
    disk. An existing `target` is moved aside first (a directory cannot be renamed over a
    non-empty one) and removed only after the new one is in place; if the rename fails, the old
    one is put back."""
    staged, target = Path(staged), Path(target)
    for path in sorted(staged.rglob("*"), reverse=True):  # files before the directories holding them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(staged)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except OSError:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (POSIX: the directory entry has its own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
