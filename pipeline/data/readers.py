"""Reading raw text input: JSONL files (plain, gzip or zstd), line by line, streaming.

Shared by tokenizer training (`pipeline.data.tokenizer`) and tokenization
(`pipeline.data.tokenize`), so both apply the same rules to every line: a line is
either a document's text or rejected for exactly one reason in `REASONS`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path

from pipeline.errors import UserError

BATCH_BYTES = 1 << 18
"""Raw bytes of input per block: small enough that the last block of a file (when the
other workers are already idle) costs little."""
BOM = b"\xef\xbb\xbf"
REASONS = ("empty_line", "not_utf8", "not_json", "not_object", "missing_field", "not_string", "empty_text")
"""Why a line is rejected: blank line; invalid UTF-8 (or a lone surrogate escape);
not JSON; JSON but not an object; no text field; text not a string; empty text."""


# --------------------------------------------------------------------------- lines


def split_lines(data: bytes, first_line_no: int) -> list[bytes]:
    """A block from `iter_blocks` → its lines (no newlines; the file's BOM stripped from line 1)."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    if first_line_no == 1 and lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM):]
    return lines


def parse_line(line: bytes, text_field: str) -> tuple[str | None, bytes | None, str | None]:
    """One raw line (no newline, no BOM) → (text, its UTF-8 bytes, None) or (None, None, reason)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line.strip():
        return None, None, "empty_line"
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, None, "not_utf8"
    try:
        obj = json.loads(s)
    except (ValueError, RecursionError):
        return None, None, "not_json"
    if not isinstance(obj, dict):
        return None, None, "not_object"
    if text_field not in obj:
        return None, None, "missing_field"
    text = obj[text_field]
    if not isinstance(text, str):
        return None, None, "not_string"
    if not text:
        return None, None, "empty_text"
    try:
        utf8 = text.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": valid JSON, not valid Unicode
        return None, None, "not_utf8"
    return text, utf8, None


_NO_TEXT_HINTS = {
    "missing_field": "; name the text's field with --text-field (or the source's text_field)",
    "not_json": "; the input must be JSON Lines: one JSON object per line",
    "not_object": "; the input must be JSON Lines: one JSON object per line, not an array",
}


def no_text_error(where: str, text_field: str, counts: dict[str, int], firsts: dict | None = None) -> UserError:
    """The one line for input that yields no document at all: which input, which field, and the
    most common reason its lines were rejected (ties: the first in `REASONS`); `firsts`: reason →
    where the first such line is."""
    total = sum(counts.values())
    if not total:
        return UserError(f"{where}: no text at all (no lines or rows); nothing written")
    reason = max(REASONS, key=lambda r: counts.get(r, 0))
    first = (firsts or {}).get(reason)
    at = f", first at {first}" if first else ""
    unit = "rows" if first and ":row " in first else "lines"
    return UserError(f"{where}: no usable text in field '{text_field}': all {total:,} {unit} rejected, most "
                     f"often {reason} ({counts[reason]:,}{at}){_NO_TEXT_HINTS.get(reason, '')}; nothing written")


def parse_value(value) -> tuple[str | None, bytes | None, str | None]:
    """One value of a text column (Parquet, Arrow) → like `parse_line`: the same reasons."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, None, "not_utf8"
    if not isinstance(value, str):
        return None, None, "not_string"  # null, a number, a list: as {"text": null} in JSONL
    if not value:
        return None, None, "empty_text"
    try:
        utf8 = value.encode("utf-8")
    except UnicodeEncodeError:
        return None, None, "not_utf8"
    return value, utf8, None


# --------------------------------------------------------------------------- files


class _HashingReader:
    """A binary file wrapper that hashes and counts every byte read through it."""

    def __init__(self, f, hashing: bool = True):
        self.f = f
        self.sha = hashlib.sha256() if hashing else None
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if self.sha is not None:
            self.sha.update(b)
        self.pos += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


def _decompressor(path: Path, compression: str, reader):
    if compression == "gz":
        return gzip.GzipFile(fileobj=reader, mode="rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst needs the zstandard package (pip install 'mm[zstd]')") from None
        return zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True)
    return reader


def _read_errors():
    errors: tuple = (OSError, EOFError, zlib.error)  # zlib.error: a corrupt gzip stream
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _line_start(raw, start: int, block_bytes: int) -> int | None:
    """The offset of the first line that starts at or after `start` (None: no line does)."""
    raw.seek(start - 1)
    pos = start - 1
    while True:
        b = raw.read(block_bytes)
        if not b:
            return None
        k = b.find(b"\n")
        if k >= 0:
            return pos + k + 1
        pos += len(b)


def iter_blocks(path: Path, block_bytes: int = BATCH_BYTES, compression: str | None = None,
                start: int = 0, end: int | None = None):
    """Yield (raw_pos, first_line_no, first_byte, data) for `path`: data holds whole lines only.

    `compression` is "gz", "zst" or "" (default: from the file name). Plain files
    may be read in part: the lines that *start* in bytes [start, end), so that
    ranges cut anywhere split a file into whole lines with none lost or doubled.
    `first_line_no` counts from 1 when reading from the file's start, else is None
    (a part that starts mid-file does not read the lines before it); `first_byte`
    is the offset of the block's first line in the (decompressed) file; `raw_pos`
    is how far into the file on disk reading has got (progress). The last block
    may lack a final newline. Returns (StopIteration.value) a dict: sha256 of the
    bytes read (the whole file when compressed), bytes, lines.
    """
    if compression is None:
        compression = "gz" if path.name.endswith(".gz") else "zst" if path.name.endswith(".zst") else ""
    ranged = start > 0 or end is not None
    if ranged and compression:
        raise ValueError("byte ranges only for plain files")
    errors = _read_errors()
    raw = open(path, "rb")
    try:
        pos = _line_start(raw, start, block_bytes) if start > 0 else 0
        limit = (end if end is not None else float("inf")) - (pos or 0)
        if pos is None or limit <= 0:
            return {"sha256": hashlib.sha256().hexdigest(), "bytes": 0, "lines": 0}
        raw.seek(pos)
        reader = _HashingReader(raw, hashing=bool(compression))  # plain: hash what is yielded
        sha = hashlib.sha256()
        src = _decompressor(path, compression, reader)
        line_no, first_byte, n_lines = (1 if pos == 0 else None), pos, 0
        parts: list[bytes] = []  # a line longer than a block accumulates here
        done = False
        while not done:
            try:
                block = src.read(block_bytes)
            except errors as e:
                raise UserError(f"{path}: cannot read ({e})") from None
            if not block:
                data = b"".join(parts)  # the last line, without a newline
                done = True
            else:
                cut = block.rfind(b"\n")
                if cut < 0:
                    parts.append(block)
                    continue
                data = b"".join(parts) + block[: cut + 1] if parts else block[: cut + 1]
                parts = [block[cut + 1 :]] if cut + 1 < len(block) else []
            rel = first_byte - pos
            if rel >= limit:
                break
            if rel + len(data) > limit:  # lines starting at or past `end` are the next part's
                k = data.find(b"\n", int(limit) - rel - 1)
                data, done = (data[: k + 1] if k >= 0 else data), True
            if not data:
                break
            if not compression:
                sha.update(data)
            yield reader.pos, line_no, first_byte, data
            n = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            n_lines += n
            first_byte += len(data)
            if line_no is not None:
                line_no += n
        if compression:
            reader.drain()  # the decoder may stop before trailing bytes; the hash covers the whole file
            return {"sha256": reader.sha.hexdigest(), "bytes": reader.pos, "lines": n_lines}
        return {"sha256": sha.hexdigest(), "bytes": first_byte - pos, "lines": n_lines}
    finally:
        raw.close()
