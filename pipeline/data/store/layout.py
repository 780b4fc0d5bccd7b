"""The token store's layout (format 2): names, attribute keys, the attribute checksum, and
finding sources and parts by listing directories.

Shared by the writer (`pipeline.data.store.writer`, `pipeline.data.tokenize`) and the
reader (`pipeline.data.store.reader`), which checks every store against it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.data.sources import SOURCE_NAME
from pipeline.data.store.remote import location

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
    return location(store) / source


def part_dir(store: str | Path, source: str, index: int, count: int) -> Path:
    return location(store) / source / part_name(index, count)


def list_sources(store: str | Path) -> list[str]:
    """Source names in the store (directories holding a zarr.json), sorted."""
    root = location(store)
    return sorted(p.name for p in root.iterdir()
                  if SOURCE_NAME.fullmatch(p.name) and (p / "zarr.json").is_file())


def list_parts(store: str | Path, source: str) -> list[tuple[int, int]]:
    """(index, count) of every finished part of `source`, sorted. Finished parts only: a local
    part directory appears (by rename) after its last file is written; in object storage,
    which has no rename, the part's zarr.json is uploaded last and marks it finished."""
    found = [parse_part_name(p.name) for p in source_dir(store, source).iterdir() if (p / "zarr.json").is_file()]
    return sorted(x for x in found if x is not None)


def attrs_checksum(attrs: dict) -> str:
    """sha256 of the group attributes (all but the checksum itself) as canonical JSON.

    `mm tokenize` stores it as attrs["attrs_sha256"] in the root and every part; the
    reader refuses a group whose attributes no longer match (a hand edit, a half-copied
    zarr.json) or have no checksum."""
    rest = {k: v for k, v in attrs.items() if k != ATTRS_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
