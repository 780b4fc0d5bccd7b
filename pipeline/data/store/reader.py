"""The token store (`tokens.zarr`): its layout, and reading it the way the trainer wants it.

A store holds named sources, each made of parts (layout in
pipeline/data/store/layout.py). zarr-python
decodes chunks into fresh arrays; the trainer instead memory-maps the chunk
files. That is exact because `mm tokenize` writes the arrays with the v3
`bytes` codec (little-endian) and no compressor, and the default chunk-key
encoding puts chunk i at `<array>/c/i`. Opening checks all of that, plus the
format version, the dtype, every chunk file's size, each part's counts against
its arrays, the attributes' checksums, that every part shares the store's
tokenizer and that every source asked for is present and complete, and raises
a UserError naming the file, source or part. It reads metadata and file sizes
only, so a store of 10^12 tokens opens as fast as one of 10^6; a source's
parts are joined by views (pipeline/data/store/views.py), nothing is copied.

    store = open_store("data/tokens.zarr", sources=["web", "code"], note=print)
    src = store.sources["web"]          # its parts' documents, in part order
    src.train.tokens[a:b]               # np.ndarray of uint16/uint32
    src.train.doc_offsets[d]            # int64 start of document d (n_docs + 1 entries)
    store.fingerprint                   # tokenizer + the opened sources' data
    open_part("data/tokens.zarr/web/part-00000-of-00004").train   # one part
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.store.layout import (
    ATTRS_CHECKSUM,
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLITS,
    attrs_checksum,
    list_parts,
    list_sources,
    part_dir,
    part_name,
    source_dir,
)
from pipeline.data.store.remote import location
from pipeline.data.store.views import ChunkedArray, ConcatArray, ConcatOffsets, open_array, read_json
from pipeline.errors import UserError

ChunkedTokens = ChunkedArray  # the chunk files of one array as one; the name tests use


# --------------------------------------------------------------------------- reading


@dataclass
class Split:
    tokens: object
    """All tokens of the split, documents packed back to back (BOS + ids + EOS): a memory-mapped
    array or view (len, int index, [a:b] slices; pipeline/data/store/views.py)."""
    doc_offsets: object
    """int64, n_docs + 1: document d is tokens[doc_offsets[d]:doc_offsets[d+1]]; a view too."""

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


class _TokenizerAttrs:
    """Properties read from the `tokenizer` and `dtype` attributes (the same in root and parts)."""

    attrs: dict

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


@dataclass
class Part(_TokenizerAttrs):
    """One part group: its attributes and its two splits."""

    path: Path
    attrs: dict
    train: Split
    val: Split

    @property
    def fingerprint(self) -> str:
        """sha256 of the attributes that define the part's data (format, tokenizer, source,
        part, split rule, inputs and their ranges, counts): equal wherever it lies."""
        keys = ("format", "version", "dtype", "tokenizer", "source", "part", "text_field", "val_fraction",
                "inputs", "counts")
        return _sha({k: self.attrs.get(k) for k in keys})


@dataclass
class Source:
    """One named source: its parts' documents in part order, as one train and one val split."""

    name: str
    path: Path
    parts: list[Part]
    train: Split
    val: Split


@dataclass
class TokenStore(_TokenizerAttrs):
    path: Path
    attrs: dict
    """The root group's attributes (format, version, dtype, tokenizer)."""
    sources: dict[str, Source]
    """The sources opened: those asked for, in that order (all of the store's by default)."""
    ignored: list[str] = field(default_factory=list)
    """Sources of the store that were not asked for (left unopened)."""

    @property
    def fingerprint(self) -> str:
        """sha256 of the format, the tokenizer and, per opened source, its parts' fingerprints:
        equal wherever the store lies, and unchanged by sources outside the selection."""
        return _sha({"root": {k: self.attrs.get(k) for k in ("format", "version", "dtype", "tokenizer")},
                     "sources": {n: [p.fingerprint for p in s.parts] for n, s in self.sources.items()}})

    def _only(self) -> Source:
        if len(self.sources) != 1:
            raise UserError(f"{self.path}: holds {len(self.sources)} sources ({', '.join(self.sources)}); "
                            "name the one to read")
        return next(iter(self.sources.values()))

    @property
    def train(self) -> Split:
        """The train split of a store of one source (or one source selected)."""
        return self._only().train

    @property
    def val(self) -> Split:
        """The val split of a store of one source (or one source selected)."""
        return self._only().val


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _open_split(root: Path, name: str, dtype: np.dtype, counts: dict, hashes: dict) -> Split:
    def recorded(array: str) -> dict[str, str]:  # {"0": sha256, ...} of one array's chunk files
        prefix = f"{name}/{array}/c/"
        return {k[len(prefix):]: str(v) for k, v in hashes.items() if k.startswith(prefix)}

    tokens = open_array(root / name / "tokens", dtype, recorded("tokens"))
    offsets = open_array(root / name / "doc_offsets", np.dtype("int64"), recorded("doc_offsets"))
    n_tok, n_off = len(tokens), len(offsets)
    if n_off < 1 or offsets[0] != 0 or offsets[n_off - 1] != n_tok:
        raise UserError(f"{root / name / 'doc_offsets'}: offsets do not span {name}/tokens")
    c = counts.get(name) if isinstance(counts, dict) else None
    c = c if isinstance(c, dict) else {}
    if c.get("tokens") != n_tok or c.get("documents") != n_off - 1:
        raise UserError(f"{root / 'zarr.json'}: attributes say {name} has {c.get('documents')} documents / "
                        f"{c.get('tokens')} tokens, the arrays hold {n_off - 1} / {n_tok} (store altered?)")
    return Split(tokens=tokens, doc_offsets=offsets)


def read_group_attrs(root: Path, checksum: bool = True) -> tuple[Path, dict]:
    """(zarr.json path, attributes) of an mm group of format 2, checked down to its checksum."""
    meta_path = root / "zarr.json"
    if not meta_path.is_file():
        raise UserError(f"{root}: not a token store (no zarr.json)")
    meta = read_json(meta_path, "group metadata")
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


def open_part(path: str | Path) -> Part:
    """Open and validate one part group (`STORE/<source>/part-IIIII-of-NNNNN`)."""
    root = location(path)
    if not root.exists():
        raise UserError(f"{root}: token store part not found (run `mm tokenize` first)")
    meta_path, attrs = read_group_attrs(root, checksum=False)
    _check_tokenizer_attrs(meta_path, attrs)
    if not isinstance(attrs.get("counts"), dict):
        raise UserError(f"{meta_path}: attributes incomplete or malformed (no counts)")
    hashes = attrs.get("chunk_sha256") if isinstance(attrs.get("chunk_sha256"), dict) else {}
    splits = {name: _open_split(root, name, np.dtype(attrs["dtype"]), attrs["counts"], hashes) for name in SPLITS}
    check_checksum(meta_path, attrs)  # last, so the specific checks above name what is wrong when they can
    return Part(path=root, attrs=attrs, **splits)


def _check_tokenizer_attrs(meta_path: Path, attrs: dict) -> None:
    try:
        dtype = np.dtype(attrs["dtype"])
        vocab = int(attrs["tokenizer"]["vocab_size"])
        for k in ("fingerprint", "bos_id", "eos_id", "pad_id"):
            attrs["tokenizer"][k]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_path}: attributes incomplete or malformed ({e})") from None
    if dtype.name not in ("uint16", "uint32"):
        raise UserError(f"{meta_path}: dtype {dtype.name!r} must be uint16 or uint32")
    if vocab > np.iinfo(dtype).max + 1:
        raise UserError(f"{meta_path}: vocab_size {vocab} does not fit dtype {dtype.name}")


def _concat(splits: list[Split]) -> Split:
    """The parts' splits as one: tokens back to back, offsets shifted (the split itself for one part)."""
    if len(splits) == 1:
        return splits[0]
    return Split(tokens=ConcatArray([s.tokens for s in splits]),
                 doc_offsets=ConcatOffsets([s.doc_offsets for s in splits], [s.n_tokens for s in splits]))


def _source(name: str, path: Path, parts: list[Part]) -> Source:
    return Source(name=name, path=path, parts=parts, train=_concat([p.train for p in parts]),
                  val=_concat([p.val for p in parts]))


def _open_source(root: Path, root_attrs: dict, name: str) -> Source:
    """A complete source: parts 0..N-1 of one N, each valid and made with the store's tokenizer."""
    where = source_dir(root, name)
    found = list_parts(root, name)
    if not found:
        raise UserError(f"{where}: source {name!r} has no finished part (run `mm tokenize RAW --source {name} "
                        f"--out {root}`)")
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        names = ", ".join(part_name(i, n) for i, n in found)
        raise UserError(f"{where}: the parts of source {name!r} disagree on how many there are ({names}); "
                        "remove those of the other split")
    count = counts[0]
    missing = sorted(set(range(count)) - {i for i, _ in found})
    if missing:
        shown = ", ".join(part_name(i, count) for i in missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise UserError(f"{where}: source {name!r} is incomplete: {len(missing)} of its {count} parts missing "
                        f"({shown}); run `mm tokenize RAW --source {name} --part I/{count}` for each")
    parts = []
    for i in range(count):
        part = open_part(part_dir(root, name, i, count))
        for key in ("dtype", "tokenizer"):
            if part.attrs.get(key) != root_attrs.get(key):
                raise UserError(f"{part.path / 'zarr.json'}: {key} differs from the store's ({root / 'zarr.json'}): "
                                "every source of a store uses the store's tokenizer")
        parts.append(part)
    return _source(name, where, parts)


def open_store(path: str | Path, sources: list[str] | None = None, note=None) -> TokenStore:
    """Open and validate a token store written by `mm tokenize`: metadata and file sizes only.

    sources: the names to open, in this order (None: every source of the store). A name the
    store lacks, or an incomplete source, is a UserError naming it; a store source not named
    is left unopened and reported once through `note(text)`. A part directory opens as a
    store of that one part. An s3://, gs:// or az:// URL opens a store in object storage
    (pipeline/data/store/remote.py), its chunks fetched into the local cache as they are read."""
    root = location(path)
    if not root.exists():
        raise UserError(f"{root}: token store not found (run `mm tokenize` first)")
    meta_path, attrs = read_group_attrs(root, checksum=False)
    if "part" in attrs:  # a part directly
        part = open_part(root)
        name = str(attrs.get("source", root.parent.name))
        return TokenStore(path=root, attrs=attrs, sources={name: _source(name, root, [part])})
    check_checksum(meta_path, attrs)
    _check_tokenizer_attrs(meta_path, attrs)
    present = list_sources(root)
    wanted = list(present) if sources is None else list(sources)
    if not wanted:
        raise UserError(f"{root}: holds no sources (run `mm tokenize RAW --source NAME --out {root}`)")
    absent = [s for s in wanted if s not in present]
    if absent:
        raise UserError(f"{root}: no source {', '.join(absent)} in the store (data.sources names it; the store "
                        f"holds: {', '.join(present) or 'none'}); run `mm tokenize RAW --source NAME --out {root}`")
    ignored = [s for s in present if s not in wanted]
    if ignored and note is not None:
        note(f"note: {root} also holds source{'s' if len(ignored) > 1 else ''} {', '.join(ignored)}, "
             "not in data.sources: ignored")
    opened = {name: _open_source(root, attrs, name) for name in wanted}
    return TokenStore(path=root, attrs=attrs, sources=opened, ignored=ignored)
