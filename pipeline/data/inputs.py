"""A source's input: which files its paths hold, and which share of them part I of N reads.

Paths are files or directories; a directory is read in sorted name order
(recursively, hidden names skipped), taking `.jsonl`, `.jsonl.gz`, `.jsonl.zst`
and `.parquet` files and `datasets` directories (`save_to_disk`). A file named
explicitly is JSONL whatever its name, unless it ends in `.parquet` or `.arrow`.

Parts: the input is laid on one axis of bytes (plain JSONL by byte, compressed
files as one unit each, Parquet by row group, Arrow files as one unit each) and
part I of N takes the units that start in [T·I/N, T·(I+1)/N); a plain JSONL
file contributes the lines that start in that range. So parts 0..N-1 together
read every line and row exactly once, in the order of a single run.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import columnar
from pipeline.data.readers import BATCH_BYTES, iter_blocks, no_text_error, parse_line, parse_value, split_lines
from pipeline.errors import UserError

SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet"}


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str
    """How attributes and messages name it: the path below the directory given, or the file name."""
    fmt: str
    """jsonl | jsonl.gz | jsonl.zst | parquet | arrow"""
    size: int


@dataclass(frozen=True)
class Share:
    """What one part reads of one file: bytes [start, end) of line starts (plain JSONL),
    row groups [start, end) (Parquet) or the whole file (unit "file", 0..1)."""

    file: InputFile
    unit: str
    start: int
    end: int
    weight: int
    """Bytes on disk it stands for (progress)."""


# --------------------------------------------------------------------------- files


def _format_of(path: Path, explicit: bool) -> str | None:
    name = path.name.lower()
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    if explicit and name.endswith(".arrow"):  # one Arrow file of a `datasets` directory
        return "arrow"
    if explicit:  # a file the user named: JSONL, compressed by its extension
        return "jsonl.gz" if name.endswith(".gz") else "jsonl.zst" if name.endswith(".zst") else "jsonl"
    return None


def _walk(root: Path, d: Path, out: list[InputFile]) -> None:
    for p in sorted(d.iterdir(), key=lambda q: q.name):
        if p.name.startswith("."):
            continue
        if columnar.is_datasets_dir(p):
            out.extend(_datasets(p, p.relative_to(root).as_posix()))
        elif p.is_dir():
            _walk(root, p, out)
        elif (fmt := _format_of(p, explicit=False)) is not None:
            out.append(InputFile(p, p.relative_to(root).as_posix(), fmt, p.stat().st_size))


def _datasets(d: Path, label: str) -> list[InputFile]:
    return [InputFile(f, f"{label}/{f.name}", "arrow", f.stat().st_size) for f in columnar.datasets_files(d)]


def expand_inputs(paths: list[str | Path]) -> list[InputFile]:
    """The files that `paths` stand for, in reading order; a UserError names a missing one."""
    out: list[InputFile] = []
    if not paths:
        raise UserError("no input files given")
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: input file not found")
        if columnar.is_datasets_dir(p):
            out.extend(_datasets(p, p.name))
        elif p.is_dir():
            if (p / "dataset_dict.json").is_file():
                raise UserError(f"{p}: a `datasets` DatasetDict; give one split's directory (e.g. {p / 'train'})")
            found: list[InputFile] = []
            _walk(p, p, found)
            if not found:
                raise UserError(f"{p}: no .jsonl, .jsonl.gz, .jsonl.zst, .parquet files or datasets directories")
            out.extend(found)
        elif p.is_file():
            out.append(InputFile(p, p.name, _format_of(p, explicit=True), p.stat().st_size))
        else:
            raise UserError(f"{p}: not a file or directory")
    return out


# --------------------------------------------------------------------------- parts


def plan_part(files: list[InputFile], index: int, count: int) -> list[Share]:
    """The shares part `index` of `count` reads, in reading order (see the module docstring)."""
    units = []  # (file, unit kind, start, end, weight): the indivisible pieces, in order
    for f in files:
        if f.fmt == "jsonl":
            units.append((f, "bytes", 0, f.size, f.size))
        elif f.fmt == "parquet":
            groups = columnar.parquet_row_groups(f.path)
            if not groups:
                units.append((f, "row_groups", 0, 0, 0))
            units.extend((f, "row_groups", g, g + 1, size) for g, (_, size) in enumerate(groups))
        else:
            units.append((f, "file", 0, 1, f.size))
    total = sum(u[4] for u in units)
    los = [total * p // count for p in range(count)]
    lo, hi = los[index], (total * (index + 1) // count)

    def owner(g: int) -> int:  # the part whose range holds global offset g (the end belongs to the last)
        return min(bisect.bisect_right(los, g) - 1, count - 1) if total else 0

    shares: list[Share] = []
    g = 0
    for f, unit, start, end, weight in units:
        if unit == "bytes":
            a, b = min(max(lo - g, 0), weight), min(max(hi - g, 0), weight)
            if a < b or (weight == 0 and owner(g) == index):
                shares.append(Share(f, unit, a, b, b - a))
        elif owner(g) == index:
            last = shares[-1] if shares else None
            if last is not None and last.file == f and last.unit == unit and last.end == start:
                shares[-1] = Share(f, unit, last.start, end, last.weight + weight)  # consecutive row groups
            else:
                shares.append(Share(f, unit, start, end, weight))
        g += weight
    return shares


def iter_share(share: Share, text_field: str, block_bytes: int = BATCH_BYTES):
    """Yield tasks for the encoders, in order: ("lines", first_line_no|None, first_byte, data)
    or ("rows", first_row, values), each with the bytes read so far as `progress` first.
    Returns (StopIteration.value) the share's record for the part's `inputs` attribute."""
    f = share.file
    record = {"name": f.name, "format": f.fmt, "size": f.size,
              "range": {"unit": share.unit, "start": share.start, "end": share.end}}
    if f.fmt.startswith("jsonl"):
        compression = f.fmt.partition(".")[2]
        ranged = {"start": share.start, "end": share.end if share.end < f.size else None} if not compression else {}
        gen = iter_blocks(f.path, block_bytes, compression, **ranged)
        while True:
            try:
                raw_pos, line_no, first_byte, data = next(gen)
            except StopIteration as stop:
                info = stop.value
                break
            done = raw_pos if compression else first_byte + len(data) - share.start
            yield done, ("lines", line_no, first_byte, data)
        record.update(sha256=info["sha256"], lines=info["lines"])
        return record
    gen = (columnar.iter_parquet(f.path, text_field, share.start, share.end, block_bytes) if f.fmt == "parquet"
           else columnar.iter_arrow(f.path, text_field, block_bytes))
    while True:
        try:
            first_row, values = next(gen)
        except StopIteration as stop:
            info = stop.value
            break
        yield 0, ("rows", first_row, values)
    record.update(sha256=info["sha256"], rows=info["rows"])
    if f.fmt == "parquet":
        record["range"]["rows"] = [info["first_row"], info["first_row"] + info["rows"]]
    return record


def iter_texts(paths: list[str | Path], text_field: str = "text", rejects: dict[str, int] | None = None):
    """Stream the texts of valid lines and rows of `paths` in order; bad ones are skipped,
    counted by reason in `rejects` when given (`mm tokenize` records where they are)."""
    for share in plan_part(expand_inputs(paths), 0, 1):
        for _, task in iter_share(share, text_field):
            if task[0] == "rows":
                checked = (parse_value(v) for v in task[2])
            else:
                checked = (parse_line(line, text_field) for line in split_lines(task[3], task[1] or 0))
            for text, _, reason in checked:
                if text is not None:
                    yield text
                elif rejects is not None:
                    rejects[reason] = rejects.get(reason, 0) + 1


def check_has_text(paths: list[str | Path], text_field: str) -> None:
    """UserError (`no_text_error`) unless `paths` hold a usable line or row; reading stops at the
    first one, so a good source costs one block."""
    rejects: dict[str, int] = {}
    for _ in iter_texts(paths, text_field, rejects):
        return
    raise no_text_error(", ".join(map(str, paths)), text_field, rejects)
