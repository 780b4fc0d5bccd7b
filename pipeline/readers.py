"""Reading raw text input: JSONL files (plain or gzip), line by line, streaming.

Shared by tokenizer training (`pipeline.tokenizer`) and tokenization
(`pipeline.tokenize`), so both apply the same rules to every line: a line is
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


# --------------------------------------------------------------------------- files


class _HashingReader:
    """A binary file wrapper that hashes and counts every byte read through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.pos += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


def check_inputs(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            raise UserError(f"{p}: input file not found")
        if not p.is_file():
            raise UserError(f"{p}: not a file")


def iter_blocks(path: Path, block_bytes: int = BATCH_BYTES):
    """Yield (raw_pos, first_line_no, data) for `path`: data holds whole lines only.

    `raw_pos` is how far into the file on disk reading has got (progress);
    lines are numbered from 1. The last block may lack a final newline. The
    reader object is returned when the generator finishes (StopIteration.value).
    """
    raw = open(path, "rb")
    reader = _HashingReader(raw)
    src = gzip.GzipFile(fileobj=reader, mode="rb") if path.name.endswith(".gz") else reader
    try:
        line_no = 1
        parts: list[bytes] = []  # a line longer than a block accumulates here
        while True:
            try:
                block = src.read(block_bytes)
            except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt gzip stream
                raise UserError(f"{path}: cannot read ({e})") from None
            if not block:
                break
            cut = block.rfind(b"\n")
            if cut < 0:
                parts.append(block)
                continue
            data = b"".join(parts) + block[: cut + 1] if parts else block[: cut + 1]
            parts = [block[cut + 1 :]] if cut + 1 < len(block) else []
            yield reader.pos, line_no, data
            line_no += data.count(b"\n")
        tail = b"".join(parts)
        if tail:
            yield reader.pos, line_no, tail
        reader.drain()  # gzip may stop before trailing bytes; the hash covers the whole file
    finally:
        raw.close()
    return reader


def iter_texts(paths: list[Path], text_field: str = "text"):
    """Stream the texts of valid lines from JSONL files (bad lines skipped silently;
    `mm tokenize` is where they are counted)."""
    for path in paths:
        for _, line_no, data in iter_blocks(Path(path)):
            for line in split_lines(data, line_no):
                text, _, _ = parse_line(line, text_field)
                if text is not None:
                    yield text
