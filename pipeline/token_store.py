"""Read the token store (`tokens.zarr`) the way the trainer wants it: memory-mapped.

zarr-python decodes chunks into fresh arrays; the trainer instead maps the
chunk files directly. That is exact because `mm tokenize` writes the arrays
with the v3 `bytes` codec (little-endian) and no compressor, and the default
chunk-key encoding puts chunk i at `<array>/c/i`. `open_store` checks all of
that, plus the format version, the dtype, every chunk file's size, the
attributes' counts against the arrays and the attributes' checksum, and raises
a UserError naming the file.

    store = open_store("data/tokens.zarr")
    store.train.tokens[a:b]      # np.ndarray of uint16/uint32
    store.train.doc_offsets      # int64, n_docs + 1
    store.fingerprint            # identifies tokenizer + sources + split
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.sources import SOURCE_NAME

FORMAT_NAME = "mm-tokens"
FORMAT_VERSION = 2
STORE_VERSION = FORMAT_VERSION  # the version with sources and parts
SPLITS = ("train", "val")
ATTRS_CHECKSUM = "attrs_sha256"


# --------------------------------------------------------------------------- layout (format 2)
#
#   STORE/zarr.json                      group; ROOT_KEYS: format, version 2, dtype, tokenizer
#                                        {fingerprint, vocab_size, bos_id, eos_id, pad_id}, attrs_sha256
#   STORE/<source>/zarr.json             group; {"source": name}
#   STORE/<source>/part-IIIII-of-NNNNN/  group; PART_KEYS (self-contained: a part alone is readable)
#       train/tokens  train/doc_offsets  val/tokens  val/doc_offsets     (arrays as in format 1)
#
# Sources and parts are found by listing directories: there is no index file for
# concurrent writers to contend on. Names starting with "." are never sources or
# parts (temporary directories and lock files of writers in progress). A source is
# complete when parts 0..N-1 of one N all exist; its documents are its parts' in order.

ROOT_KEYS = ("format", "version", "dtype", "tokenizer", ATTRS_CHECKSUM)  # version: FORMAT_VERSION
"""Attributes of the store's root group (the same for every source)."""
PART_KEYS = ("format", "version", "dtype", "tokenizer", "source", "part", "text_field", "val_fraction",
             "split_hash", "inputs", "counts", "rejected", "chunk_sha256", ATTRS_CHECKSUM)
"""Attributes of a part group. part = {index, count}; inputs = [{name, size, sha256, range
{unit: bytes|rows|row_groups|file, start, end}, lines|rows}]; counts = {lines, kept, rejected,
train/val {documents, tokens, bytes}}; rejected = {reason: {count, first_lines}};
chunk_sha256 = {"train/tokens/c/0": sha256 hex, ...} for every chunk file of the part."""
PART_NAME = re.compile(r"part-(\d{5})-of-(\d{5})")
MAX_PARTS = 99_999


def part_name(index: int, count: int) -> str:
    """`part-00003-of-00008`: the group name of part `index` (from 0) of `count`."""
    return f"part-{index:05d}-of-{count:05d}"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(index, count) of a part group name, or None when `name` is not one."""
    m = PART_NAME.fullmatch(name)
    if not m:
        return None
    i, n = int(m.group(1)), int(m.group(2))
    return (i, n) if 0 <= i < n else None


def source_dir(store: str | Path, source: str) -> Path:
    return Path(store) / source


def part_dir(store: str | Path, source: str, index: int, count: int) -> Path:
    return Path(store) / source / part_name(index, count)


def list_sources(store: str | Path) -> list[str]:
    """Source names in the store (directories holding a zarr.json), sorted."""
    root = Path(store)
    return sorted(p.name for p in root.iterdir()
                  if SOURCE_NAME.fullmatch(p.name) and (p / "zarr.json").is_file())


def list_parts(store: str | Path, source: str) -> list[tuple[int, int]]:
    """(index, count) of every finished part of `source`, sorted. Finished parts only:
    a part directory appears (by rename) after its last file is written."""
    found = [parse_part_name(p.name) for p in source_dir(store, source).iterdir() if p.is_dir()]
    return sorted(x for x in found if x is not None)


class ChunkedTokens:
    """A read-only 1-D view over several memory-mapped chunk files.

    Supports len(), integer indexing and `[a:b]` slicing (step 1), which
    returns a numpy array (a view when the slice lies in one chunk).
    """

    def __init__(self, maps: list[np.ndarray], length: int, chunk_len: int):
        self.maps = maps
        self.length = length
        self.chunk_len = chunk_len
        self.dtype = maps[0].dtype if maps else None
        self.shape = (length,)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            c0, c1 = start // self.chunk_len, (stop - 1) // self.chunk_len
            if c0 == c1:
                base = c0 * self.chunk_len
                return self.maps[c0][start - base : stop - base]
            parts = []
            for c in range(c0, c1 + 1):
                base = c * self.chunk_len
                parts.append(self.maps[c][max(start - base, 0) : min(stop - base, self.chunk_len)])
            return np.concatenate(parts)
        i = int(key)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {key} out of range for length {self.length}")
        return self.maps[i // self.chunk_len][i % self.chunk_len]

    def __array__(self, dtype=None, copy=None):
        arr = self[0 : self.length]
        return arr.astype(dtype) if dtype is not None else arr


@dataclass
class Split:
    tokens: np.ndarray | ChunkedTokens
    """All tokens of the split, documents packed back to back (BOS + ids + EOS)."""
    doc_offsets: np.ndarray
    """int64, n_docs + 1: document d is tokens[doc_offsets[d]:doc_offsets[d+1]]."""

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


@dataclass
class TokenStore:
    path: Path
    attrs: dict
    train: Split
    val: Split

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.attrs["tokenizer"]["vocab_size"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.attrs["tokenizer"]["fingerprint"]

    @property
    def bos_id(self) -> int:
        return int(self.attrs["tokenizer"]["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.attrs["tokenizer"]["eos_id"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the attributes that define the data (format, tokenizer, sources,
        split rule, counts): equal stores give equal fingerprints wherever they lie."""
        keys = ("format", "version", "dtype", "tokenizer", "source", "part", "text_field", "val_fraction",
                "inputs", "counts")
        canon = json.dumps({k: self.attrs.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON ({what})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON object ({what})")
    return obj


def _open_array(array_dir: Path, dtype: np.dtype):
    """Validate one array's zarr.json and chunk files; returns (maps, length, chunk_len)."""
    meta_path = array_dir / "zarr.json"
    meta = _read_json(meta_path, "array metadata")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise UserError(f"{meta_path}: not a Zarr v3 array")
    if meta.get("data_type") != dtype.name:
        raise UserError(f"{meta_path}: data_type {meta.get('data_type')!r}, expected {dtype.name!r}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)):
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
    n_chunks = -(-length // chunk_len)
    dt = dtype.newbyteorder("<")
    maps = []
    for i in range(n_chunks):
        f = array_dir / "c" / str(i)
        if not f.is_file():
            raise UserError(f"{f}: chunk file missing")
        want = chunk_len * dt.itemsize
        size = f.stat().st_size
        if size != want:
            raise UserError(f"{f}: chunk file is {size} bytes, expected {want} (truncated or altered)")
        maps.append(np.memmap(f, dtype=dt, mode="r", shape=(chunk_len,)))
    return maps, length, chunk_len


def _open_split(root: Path, name: str, dtype: np.dtype, counts: dict) -> Split:
    maps, n_tok, chunk_len = _open_array(root / name / "tokens", dtype)
    omaps, n_off, ochunk = _open_array(root / name / "doc_offsets", np.dtype("int64"))
    if n_tok == 0:
        tokens = np.zeros(0, dtype=dtype)
    elif len(maps) == 1:
        tokens = maps[0][:n_tok]
    else:
        tokens = ChunkedTokens(maps, n_tok, chunk_len)
    if len(omaps) == 1:
        offsets = omaps[0][:n_off]
    elif n_off == 0:
        offsets = np.zeros(0, dtype=np.int64)
    else:
        offsets = np.asarray(ChunkedTokens(omaps, n_off, ochunk)[0:n_off])

    where = root / "zarr.json"
    c = counts.get(name) or {}
    if n_off < 1 or offsets[0] != 0 or offsets[-1] != n_tok:
        raise UserError(f"{root / name / 'doc_offsets'}: offsets do not span {name}/tokens")
    if c.get("tokens") != n_tok or c.get("documents") != n_off - 1:
        raise UserError(f"{where}: attributes say {name} has {c.get('documents')} documents / "
                        f"{c.get('tokens')} tokens, the arrays hold {n_off - 1} / {n_tok} (store altered?)")
    return Split(tokens=tokens, doc_offsets=offsets)


def read_group_attrs(root: Path, checksum: bool = True) -> tuple[Path, dict]:
    """(zarr.json path, attributes) of an mm group of format 2, checked down to its checksum."""
    meta_path = root / "zarr.json"
    if not meta_path.is_file():
        raise UserError(f"{root}: not a token store (no zarr.json)")
    meta = _read_json(meta_path, "group metadata")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise UserError(f"{meta_path}: not a Zarr v3 group")
    attrs = meta.get("attributes") or {}
    if attrs.get("format") != FORMAT_NAME:
        raise UserError(f"{meta_path}: not an mm token store (format {attrs.get('format')!r})")
    if attrs.get("version") != FORMAT_VERSION:
        raise UserError(f"{meta_path}: token store version {attrs.get('version')!r}; this mm reads and writes "
                        f"version {FORMAT_VERSION} (tokenize into a new store)")
    if checksum:
        check_checksum(meta_path, attrs)
    return meta_path, attrs


def check_checksum(meta_path: Path, attrs: dict) -> None:
    # Mandatory in format 2: deleting the key must not turn the check off.
    if attrs.get(ATTRS_CHECKSUM) != attrs_checksum(attrs):
        what = "missing" if ATTRS_CHECKSUM not in attrs else "mismatch"
        raise UserError(f"{meta_path}: attributes altered since `mm tokenize` wrote them "
                        f"({ATTRS_CHECKSUM} {what}; re-run `mm tokenize`)")


def open_part(path: str | Path) -> TokenStore:
    """Open and validate one part group (`STORE/<source>/part-IIIII-of-NNNNN`)."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: token store part not found (run `mm tokenize` first)")
    meta_path, attrs = read_group_attrs(root, checksum=False)
    try:
        dtype = np.dtype(attrs["dtype"])
        vocab = int(attrs["tokenizer"]["vocab_size"])
        counts = attrs["counts"]
        for k in ("fingerprint", "bos_id", "eos_id", "pad_id"):
            attrs["tokenizer"][k]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_path}: attributes incomplete or malformed ({e})") from None
    if dtype.name not in ("uint16", "uint32"):
        raise UserError(f"{meta_path}: dtype {dtype.name!r} must be uint16 or uint32")
    if vocab > np.iinfo(dtype).max + 1:
        raise UserError(f"{meta_path}: vocab_size {vocab} does not fit dtype {dtype.name}")
    splits = {name: _open_split(root, name, dtype, counts) for name in SPLITS}
    check_checksum(meta_path, attrs)  # last, so the specific checks above name what is wrong when they can
    return TokenStore(path=root, attrs=attrs, **splits)


def open_store(path: str | Path) -> TokenStore:
    """Open and validate a token store written by `mm tokenize` that holds one source of
    one part (or a part directly); stores of several sources or parts are read by the
    sources reader."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: token store not found (run `mm tokenize` first)")
    meta_path, attrs = read_group_attrs(root, checksum=False)
    if "part" in attrs:
        return open_part(root)
    check_checksum(meta_path, attrs)
    sources = list_sources(root)
    parts = [(s, i, n) for s in sources for i, n in list_parts(root, s)]
    if len(parts) != 1 or parts[0][1:] != (0, 1):
        raise UserError(f"{root}: holds {len(sources)} sources in {len(parts)} parts; this reader opens "
                        "a store of one source tokenized as one part")
    store = open_part(part_dir(root, *parts[0]))
    if store.tokenizer_fingerprint != (attrs.get("tokenizer") or {}).get("fingerprint"):
        raise UserError(f"{store.path / 'zarr.json'}: tokenized with another tokenizer than {meta_path} names")
    return store


def attrs_checksum(attrs: dict) -> str:
    """sha256 of the group attributes (all but the checksum itself) as canonical JSON.

    `mm tokenize` stores it as attrs["attrs_sha256"] in the root and every part; the
    reader refuses a group whose attributes no longer match (a hand edit, a half-copied
    zarr.json) or have no checksum."""
    rest = {k: v for k, v in attrs.items() if k != ATTRS_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- writing
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
