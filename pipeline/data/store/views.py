"""Read-only 1-D views over memory-mapped pieces: chunk files of one array, parts of one source.

Nothing here copies data at construction: a view holds the mapped pieces and
their int64 start offsets, and reads what an index or a slice asks for. So a
source of 10^12 tokens in thousands of chunk files across many parts opens
with memory proportional to the number of files, not their size.

    ChunkedArray   the chunk files c/0, c/1, ... of one Zarr array, as one array
    ConcatArray    several arrays (the parts' tokens) back to back
    ConcatOffsets  the parts' doc_offsets as one offsets array of the whole source:
                   each part's local offsets shifted by the tokens of the parts before
                   it, and the duplicated boundary entry dropped

Every view supports len(), integer indexing and `[a:b]` slicing (step 1, which
returns a numpy array: a view of the map when the slice lies in one piece),
and numpy conversion (which copies: for tests and small arrays only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError


class _View:
    """Shared slicing logic: subclasses implement _get(i) and _slice(a, b) for in-range bounds."""

    length: int
    dtype: np.dtype

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            return self._slice(start, stop)
        i = int(key)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {key} out of range for length {self.length}")
        return self._get(i)

    def __array__(self, dtype=None, copy=None):
        arr = self[0 : self.length]
        return arr.astype(dtype) if dtype is not None else arr


class ChunkedArray(_View):
    """The chunk files of one Zarr array (each mapped, all but the last full) as one array."""

    def __init__(self, maps: list[np.ndarray], length: int, chunk_len: int):
        self.maps, self.length, self.chunk_len = maps, length, chunk_len
        dtype = getattr(maps, "dtype", None)  # remote chunks know it before the first is fetched
        self.dtype = dtype if dtype is not None else maps[0].dtype if maps else np.dtype("int64")

    def _get(self, i: int):
        return self.maps[i // self.chunk_len][i % self.chunk_len]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        c0, c1 = start // self.chunk_len, (stop - 1) // self.chunk_len
        if c0 == c1:
            base = c0 * self.chunk_len
            return self.maps[c0][start - base : stop - base]
        pieces = []
        for c in range(c0, c1 + 1):
            base = c * self.chunk_len
            pieces.append(self.maps[c][max(start - base, 0) : min(stop - base, self.chunk_len)])
        return np.concatenate(pieces)


class ConcatArray(_View):
    """Arrays (views or maps) back to back; piece p covers [starts[p], starts[p+1])."""

    def __init__(self, pieces: list):
        self.pieces = [p for p in pieces if len(p)]
        self.starts = np.zeros(len(self.pieces) + 1, dtype=np.int64)
        self.starts[1:] = np.cumsum([len(p) for p in self.pieces], dtype=np.int64)
        self.length = int(self.starts[-1])
        self.dtype = pieces[0].dtype if pieces else np.dtype("int64")

    def _piece(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def _get(self, i: int):
        p = self._piece(i)
        return self.pieces[p][i - int(self.starts[p])]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        p0, p1 = self._piece(start), self._piece(stop - 1)
        out = []
        for p in range(p0, p1 + 1):
            base = int(self.starts[p])
            out.append(np.asarray(self.pieces[p][max(start - base, 0) : min(stop, int(self.starts[p + 1])) - base]))
        return out[0] if len(out) == 1 else np.concatenate(out)


class ConcatOffsets(_View):
    """Document offsets of parts back to back, as the offsets of their concatenated tokens.

    Part p's offsets run 0 .. tokens_p (docs_p + 1 entries); in the whole source its
    entry e (e >= 1) is entry docs_0 + ... + docs_{p-1} + e, with value
    tokens_0 + ... + tokens_{p-1} + local. Entry 0 is 0.
    """

    def __init__(self, offsets: list, token_counts: list[int]):
        self.offsets = offsets
        docs = np.array([len(o) - 1 for o in offsets], dtype=np.int64)
        self.doc_starts = np.zeros(len(offsets) + 1, dtype=np.int64)  # first global doc of each part
        self.doc_starts[1:] = np.cumsum(docs)
        self.token_starts = np.zeros(len(offsets) + 1, dtype=np.int64)
        self.token_starts[1:] = np.cumsum(np.asarray(token_counts, dtype=np.int64))
        self.length = int(self.doc_starts[-1]) + 1
        self.dtype = np.dtype("int64")

    def _locate(self, i: int) -> tuple[int, int]:
        """(part, local entry) of global entry i >= 1: the part holding document i - 1's end."""
        p = int(np.searchsorted(self.doc_starts, i - 1, side="right")) - 1
        return p, i - int(self.doc_starts[p])

    def _get(self, i: int):
        if i == 0:
            return np.int64(0)
        p, e = self._locate(i)
        return np.int64(self.token_starts[p] + int(self.offsets[p][e]))

    def _slice(self, start: int, stop: int) -> np.ndarray:
        out = []
        if start == 0:
            out.append(np.zeros(1, dtype=np.int64))
            start = 1
        while start < stop:
            p, e = self._locate(start)
            take = min(stop - start, int(self.doc_starts[p + 1]) - int(self.doc_starts[p]) - e + 1)
            out.append(np.asarray(self.offsets[p][e : e + take], dtype=np.int64) + self.token_starts[p])
            start += take
        return out[0] if len(out) == 1 else np.concatenate(out)


# --------------------------------------------------------------------------- opening one array


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON ({what})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON object ({what})")
    return obj


def open_array(array_dir: Path, dtype: np.dtype, hashes: dict[str, str] | None = None):
    """Validate one array (`array_layout`) and map it: a memmap for one chunk file, a
    ChunkedArray of memmaps for several. Nothing is read.

    In object storage (a RemotePath) the chunks are fetched on first use into the local
    cache and checked against `hashes` ({"0": sha256 of c/0, ...}; pipeline/data/store/cache.py)."""
    length, chunk_len = array_layout(array_dir, dtype)
    dt = dtype.newbyteorder("<")
    if not isinstance(array_dir, Path):
        from pipeline.data.store.cache import RemoteChunks

        n_chunks = -(-length // chunk_len)
        recorded = {int(k): v for k, v in (hashes or {}).items()}
        return ChunkedArray(RemoteChunks(array_dir, n_chunks, chunk_len, dt, recorded), length, chunk_len)
    maps = [np.memmap(array_dir / "c" / str(i), dtype=dt, mode="r", shape=(chunk_len,))
            for i in range(-(-length // chunk_len))]
    if not maps:
        return np.zeros(0, dtype=dt)
    return maps[0][:length] if len(maps) == 1 else ChunkedArray(maps, length, chunk_len)


def array_layout(array_dir: Path, dtype: np.dtype) -> tuple[int, int]:
    """(length, chunk length) of one array, after checking its zarr.json (1-D, this dtype,
    regular chunks, raw little-endian bytes, default chunk keys) and every chunk file's size."""
    meta_path = array_dir / "zarr.json"
    meta = read_json(meta_path, "array metadata")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise UserError(f"{meta_path}: not a Zarr v3 array")
    if meta.get("data_type") != dtype.name:
        raise UserError(f"{meta_path}: data_type {meta.get('data_type')!r}, expected {dtype.name!r}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
        raise UserError(f"{meta_path}: expected a 1-D array, shape is {shape!r}")
    grid = meta.get("chunk_grid", {})
    chunk = (grid.get("configuration") or {}).get("chunk_shape")
    if grid.get("name") != "regular" or not (isinstance(chunk, list) and len(chunk) == 1 and chunk[0] > 0):
        raise UserError(f"{meta_path}: expected a regular 1-D chunk grid")
    codecs = meta.get("codecs")
    raw_ok = (isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "bytes"
              and (codecs[0].get("configuration") or {}).get("endian", "little") == "little")
    if not raw_ok or meta.get("storage_transformers"):
        raise UserError(f"{meta_path}: chunks are encoded ({codecs!r}); only uncompressed little-endian "
                        "`bytes` chunks can be memory-mapped (re-run `mm tokenize`)")
    cke = meta.get("chunk_key_encoding", {})
    if cke.get("name") != "default" or (cke.get("configuration") or {}).get("separator", "/") != "/":
        raise UserError(f"{meta_path}: expected the default chunk key encoding ('c/<i>')")

    length, chunk_len = shape[0], chunk[0]
    for i in range(-(-length // chunk_len)):
        f = array_dir / "c" / str(i)
        if not f.is_file():
            raise UserError(f"{f}: chunk file missing")
        want = chunk_len * dtype.itemsize
        size = f.stat().st_size
        if size != want:
            raise UserError(f"{f}: chunk file is {size} bytes, expected {want} (truncated or altered)")
    return length, chunk_len
