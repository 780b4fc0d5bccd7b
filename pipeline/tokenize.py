"""Raw JSONL → the packed token store (`tokens.zarr`, layout in `pipeline.token_store`).

How it runs:

- The main process reads each input file in blocks (gzip is decompressed on
  the fly), cuts them at line ends into batches of about `BATCH_BYTES`, and
  hashes the raw file bytes as they pass (the source fingerprint).
- Worker processes (spawned, one tokenizer thread each) parse the lines,
  encode the texts with `Tokenizer.encode_batch`, split documents into
  train/val by a hash of their text, and return packed token arrays.
- The main process consumes the results strictly in input order and appends
  them to raw chunk files, with at most a few batches in flight, so memory
  does not grow with the input and the output does not depend on the number
  of workers. Nothing in the output depends on batch boundaries either.
- At the end the Zarr metadata (zarr.json for the group and each array) is
  written and the finished store is renamed into place; an
  interrupted run leaves only a hidden temporary directory that is removed.

Chunk files are written directly: the arrays use the v3 `bytes` codec
(little-endian) with no compressor, so a chunk file *is* the raw tokens, and
the default chunk-key encoding puts chunk i of `train/tokens` at
`train/tokens/c/i`. A split with more than one chunk has its last chunk padded
to full size (zeros, as a sparse file) as the spec requires; a split that fits
in one chunk gets a chunk shape equal to its length, so there is no padding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.readers import BATCH_BYTES, REASONS, check_inputs, iter_blocks, parse_line, split_lines
from pipeline.store_writer import ChunkWriter
from pipeline.token_store import (ATTRS_CHECKSUM, CHUNK_TOKENS, FORMAT_NAME, FORMAT_VERSION, OFFSET_CHUNK,
                                  attrs_checksum, token_dtype, write_metadata)

FIRST_LINES_KEPT = 5
"""Line numbers remembered per rejection reason."""


# --------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(tokenizer_json: str, text_field: str, val_fraction: float, bos: int, eos: int, dtype: str,
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


def _encode(task: tuple[int, bytes]) -> dict:
    """A block of lines → packed tokens per split, doc lengths, byte counts, rejects."""
    first_line_no, data = task
    lines = split_lines(data, first_line_no)
    texts, splits, nbytes, rejects = [], [], [0, 0], []
    for i, line in enumerate(lines):
        text, b, reason = parse_line(line, _W["field"])
        if reason is not None:
            rejects.append((reason, first_line_no + i))
            continue
        s = split_of(b, _W["val"])
        texts.append(text)
        splits.append(s)
        nbytes[s] += len(b)
    encs = _W["tok"].encode_batch(texts, add_special_tokens=False) if texts else []
    bos, eos = _W["bos"], _W["eos"]
    flat: list[list[int]] = [[], []]
    lens: list[list[int]] = [[], []]
    for enc, s in zip(encs, splits):
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
        "lines": len(lines),
    }


# --------------------------------------------------------------------------- writing


def _result(future, path: Path) -> dict:
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise UserError(f"{path}: a tokenize worker process died (out of memory? try fewer --workers)") from None


def _abort(pool) -> None:
    """Stop a ProcessPoolExecutor now, killing workers busy with batches in flight."""
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join()


@dataclass
class _Split:
    tokens: ChunkWriter
    offsets: ChunkWriter
    docs: int = 0
    bytes: int = 0
    end: int = 0


@dataclass
class _Rejects:
    counts: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lst = self.first.setdefault(reason, [])
        if len(lst) < FIRST_LINES_KEPT:
            lst.append(where)

    def as_attrs(self) -> dict:
        return {r: {"count": self.counts[r], "first_lines": self.first[r]} for r in REASONS if r in self.counts}


def _progress(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn, DownloadColumn)

    console = Console(stderr=True)
    return Progress(
        TextColumn("tokenize"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not (enabled and console.is_terminal), transient=False,
    )


def tokenize_files(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    val_fraction: float,
    text_field: str = "text",
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
    batch_bytes: int = BATCH_BYTES,
) -> dict:
    """Tokenize JSONL files into a token store at `out`; returns the store attributes
    plus `seconds` (wall time) and `path`.

    `workers` processes encode in parallel (1 = encode in this process); the output
    is byte-identical for any value. `val_fraction` has no default here: the one
    default is params' data.val_fraction (`mm tokenize`). `chunk_tokens` and `batch_bytes` exist for tests.
    """
    from pipeline.tokenizer import load_tokenizer

    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if not inputs:
        raise UserError("no input files given")
    check_inputs(inputs)
    if not (0.0 <= val_fraction <= 1.0):
        raise UserError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if out.exists() and not force:
        raise UserError(f"{out}: output exists (use --force to replace it)")
    tok, info = load_tokenizer(tokenizer_dir)
    del tok
    dtype = token_dtype(info["vocab_size"])

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    staging = work / "staging"
    t0 = time.perf_counter()
    tokenizer_json = Path(tokenizer_dir) if Path(tokenizer_dir).is_file() else Path(tokenizer_dir) / "tokenizer.json"
    init = (str(tokenizer_json), text_field, float(val_fraction),
            info["bos_id"], info["eos_id"], dtype)
    try:
        splits = {
            name: _Split(ChunkWriter(staging / name / "tokens", dtype, chunk_tokens),
                         ChunkWriter(staging / name / "doc_offsets", "int64", OFFSET_CHUNK))
            for name in ("train", "val")
        }
        for sp in splits.values():
            sp.offsets.append(np.zeros(1, dtype=np.int64))
        rejects = _Rejects()
        sources = []
        total_lines = 0
        total_size = sum(p.stat().st_size for p in inputs)
        n_tokens = 0

        def consume(res: dict, path: Path) -> None:
            nonlocal total_lines, n_tokens
            for reason, line_no in res["rejects"]:
                if strict:
                    raise UserError(f"{path}:{line_no}: rejected line ({reason.replace('_', ' ')})")
                rejects.add(reason, f"{path.name}:{line_no}")
            total_lines += res["lines"]
            for i, name in enumerate(("train", "val")):
                sp = splits[name]
                toks, lens = res["tokens"][i], res["lens"][i]
                if lens.size:
                    sp.tokens.append(toks)
                    sp.offsets.append(sp.end + np.cumsum(lens))
                    sp.end += int(toks.size)
                    sp.docs += int(lens.size)
                    n_tokens += int(toks.size)
                sp.bytes += res["bytes"][i]

        pool = None
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent holds a tokenizer and rich's refresh thread. An
            # executor (not mp.Pool) because a worker that dies fails the run instead of
            # hanging it.
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                       initializer=_init_worker, initargs=init)
        else:  # in this process, leaving its environment (and the tokenizer's threads) alone
            _init_worker(*init, single_thread=False)
        try:
            with _progress(progress, total_size) as bar:
                task = bar.add_task("tokenize", total=total_size, tps="0")

                def advance(pos_delta: int) -> None:
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=pos_delta, tps=f"{n_tokens / el:,.0f}")

                for path in inputs:
                    file_lines_before = total_lines
                    pending: deque = deque()
                    last_pos = 0
                    gen = iter_blocks(path, batch_bytes)
                    while True:
                        try:
                            pos, line_no, data = next(gen)
                        except StopIteration as stop:
                            reader = stop.value
                            break
                        delta, last_pos = pos - last_pos, pos
                        if pool is None:
                            consume(_encode((line_no, data)), path)
                            advance(delta)
                            continue
                        pending.append((pool.submit(_encode, (line_no, data)), delta))
                        while len(pending) > 2 * workers:  # bounded in flight: memory stays flat
                            res, d = pending.popleft()
                            consume(_result(res, path), path)
                            advance(d)
                    while pending:
                        res, d = pending.popleft()
                        consume(_result(res, path), path)
                        advance(d)
                    advance(reader.pos - last_pos)
                    sources.append({"name": path.name, "size": reader.pos, "sha256": reader.sha.hexdigest(),
                                    "lines": total_lines - file_lines_before})
            if pool is not None:
                pool.shutdown(wait=True)
                pool = None
        finally:
            if pool is not None:  # an error or Ctrl-C: do not wait for batches in flight
                _abort(pool)

        shapes = {}
        for name, sp in splits.items():
            shapes[name] = {"tokens": sp.tokens.finish(), "doc_offsets": sp.offsets.finish()}
        n_rejected = sum(rejects.counts.values())
        attrs = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": dtype,
            "tokenizer": {
                "fingerprint": info["fingerprint"],
                "vocab_size": info["vocab_size"],
                "bos_id": info["bos_id"],
                "eos_id": info["eos_id"],
                "pad_id": info["pad_id"],
            },
            "text_field": text_field,
            "val_fraction": float(val_fraction),
            "split_hash": "blake2b-64 of the UTF-8 text < val_fraction * 2**64 -> val",
            "sources": sources,
            "counts": {
                "lines": total_lines,
                "kept": total_lines - n_rejected,
                "rejected": n_rejected,
                **{name: {"documents": sp.docs, "tokens": sp.tokens.n, "bytes": sp.bytes}
                   for name, sp in splits.items()},
            },
            "rejected": rejects.as_attrs(),
        }
        attrs[ATTRS_CHECKSUM] = attrs_checksum(attrs)  # open_store refuses hand-edited attributes
        store = work / "store"
        write_metadata(store, attrs, dtype, shapes)
        for name in ("train", "val"):
            for arr in ("tokens", "doc_offsets"):
                os.rename(staging / name / arr / "c", store / name / arr / "c")
        if out.exists():  # --force: swap in the new store, then drop the old one
            old = work / "old"
            os.rename(out, old)
        os.rename(store, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**attrs, "seconds": time.perf_counter() - t0, "path": str(out)}
