"""Writing the token store: zarr.json documents, chunk files appended in order, then published atomically.

The layout (names, attributes, checks) is defined in `pipeline.data.store.layout`,
shared with the reader; this module writes it, so that a store on disk is always
whole:

- a part is written under a hidden temporary name in its source's directory,
  then `pipeline.atomic.publish_dir` fsyncs every file and directory and renames
  it into place (fsyncing the directory again), so a part that exists is
  complete, and a crash leaves only a hidden directory that the next writer of
  that part removes, or, when the crash came between publish_dir's two renames,
  puts back (`clear_stale`);
- the root and source groups are created if missing by linking a finished
  file into place (never overwriting one another writer made), so writers of
  different parts of one store never contend;
- one part has one writer at a time: an advisory `fcntl.flock` on a hidden lock
  file next to it; a second writer is refused with the PID of the first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import fsync_dir
from pipeline.data.readers import REASONS
from pipeline.data.sources import SOURCE_NAME
from pipeline.errors import UserError

FIRST_LINES_KEPT = 5
"""Line numbers remembered per rejection reason."""


# --------------------------------------------------------------------------- zarr.json and chunk sizes
# `mm tokenize` writes the arrays itself: chunk files are raw little-endian tokens and
# zarr.json documents are the ones zarr-python 3 writes for these arrays.

CHUNK_TOKENS = 2**24
"""Tokens per chunk file (32 MiB of uint16): large, so the trainer maps few files."""
OFFSET_CHUNK = 2**21
"""Entries per doc_offsets chunk (16 MiB of int64)."""


def group_document(attrs: dict) -> dict:
    """The zarr.json of a Zarr v3 group with these attributes."""
    return {"attributes": attrs, "zarr_format": 3, "node_type": "group"}


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_metadata(store: Path, attrs: dict, dtype: str, shapes: dict) -> None:
    """zarr.json for the group and every array, as the Zarr v3 spec defines them.

    Written directly (the same documents zarr-python 3 writes for these arrays)
    rather than through zarr-python, whose import alone costs a second or more
    on every run; the tests read every store back with `zarr.open_group`.
    """

    def write(path: Path, meta: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "zarr.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write(store, group_document(attrs))
    for name, arrays in shapes.items():
        write(store / name, group_document({}))
        for arr, (length, chunk) in arrays.items():
            write(store / name / arr, {
                "shape": [length],
                "data_type": dtype if arr == "tokens" else "int64",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0,
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "attributes": {},
                "zarr_format": 3,
                "node_type": "array",
                "storage_transformers": [],
            })


# --------------------------------------------------------------------------- chunk files


class ChunkWriter:
    """Appends a 1-D array as raw little-endian chunk files `DIR/c/0`, `DIR/c/1`, ...,
    hashing each file as it is written (`sha256`: {"<name>/c/<i>": hex})."""

    def __init__(self, directory: Path, dtype: np.dtype, chunk_len: int, name: str = ""):
        self.dir = directory / "c"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_len = chunk_len
        self.name = name
        self.n = 0
        self.index = 0
        self.in_chunk = 0
        self.f = None
        self.sha = None
        self.sha256: dict[str, str] = {}

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        while arr.size:
            if self.f is None:
                self.f = open(self.dir / str(self.index), "wb")
                self.sha = hashlib.sha256()
                self.in_chunk = 0
            take = min(self.chunk_len - self.in_chunk, arr.size)
            b = arr[:take].tobytes()
            self.f.write(b)
            self.sha.update(b)
            self.in_chunk += take
            self.n += take
            arr = arr[take:]
            if self.in_chunk == self.chunk_len:
                self._close()
                self.index += 1

    def _close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        self.sha256[f"{self.name}/c/{self.index}"] = self.sha.hexdigest()

    def finish(self) -> tuple[int, int]:
        """Close; returns (length, chunk shape). Pads a partial last chunk when there are several."""
        if self.f is not None:
            if self.index > 0:  # several chunks: the last is stored full size (spec), zeros as a sparse tail
                pad = (self.chunk_len - self.in_chunk) * self.dtype.itemsize
                self.f.flush()
                self.f.truncate(self.chunk_len * self.dtype.itemsize)
                zeros = bytes(min(pad, 1 << 22))
                while pad > 0:
                    self.sha.update(zeros[: min(pad, len(zeros))])
                    pad -= len(zeros)
            self._close()
            self.index += 1
        if self.n == 0:
            return 0, self.chunk_len
        if self.index == 1:
            return self.n, self.n  # one chunk holding exactly the data: no padding
        return self.n, self.chunk_len


@dataclass
class SplitWriter:
    tokens: ChunkWriter
    offsets: ChunkWriter
    docs: int = 0
    bytes: int = 0
    end: int = 0


@dataclass
class Rejects:
    counts: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lst = self.first.setdefault(reason, [])
        if len(lst) < FIRST_LINES_KEPT:
            lst.append(where)

    def as_attrs(self) -> dict:
        return {r: {"count": self.counts[r], "first_lines": self.first[r]} for r in REASONS if r in self.counts}


class PartWriter:
    """The arrays and counts of the part being written, fed with worker results in input order."""

    def __init__(self, directory: Path, dtype: str, chunk_tokens: int, strict: bool):
        self.splits = {
            name: SplitWriter(ChunkWriter(directory / name / "tokens", dtype, chunk_tokens, f"{name}/tokens"),
                         ChunkWriter(directory / name / "doc_offsets", "int64", OFFSET_CHUNK,
                                     f"{name}/doc_offsets"))
            for name in ("train", "val")
        }
        for sp in self.splits.values():
            sp.offsets.append(np.zeros(1, dtype=np.int64))
        self.rejects = Rejects()
        self.strict = strict
        self.lines = 0
        self.tokens = 0

    def consume(self, res: dict, path: Path, name: str) -> None:
        """Append one worker result for input file `path` (`name` in the attributes)."""
        for reason, where in res["rejects"]:
            if self.strict:
                what = "row" if where.startswith("row") else "line"
                raise UserError(f"{path}:{where}: rejected {what} ({reason.replace('_', ' ')})")
            self.rejects.add(reason, f"{name}:{where}")
        self.lines += res["lines"]
        for i, sp in enumerate(self.splits.values()):
            toks, lens = res["tokens"][i], res["lens"][i]
            if lens.size:
                sp.tokens.append(toks)
                sp.offsets.append(sp.end + np.cumsum(lens))
                sp.end += int(toks.size)
                sp.docs += int(lens.size)
                self.tokens += int(toks.size)
            sp.bytes += res["bytes"][i]

    def finish(self) -> tuple[dict, dict, dict]:
        """Close the chunk files → (array shapes, counts, chunk sha256 by file)."""
        shapes, hashes = {}, {}
        for name, sp in self.splits.items():
            shapes[name] = {"tokens": sp.tokens.finish(), "doc_offsets": sp.offsets.finish()}
            hashes.update(sp.tokens.sha256)
            hashes.update(sp.offsets.sha256)
        n_rejected = sum(self.rejects.counts.values())
        counts = {"lines": self.lines, "kept": self.lines - n_rejected, "rejected": n_rejected,
                  **{name: {"documents": sp.docs, "tokens": sp.tokens.n, "bytes": sp.bytes}
                     for name, sp in self.splits.items()}}
        return shapes, counts, hashes



# --------------------------------------------------------------------------- groups


def create_if_missing(path: Path, document: dict) -> bool:
    """Write a zarr.json at `path` unless one exists; True if this call made it.

    The finished file is hard-linked into place, which fails rather than replace a
    file another writer linked first (filesystems without links: rename if absent)."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        made = True
    except FileExistsError:
        made = False
    except OSError:
        made = not path.exists()
        if made:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if made:
        fsync_dir(path.parent)
    return made


def check_root_dir(store: Path) -> None:
    """A store root without zarr.json may hold only source groups and hidden names (a
    directory DVC emptied); anything else is the user's, and is not written into."""
    if store.exists() and not store.is_dir():
        raise UserError(f"{store}: exists and is not a directory (not a token store)")
    if not store.exists() or (store / "zarr.json").exists():
        return
    for p in store.iterdir():
        if not (p.name.startswith(".") or (p.is_dir() and SOURCE_NAME.fullmatch(p.name)
                                           and (p / "zarr.json").is_file())):
            raise UserError(f"{store}: exists and is not a token store (no zarr.json; holds {p.name})")


def ensure_source(store: Path, source: str) -> Path:
    d = store / source
    d.mkdir(exist_ok=True)
    create_if_missing(d / "zarr.json", group_document({"source": source}))
    return d


# --------------------------------------------------------------------------- parts


class PartLock:
    """An exclusive advisory lock on one part (`fcntl.flock` on a hidden file next to it,
    which holds the writer's PID). The kernel drops the lock when the process dies; the
    file is removed on release, so a finished store holds no lock files."""

    def __init__(self, lock_path: Path, what: str):
        self.path = lock_path
        self.what = what
        self.fd = None

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise UserError(f"{self.what}: being written by process {holder} (lock {self.path}); "
                                "wait for it to finish") from None
            try:  # the file we locked may have been removed by a writer finishing meanwhile: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while still holding it: see __enter__
        os.close(self.fd)


def clear_stale(source_dir: Path, part: str) -> bool:
    """Clean up after writers of `part` that died (call with the part's lock held); True when a
    complete earlier copy of the part was put back in place.

    `.PART.tmp-PID` is a part being written: never complete, removed. `.PART.old-PID` is the
    complete part `publish_dir` moves aside before renaming the new one in: when the part itself
    is missing, the writer died between those two renames and that copy is the only complete one,
    so it is renamed back; when the part exists, the old copy was superseded and is removed."""
    final = source_dir / part
    restored = False
    for p in sorted(source_dir.glob(f".{part}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if p.is_dir() and not final.exists():
            os.replace(p, final)  # the newest moved-aside copy (one writer at a time: normally the only one)
            fsync_dir(source_dir)
            restored = True
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for p in source_dir.glob(f".{part}.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    return restored
