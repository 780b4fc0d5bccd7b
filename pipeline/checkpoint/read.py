"""Reading a checkpoint file: a damaged file is told apart from one that cannot be read.

CheckpointCorrupt: the bytes were read and are not a checkpoint (truncated or
damaged zip, foreign or code-running pickle, checksum mismatch). Resume may skip
such a file and quarantine it.

CheckpointUnreadable: the read itself failed (EIO, permission, out of memory).
Nothing is known about the contents, so resume must not fall back to an older
checkpoint: retention would later delete this newer one, which is probably fine.
The run stops with one line naming the file and the errno.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import torch

from pipeline.errors import UserError


class CheckpointCorrupt(UserError):
    """The file was read and is not a valid mm checkpoint: truncated, bit-rotted, foreign, hostile."""


class CheckpointUnreadable(UserError):
    """The file could not be read (permission, I/O error, out of memory): nothing is known about its contents."""


def read_state(path: Path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) of `path`, failures classified as above."""
    # Read through a Python file object that keeps the OSError of a failed read: torch's
    # reader wraps it in a RuntimeError that looks like a damaged zip's.
    reader = None
    try:
        with open(path, "rb") as f:
            reader = _Reader(f, injected_load_fault(path))
            magic = reader.read(4)
            if magic != b"PK\x03\x04":  # torch.save writes a zip archive
                raise _NotZip(f"not a zip archive as torch.save writes; it starts with {magic!r}")
            reader.seek(0)
            state = torch.load(reader, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, code-running pickle: corrupt; failed reads: not
        cause = reader.error if reader is not None and reader.error else e
        if isinstance(cause, MemoryError) or (isinstance(cause, OSError) and (reader is None or reader.error)):
            raise CheckpointUnreadable(f"{path}: cannot read the checkpoint ({_io_reason(cause)}); nothing was "
                                       "changed, fix the cause and rerun") from None
        raise CheckpointCorrupt(f"{path}: not an mm checkpoint ({_why_unloadable(e)})") from None
    return state


def _io_reason(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory while loading it"
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)}, errno {e.errno} {errno.errorcode.get(e.errno, '')}".rstrip()
    return str(e) or e.__class__.__name__


def _why_unloadable(e: Exception) -> str:
    """One clause for why torch.load refused the file (torch's own message runs to paragraphs)."""
    text = str(e)
    if isinstance(e, _NotZip):
        return text
    if "GLOBAL" in text or "Unsupported global" in text:  # a class or function to import: refused unread
        return "it holds objects other than tensors and plain values, refused without running them"
    if isinstance(e, (pickle.UnpicklingError, EOFError)) or "Weights only load failed" in text:
        return "its contents are not what torch.save writes: damaged"
    if isinstance(e, OSError) or "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
        return "not a complete zip archive: truncated or damaged"
    first = text.strip().splitlines()[0] if text.strip() else e.__class__.__name__
    return first[:200]


class _NotZip(Exception):
    pass


class _Reader:
    """The file object torch.load reads through: remembers the OSError of a failed read (see
    read_state), and raises an injected one as a failing disk would."""

    def __init__(self, f, fault: str | None):
        self.f, self.fault, self.error = f, fault, None

    def _io(self, method, *args):
        try:
            if self.fault:  # MM_INJECT_LOAD_FAULT=<file name>:eio|eacces|enomem
                if self.fault == "enomem":
                    raise MemoryError()
                code = errno.EACCES if self.fault == "eacces" else errno.EIO
                raise OSError(code, os.strerror(code), self.f.name)
            return method(*args)
        except (OSError, MemoryError) as e:
            self.error = e
            raise

    def read(self, n: int = -1) -> bytes:
        return self._io(self.f.read, n)

    def readinto(self, b) -> int:
        return self._io(self.f.readinto, b)

    def readline(self, n: int = -1) -> bytes:
        return self._io(self.f.readline, n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)  # an impossible offset (EINVAL) comes from damaged contents

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def injected_load_fault(path: Path) -> str | None:
    """Fault injection for the reliability tests: MM_INJECT_LOAD_FAULT=step_00000012.pth:eio makes
    every read of that file fail with EIO (eacces: permission denied; enomem: MemoryError)."""
    for item in os.environ.get("MM_INJECT_LOAD_FAULT", "").split(","):
        name, _, kind = item.partition(":")
        if name.strip() and name.strip() == path.name:
            return kind.strip() or "eio"
    return None
