"""What a tokenize worker process runs: check each line or row of a block, encode the texts, split
documents into train/val, and return packed arrays.

`pipeline.data.tokenize` starts the workers (spawned processes, `init_worker` as the
initializer, one tokenizer thread each) and submits blocks to `encode_block`;
with one worker it calls both in its own process. The state a worker needs
(the tokenizer, the text field, the split rule, the special ids) lives in `_W`,
one per process.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from pipeline.data.readers import parse_line, parse_value, split_lines

SPLIT_HASH = "blake2b-64 of the UTF-8 text < val_fraction * 2**64 -> val"
"""The split rule as recorded in every part's attributes (split_of implements it)."""

_W: dict = {}  # this process's tokenizer, text field, split fraction, special ids, dtype


def init_worker(tokenizer_json: str, text_field: str, val_fraction: float, bos: int, eos: int, dtype: str,
                single_thread: bool = True) -> None:
    if single_thread:
        # A worker process: one tokenizer thread each, parallelism comes from processes.
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _W.update(tok=Tokenizer.from_file(tokenizer_json), field=text_field, val=val_fraction,
              bos=bos, eos=eos, dtype=np.dtype(dtype))


def split_of(text_utf8: bytes, val_fraction: float) -> int:
    """0 = train, 1 = val: blake2b-64 of the UTF-8 text, read as a fraction of 2**64."""
    h = int.from_bytes(hashlib.blake2b(text_utf8, digest_size=8).digest(), "little")
    return 1 if h < val_fraction * 2.0**64 else 0


def _checked(task: tuple):
    """Yield (text, utf8, reason, location) for every line or row of a task."""
    kind, first, *rest = task
    if kind == "rows":
        for i, value in enumerate(rest[0]):
            yield (*parse_value(value), f"row {first + i}")
        return
    first_byte, data = rest
    offset = first_byte
    for i, line in enumerate(split_lines(data, first or 0)):
        # A part that starts mid-file has not counted the lines before it: byte offsets name its lines.
        yield (*parse_line(line, _W["field"]), str(first + i) if first is not None else f"byte {offset}")
        offset += len(line) + 1


def encode_block(task: tuple) -> dict:
    """A block of lines or rows → packed tokens per split, doc lengths, byte counts, rejects."""
    texts, splits, nbytes, rejects, n = [], [], [0, 0], [], 0
    for text, b, reason, where in _checked(task):
        n += 1
        if reason is not None:
            rejects.append((reason, where))
            continue
        s = split_of(b, _W["val"])
        texts.append(text)
        splits.append(s)
        nbytes[s] += len(b)
    encs = _W["tok"].encode_batch(texts, add_special_tokens=False) if texts else []
    bos, eos = _W["bos"], _W["eos"]
    flat: list[list[int]] = [[], []]
    lens: list[list[int]] = [[], []]
    for enc, s in zip(encs, splits, strict=True):
        ids = enc.ids
        out = flat[s]
        out.append(bos)
        out.extend(ids)
        out.append(eos)
        lens[s].append(len(ids) + 2)
    dt = _W["dtype"]
    return {
        "tokens": [np.array(flat[0], dtype=dt), np.array(flat[1], dtype=dt)],
        "lens": [np.array(lens[0], dtype=np.int64), np.array(lens[1], dtype=np.int64)],
        "bytes": nbytes,
        "rejects": rejects,
        "lines": n,
    }
