"""Reading text from columnar input: Parquet files and Hugging Face `datasets` directories.

Both are read with pyarrow (the optional extra `mm[parquet]`; `datasets` itself
is not needed: a `save_to_disk` directory is Arrow IPC stream files listed in
its state.json). Rows are streamed in record batches, one text column only, so
memory stays flat. A Parquet file can be read in part, by whole row groups.
Every value of the column goes to the same row rules as a JSONL line's text
(`readers.parse_value`): null or a non-string is `not_string`, "" is
`empty_text`, undecodable bytes are `not_utf8`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import UserError

ROWS_PER_READ = 1024


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: reading Parquet or `datasets` input needs pyarrow (pip install 'mm[parquet]')") \
            from None
    return pyarrow


def _column(path: Path, schema, text_field: str) -> None:
    if schema.get_field_index(text_field) < 0:
        raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                        "set the source's text_field")


# --------------------------------------------------------------------------- datasets directories


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def datasets_files(path: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` directory, in the dataset's row order."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path / 'state.json'}: not a `datasets` state file (no _data_files)") from None
    files = [path / n for n in names]
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: listed in {path / 'state.json'} but missing")
    return files


# --------------------------------------------------------------------------- Parquet


def parquet_row_groups(path: Path) -> list[tuple[int, int]]:
    """(rows, compressed bytes) of each row group: the units a part takes whole."""
    pa = _pyarrow(path)
    try:
        meta = pa.parquet.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    out = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        out.append((rg.num_rows, sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))))
    return out


def _row_group_extent(meta, g0: int, g1: int) -> tuple[int, int]:
    """Byte range of the file holding row groups [g0, g1) (their column chunks)."""
    lo, hi = None, 0
    for g in range(g0, g1):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            lo = start if lo is None else min(lo, start)
            hi = max(hi, start + col.total_compressed_size)
    return (lo or 0), hi


def _hash_range(path: Path, lo: int, hi: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(lo)
        left = hi - lo
        while left > 0:
            b = f.read(min(left, 1 << 22))
            if not b:
                break
            sha.update(b)
            left -= len(b)
    return sha.hexdigest()


def iter_parquet(path: Path, text_field: str, g0: int, g1: int, block_bytes: int):
    """Yield (first_row, values) for row groups [g0, g1); returns {sha256, rows, first_row}.

    sha256 covers the bytes of those row groups' column chunks, so each part
    fingerprints exactly the share of the file it read."""
    pa = _pyarrow(path)
    pf = pa.parquet.ParquetFile(path)
    _column(path, pf.schema_arrow, text_field)
    meta = pf.metadata
    first = sum(meta.row_group(g).num_rows for g in range(g0))
    row = first
    if g1 > g0:
        try:
            batches = pf.iter_batches(batch_size=ROWS_PER_READ, row_groups=list(range(g0, g1)),
                                      columns=[text_field])
            yield from _blocks((b.column(0) for b in batches), row, block_bytes)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        row = first + sum(meta.row_group(g).num_rows for g in range(g0, g1))
    return {"sha256": _hash_range(path, *_row_group_extent(meta, g0, g1)), "rows": row - first, "first_row": first}


# --------------------------------------------------------------------------- Arrow (datasets)


def iter_arrow(path: Path, text_field: str, block_bytes: int):
    """Yield (first_row, values) for an Arrow IPC file (stream or file format); returns {sha256, rows}."""
    pa = _pyarrow(path)
    rows = 0
    try:
        with pa.memory_map(str(path)) as src:
            try:
                reader = pa.ipc.open_stream(src)
                batches = iter(reader)
            except pa.ArrowInvalid:
                src.seek(0)
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            _column(path, reader.schema, text_field)
            i = reader.schema.get_field_index(text_field)
            for first, values in _blocks((b.column(i) for b in batches), 0, block_bytes):
                rows = first + len(values)
                yield first, values
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return {"sha256": _hash_range(path, 0, path.stat().st_size), "rows": rows}


def _blocks(columns, first_row: int, block_bytes: int):
    """Regroup record batches into blocks of about `block_bytes` of text (rows as Python values)."""
    values: list = []
    size = 0
    for col in columns:
        values.extend(col.to_pylist())
        size += col.nbytes
        if size >= block_bytes:
            yield first_row, values
            first_row += len(values)
            values, size = [], 0
    if values:
        yield first_row, values
