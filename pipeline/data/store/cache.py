"""The local cache of a remote store's chunk files, and prefetching the next steps' chunks.

A remote store is read through the same views as a local one
(pipeline/data/store/views.py): each chunk file is downloaded whole on first
use into `data.cache_dir`, checked against the sha256 its part recorded, and
memory-mapped from there, so the trainer sees the very bytes of a local copy
(and computes the same losses). A chunk whose bytes do not match is fetched
once more, then refused naming its URL.

Cache files are named by their sha256: a file in the cache was verified when
it arrived, is shared by every store and process holding that chunk, and is
never stale, so an empty cache (another machine, a wiped disk) and a warm one
give the same bytes.

Bound: before a downloaded file is put in place, the least recently used files
are deleted until it fits under `data.cache_gb`, so the directory never holds
more (only a single chunk larger than the bound exceeds it; processes sharing
a directory can overshoot by a chunk each for a moment). An evicted file's
mapping stays valid while a batch being built still reads it, and each array
keeps the chunk it read last mapped (so reading element by element skips the
cache's bookkeeping): the disk holds at most that one evicted chunk per array
beyond the bound.

Prefetch: `Prefetcher` wraps the sampler; when step s's batches are asked for,
a background thread builds (and drops) the batches of steps s+1 .. s+PREFETCH_STEPS
of this rank, which pulls the chunk files they read into the cache, so once
it is ahead the training step reads local files only. Each rank prefetches
its own windows only.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

DEFAULT_CACHE_GB = 50.0
PREFETCH_STEPS = 2
_settings: dict = {"dir": "", "gb": DEFAULT_CACHE_GB}


def configure(cache_dir: str | Path, cache_gb: float) -> None:
    """Where and how large the chunk cache is (params data.cache_dir, data.cache_gb); set by each command."""
    _settings.update(dir=str(cache_dir or ""), gb=float(cache_gb))


def cache_directory() -> Path:
    """data.cache_dir, or $XDG_CACHE_HOME/mm/chunks (~/.cache/mm/chunks) when it is empty."""
    if _settings["dir"]:
        return Path(_settings["dir"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mm" / "chunks"


class ChunkCache:
    """Chunk files by sha256 in one directory, at most max_bytes of them; thread-safe."""

    _open: dict[tuple[str, int], ChunkCache] = {}

    @classmethod
    def current(cls) -> ChunkCache:
        """The cache the settings name (one object per directory and bound in a process)."""
        key = (str(cache_directory()), int(_settings["gb"] * 1e9))
        if key not in cls._open:
            cls._open[key] = cls(Path(key[0]), key[1])
        return cls._open[key]

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        self.lock = threading.Lock()
        self.maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.used: dict[str, float] = {}  # sha → time of last use in this process (else the file's mtime)
        self.inflight: dict[str, threading.Event] = {}
        self.downloads = 0

    def map(self, url, sha: str, dtype: np.dtype, count: int) -> np.ndarray:
        """The chunk at `url` (a RemotePath) whose sha256 is `sha`, memory-mapped from the cache;
        downloaded first unless present, one download per chunk at a time."""
        file = self.dir / sha
        while True:
            with self.lock:
                m = self.maps.get(sha)
                if m is None and sha not in self.inflight and file.is_file():
                    try:  # another process sharing the directory may evict it between the check and here
                        os.utime(file)  # recently used, for other processes sharing the directory
                        m = self._map(file, sha, dtype, count)
                    except FileNotFoundError:
                        m = None  # then fetch it again below
                if m is not None:
                    self.maps.move_to_end(sha)
                    self.used[sha] = time.time()
                    return m
                event = self.inflight.get(sha)
                mine = event is None
                if mine:
                    event = self.inflight[sha] = threading.Event()
            if not mine:  # another thread is fetching it: use its file (or fetch again if that failed)
                event.wait()
                continue
            try:
                self._download(url, sha, file, dtype, count)
            finally:
                with self.lock:
                    del self.inflight[sha]
                event.set()

    def _map(self, file: Path, sha: str, dtype: np.dtype, count: int) -> np.ndarray:
        """Map a cache file (lock held). A mapping stays valid after the file is evicted, so a
        batch being built never loses its chunk; the disk space returns when it is dropped."""
        m = self.maps[sha] = np.memmap(file, dtype=dtype, mode="r", shape=(count,))
        return m

    def _download(self, url, sha: str, file: Path, dtype: np.dtype, count: int) -> None:
        for _ in range(2):  # a mismatch is fetched once more: a torn or corrupted transfer heals
            data = url.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha:
                break
        else:
            raise UserError(f"{url}: sha256 differs from the one recorded in its part (fetched twice); the store "
                            "is damaged (`mm verify` on it names every bad file)")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{sha}.{os.getpid()}.{threading.get_ident()}"
        try:
            tmp.write_bytes(data)
            with self.lock:  # room first, then the file: the directory never holds more than the bound
                self._evict(room=len(data))
                os.replace(tmp, file)  # whole or absent: a reader never maps half a chunk
                self._map(file, sha, dtype, count)
                self.downloads += 1
        finally:
            tmp.unlink(missing_ok=True)  # gone after the rename; left only by a failed write

    def _evict(self, room: int) -> None:
        """Delete least recently used files until the directory has `room` bytes left under
        max_bytes (lock held)."""
        files = []
        for f in self.dir.iterdir():
            if f.name.startswith("."):
                continue
            try:
                st = f.stat()
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
            files.append((self.used.get(f.name, st.st_mtime), f, st.st_size))
        total = sum(size for _, _, size in files)
        for _, f, size in sorted(files, key=lambda x: x[0]):
            if total + room <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            self.maps.pop(f.name, None)
            self.used.pop(f.name, None)
            total -= size

    def size(self) -> int:
        """Bytes of chunk files in the cache directory now."""
        return sum(f.stat().st_size for f in self.dir.iterdir() if not f.name.startswith(".")) \
            if self.dir.is_dir() else 0


class RemoteChunks:
    """The chunk files of one remote array as a sequence of arrays (what ChunkedArray indexes),
    each fetched into the cache on first use."""

    def __init__(self, array_dir, n_chunks: int, chunk_len: int, dtype: np.dtype, hashes: dict[int, str]):
        self.dir, self.n, self.chunk_len, self.dtype, self.hashes = array_dir, n_chunks, chunk_len, dtype, hashes
        self.cache = ChunkCache.current()  # looked up once: a view indexes element by element
        self.last: tuple[int, np.ndarray] | None = None  # the chunk read last: element reads skip the cache
        missing = [i for i in range(n_chunks) if i not in hashes]
        if missing:
            raise UserError(f"{array_dir / 'c' / str(missing[0])}: no sha256 recorded in its part; a remote "
                            "store's chunks are checked as they arrive (re-run `mm tokenize`)")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, c: int) -> np.ndarray:
        last = self.last
        if last is not None and last[0] == c:  # kept mapped even if evicted meanwhile: the bytes stay valid
            return last[1]
        if not 0 <= c < self.n:
            raise IndexError(c)
        m = self.cache.map(self.dir / "c" / str(c), self.hashes[c], self.dtype, self.chunk_len)
        self.last = (c, m)
        return m


class Prefetcher:
    """A sampler whose micro_batches(step, ...) also queues steps step+1 .. step+depth for a background
    thread, which builds their batches and drops them: their chunk files land in the cache."""

    def __init__(self, sampler, depth: int = PREFETCH_STEPS):
        self.sampler, self.depth = sampler, depth
        self.queued = -1
        self.jobs: queue.Queue = queue.Queue()
        # A daemon thread: a fetch still retrying when training ends must not hold up the exit.
        threading.Thread(target=self._work, name="mm-prefetch", daemon=True).start()

    def __getattr__(self, name):
        return getattr(self.__dict__["sampler"], name)

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int, accumulation: int):
        for ahead in range(max(step + 1, self.queued + 1), step + 1 + self.depth):
            self.jobs.put((ahead, rank, world_size, micro_batch, accumulation))
            self.queued = ahead
        return self.sampler.micro_batches(step, rank, world_size, micro_batch, accumulation)

    def _work(self) -> None:
        while True:
            args = self.jobs.get()
            try:
                for _ in self.sampler.micro_batches(*args):
                    pass
            except Exception:  # noqa: BLE001 - the training step fetches it again, and reports what fails
                pass
