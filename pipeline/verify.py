"""`mm verify PATH`: read every byte of a token store, a checkpoint or an export and check it.

Opening a store or loading a checkpoint for training checks what is cheap (sizes,
attributes, the checkpoint's own checksum); this reads everything and
recomputes every hash that was recorded when the files were written:

    token store    each chunk file's sha256 (where the store records them), every
                   token id < vocab_size, doc offsets non-decreasing from 0 to the
                   token count
    checkpoint     the sha256 over its contents that save_checkpoint stored in it
    GGUF file      the header, the tensors' offsets and sizes against the file, and
                   the sha256 of the tensor data the export recorded in it
    run directory  every checkpoint in it (step files and ckpt.pth)
    export         every file listed in SHA256SUMS (written by `mm export`), and the
                   safetensors header against the file size

The result is a list of rows, one per file or array checked; the caller prints
them and names the first bad file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.export.manifest import MANIFEST, file_sha256, read_manifest


@dataclass
class Row:
    path: Path
    """The file (or array directory) this row is about; for a failure, the first bad file."""
    check: str
    ok: bool
    detail: str


def verify(path: str | Path) -> tuple[str, list[Row]]:
    """(kind, rows) for whatever `path` is; UserError when it is none of the known kinds."""
    from pipeline.data.store.remote import location

    path = location(path)  # a local path, or an s3://, gs://, az:// URL (a RemotePath: stores only)
    if not isinstance(path, Path):
        return "token store", verify_store(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if path.is_file():
        kind = _file_kind(path)
        if kind == "GGUF":
            return kind, [verify_gguf(path)]
        if kind == "checkpoint":
            return kind, [verify_checkpoint(path)]
        raise UserError(f"{path}: not an mm file (mm verify checks a checkpoint, a GGUF export, a token store, "
                        "a run directory or an export directory)")
    if (path / "zarr.json").is_file():
        return "token store", verify_store(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "export", verify_export(path)
    from pipeline.checkpoint.format import LATEST, step_checkpoints

    checkpoints = [p for _, p in sorted(step_checkpoints(path))] + [p for p in [path / LATEST] if p.is_file()]
    if checkpoints:
        return "run directory", [verify_checkpoint(p) for p in checkpoints]
    raise UserError(f"{path}: not a token store, checkpoint, run directory or export directory")


def _file_kind(path: Path) -> str | None:
    """By the first bytes (a checkpoint is a zip archive), or by the name when those are damaged."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or (path.suffix == ".gguf" and magic[:2] != b"PK"):
        return "GGUF"
    if magic == b"PK\x03\x04" or path.suffix in (".pth", ".pt"):
        return "checkpoint"
    return None


def _failed(e: UserError, fallback: Path, check: str) -> Row:
    """A Row from a UserError, whose message starts with the path it is about."""
    from pipeline.data.store.remote import location

    where, sep, reason = str(e).partition(": ")
    return Row(location(where) if sep else fallback, check, False, reason if sep else str(e))  # a Path or URL


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def verify_checkpoint(path: Path) -> Row:
    from pipeline.checkpoint.format import load_checkpoint

    try:
        state = load_checkpoint(path)
    except UserError as e:
        return _failed(e, path, "checkpoint checksum")
    return Row(path, "checkpoint checksum", True, f"step {state['step']}, sha256 of the contents matches")


def verify_gguf(path: Path) -> Row:
    from pipeline.export.gguf import check_gguf

    ok, detail = check_gguf(path)
    return Row(path, "GGUF header, tensor sizes, sha256", ok, detail)


# ---------------------------------------------------------------------------
# Token stores
# ---------------------------------------------------------------------------


def verify_store(root: Path) -> list[Row]:
    """Format 1 (one train/val pair at the root) and format 2 (sources of parts, each a train/val pair)."""
    from pipeline.data.store import layout as store_layout
    from pipeline.data.store import reader as ts
    meta_path = root / "zarr.json"
    try:
        attrs = (json.loads(meta_path.read_text(encoding="utf-8")).get("attributes") or {})
    except (ValueError, UnicodeDecodeError, AttributeError):
        return [Row(meta_path, "store layout and attributes", False, "not valid JSON (group metadata)")]
    if attrs.get("version") != store_layout.STORE_VERSION:
        return _verify_format1(root, meta_path, attrs)  # open_store reads format 2 only

    # Format 2: the root's attributes, then every part of every source on its own.
    try:
        dtype, vocab = np.dtype(attrs["dtype"]), int(attrs["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        return [Row(meta_path, "store layout and attributes", False, f"attributes incomplete or malformed ({e})")]
    bad_attrs = _attrs_mismatch(attrs, meta_path)
    if bad_attrs:
        return [bad_attrs]
    layout = f"format {attrs['version']}, vocab {vocab}, {dtype.name}"
    rows = [Row(meta_path, "store layout and attributes", True, layout)]
    sources = ts.list_sources(root)
    if not sources:
        return rows + [Row(root, "sources", False, "no source in the store")]
    for source in sources:
        parts = ts.list_parts(root, source)
        counts = {n for _, n in parts}
        if len(counts) != 1 or sorted(i for i, _ in parts) != list(range(next(iter(counts)))):
            rows.append(Row(root / source, "parts complete", False, f"parts {parts} are not 0..N-1 of one N"))
            continue
        for index, count in parts:
            part = ts.part_dir(root, source, index, count)
            part_meta = part / "zarr.json"
            try:
                part_attrs = json.loads(part_meta.read_text(encoding="utf-8")).get("attributes") or {}
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                rows.append(Row(part_meta, "part attributes", False, "missing or not valid JSON"))
                continue
            bad_attrs = _attrs_mismatch(part_attrs, part_meta)
            if bad_attrs:
                rows.append(bad_attrs)
                continue
            rows += _verify_part(part, dtype, vocab, part_attrs.get("chunk_sha256") or {}, str(attrs["version"]))
    return rows


def _verify_format1(root: Path, meta_path: Path, attrs: dict) -> list[Row]:
    """Format 1 (one train/val pair at the root, before sources and parts; no chunk hashes recorded):
    what its reader checked (attributes, an attribute checksum where present, counts against the
    arrays), then token ids and offsets as for a format-2 part."""
    from pipeline.data.store.layout import FORMAT_NAME, SPLITS
    from pipeline.data.store.views import array_layout

    check = "store layout and attributes"
    if attrs.get("format") != FORMAT_NAME or attrs.get("version") != 1:
        return [Row(meta_path, check, False, f"not an mm token store of format 1 or 2 (format "
                                             f"{attrs.get('format')!r}, version {attrs.get('version')!r})")]
    try:
        dtype, vocab, counts = np.dtype(attrs["dtype"]), int(attrs["tokenizer"]["vocab_size"]), attrs["counts"]
        expected = {name: (int(counts[name]["tokens"]), int(counts[name]["documents"])) for name in SPLITS}
    except (KeyError, TypeError, ValueError) as e:
        return [Row(meta_path, check, False, f"attributes incomplete or malformed ({e})")]
    if dtype.name not in ("uint16", "uint32") or vocab > np.iinfo(dtype).max + 1:
        return [Row(meta_path, check, False, f"vocab_size {vocab} in dtype {dtype.name}: not a token store's")]
    if "attrs_sha256" in attrs:  # format 1 recorded it from some version on: checked where present
        bad = _attrs_mismatch(attrs, meta_path)
        if bad:
            return [bad]
    rows = [Row(meta_path, check, True, f"format 1, vocab {vocab}, {dtype.name}")]
    rows += _verify_part(root, dtype, vocab, {}, "1")
    if not all(row.ok for row in rows):
        return rows
    for name in SPLITS:
        tokens = array_layout(root / name / "tokens", dtype)[0]
        documents = array_layout(root / name / "doc_offsets", np.dtype("int64"))[0] - 1
        if (tokens, documents) != expected[name]:
            return rows + [Row(meta_path, "counts against the arrays", False,
                               f"attributes say {name} has {expected[name][1]} documents / {expected[name][0]} "
                               f"tokens, the arrays hold {documents} / {tokens}")]
    return rows + [Row(meta_path, "counts against the arrays", True, "train and val as the attributes say")]


def _attrs_mismatch(attrs: dict, meta_path: Path) -> Row | None:
    from pipeline.data.store.layout import ATTRS_CHECKSUM, attrs_checksum

    if attrs.get(ATTRS_CHECKSUM) != attrs_checksum(attrs):
        return Row(meta_path, "attribute checksum", False, f"{ATTRS_CHECKSUM} missing or not matching the attributes")
    return None


def _verify_part(root: Path, dtype: np.dtype, vocab: int, hashes: dict, version: str) -> list[Row]:
    """The train/val arrays under `root`; `hashes` maps "train/tokens/c/0" to its recorded sha256."""
    from pipeline.data.store.layout import SPLITS
    from pipeline.data.store.views import array_layout

    rows = []
    for name in SPLITS:
        lengths = {}
        for array, array_dtype, limit in (("tokens", dtype, vocab), ("doc_offsets", np.dtype("int64"), None)):
            array_dir = root / name / array
            try:
                length, chunk_len = array_layout(array_dir, array_dtype)  # metadata and chunk file sizes
            except UserError as e:
                rows.append(_failed(e, array_dir, "array layout"))
                return rows
            lengths[array] = length
            recorded = {key.rpartition("/c/")[2]: str(v) for key, v in hashes.items()
                        if key.startswith(f"{name}/{array}/c/")}
            rows.append(_check_chunks(array_dir, array_dtype, length, chunk_len, recorded, version, limit))
            if not rows[-1].ok:
                return rows
        offsets = _read_array(root / name / "doc_offsets", lengths["doc_offsets"])
        rows.append(_check_offsets(root / name / "doc_offsets", offsets, lengths["tokens"]))
    return rows


def _read_array(array_dir: Path, length: int) -> np.ndarray:
    meta = json.loads((array_dir / "zarr.json").read_text(encoding="utf-8"))
    chunk_len = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    n_chunks = -(-length // chunk_len) if length else 0
    parts = [np.frombuffer((array_dir / "c" / str(i)).read_bytes(), dtype="<i8") for i in range(n_chunks)]
    return np.concatenate(parts)[:length] if parts else np.zeros(0, dtype=np.int64)


def _check_chunks(array_dir: Path, dtype: np.dtype, length: int, chunk_len: int, expected: dict[str, str],
                  version: str, vocab: int | None = None) -> Row:
    """Hash every chunk file of one array; with `vocab`, also check every token id is below it."""
    n_chunks = -(-length // chunk_len) if length else 0
    check = "chunk sha256" + (", token ids < vocab" if vocab is not None else "")
    largest = -1
    for i in range(n_chunks):
        f = array_dir / "c" / str(i)
        data = f.read_bytes()
        if vocab is not None:  # before the hash: an id out of range says more than "sha256 differs"
            valid = np.frombuffer(data, dtype=dtype.newbyteorder("<"))[: min(chunk_len, length - i * chunk_len)]
            if valid.size:
                top = int(valid.max())
                if top >= vocab:
                    pos = int(np.argmax(valid >= vocab))
                    return Row(f, check, False, f"token id {int(valid[pos])} at position {i * chunk_len + pos} "
                                                f"is not below vocab_size {vocab}")
                largest = max(largest, top)
        if str(i) in expected and hashlib.sha256(data).hexdigest() != expected[str(i)]:
            return Row(f, check, False, "sha256 differs from the one recorded when the store was written")
    if expected and len(expected) != n_chunks:
        return Row(array_dir, check, False, f"{len(expected)} chunk hashes recorded for {n_chunks} chunk files")
    hashed = f"{n_chunks} chunk file(s), sha256 matching" if expected else \
        f"{n_chunks} chunk file(s), no hashes recorded (store format {version})"
    ids = f"; largest id {largest} < {vocab}" if vocab is not None and largest >= 0 else ""
    return Row(array_dir, check, True, hashed + ids)


def _check_offsets(array_dir: Path, offsets: np.ndarray, n_tokens: int) -> Row:
    check = "doc offsets monotone, in range"
    if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != n_tokens:
        return Row(array_dir, check, False, f"offsets must run from 0 to the token count {n_tokens}")
    steps = np.diff(offsets)
    if steps.size and steps.min() < 0:
        d = int(np.argmax(steps < 0))
        return Row(array_dir, check, False, f"offset of document {d + 1} ({int(offsets[d + 1])}) is below "
                                            f"document {d}'s ({int(offsets[d])})")
    return Row(array_dir, check, True, f"{offsets.size - 1} documents over {n_tokens} tokens")


# ---------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------


def verify_export(directory: Path) -> list[Row]:
    rows = []
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            expected = read_manifest(manifest)
        except ValueError as e:
            return [Row(manifest, "sha256", False, str(e).partition(": ")[2])]
        for name, digest in expected.items():
            f = directory / name
            if not f.is_file():
                rows.append(Row(f, "sha256", False, f"listed in {MANIFEST} but missing"))
            elif file_sha256(f) != digest:
                rows.append(Row(f, "sha256", False, f"sha256 differs from the one {MANIFEST} recorded at export"))
            else:
                rows.append(Row(f, "sha256", True, f"matches {MANIFEST}"))
    else:
        rows.append(Row(manifest, "sha256", True, f"no {MANIFEST} (exported by an older mm): hashes not checked"))
    for f in sorted(directory.glob("*.safetensors")):
        rows.append(_check_safetensors(f))
    return rows


def _check_safetensors(path: Path) -> Row:
    """The header parses and its tensors tile the data section exactly (catches truncation)."""
    check = "safetensors header"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            return Row(path, check, False, "header length is not within the file (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return Row(path, check, False, "header is not valid JSON")
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    end = 0
    for start, stop in spans:
        if start != end or stop < start:
            return Row(path, check, False, f"tensor data offsets are not contiguous at byte {start}")
        end = stop
    if 8 + n + end != size:
        return Row(path, check, False, f"file is {size} bytes, the header describes {8 + n + end}")
    return Row(path, check, True, f"{len(spans)} tensors, sizes consistent")
