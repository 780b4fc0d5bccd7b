"""Raw text → one part of the token store (layout in `pipeline.data.store.layout`).

`tokenize_files(inputs, tokenizer, STORE, source=NAME, part=(I, N))` writes the
group `STORE/NAME/part-IIIII-of-NNNNN` and nothing else but the root and source
groups when they are missing. How it runs:

- `pipeline.data.inputs` lists the input files and the share of them part I of N
  reads; the main process reads that share in blocks (whole lines, or rows of a
  text column), hashing the bytes it reads (the input fingerprint).
- Worker processes (spawned, one tokenizer thread each; `pipeline.data.tokenize_worker`)
  check each line or row (`pipeline.data.readers`), encode the texts with
  `Tokenizer.encode_batch`, split documents into train/val by a hash of their
  text, and return packed arrays.
- The main process consumes the results strictly in input order and appends
  them to raw chunk files, with at most a few batches in flight, so memory
  does not grow with the input and the output does not depend on the number
  of workers. Nothing in the output depends on batch boundaries either.
- The part is written under a hidden temporary name (`pipeline.data.store.writer`),
  fsynced and renamed into place (`pipeline.atomic.publish_dir`) while holding
  the part's lock: a part that exists is complete, and writers of other parts
  never wait for each other.

Chunk files are written directly: the arrays use the v3 `bytes` codec
(little-endian) with no compressor, so a chunk file *is* the raw tokens, and
the default chunk-key encoding puts chunk i of `train/tokens` at
`train/tokens/c/i`. A split with more than one chunk has its last chunk padded
to full size (zeros, as a sparse file) as the spec requires; a split that fits
in one chunk gets a chunk shape equal to its length, so there is no padding.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from pathlib import Path

from pipeline.atomic import publish_dir
from pipeline.data.inputs import SUFFIXES, Share, expand_inputs, iter_share, plan_part
from pipeline.data.readers import BATCH_BYTES, no_text_error
from pipeline.data.sources import SOURCE_NAME
from pipeline.data.store.layout import ATTRS_CHECKSUM, FORMAT_NAME, FORMAT_VERSION, MAX_PARTS, attrs_checksum, part_name
from pipeline.data.store.reader import read_group_attrs
from pipeline.data.store.remote import is_url
from pipeline.data.store.writer import (
    CHUNK_TOKENS,
    PartLock,
    PartWriter,
    check_root_dir,
    clear_stale,
    create_if_missing,
    ensure_source,
    group_document,
    token_dtype,
    write_metadata,
)
from pipeline.data.tokenize_worker import SPLIT_HASH, encode_block, init_worker
from pipeline.errors import UserError

# --------------------------------------------------------------------------- the encoding loop


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


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("tokenize"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not (enabled and console.is_terminal), transient=False,
    )


def _encode_shares(shares: list[Share], part: PartWriter, init: tuple, workers: int, progress: bool,
                   batch_bytes: int) -> list[dict]:
    """Read the shares, encode their blocks (in `workers` processes), feed `part` in input order;
    returns each share's input record."""
    pool = None
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent holds a tokenizer and rich's refresh thread. An executor
        # (not mp.Pool) because a worker that dies fails the run instead of hanging it.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                                   initargs=init)
    else:  # in this process, leaving its environment (and the tokenizer's threads) alone
        init_worker(*init, single_thread=False)
    t0 = time.perf_counter()
    records = []
    try:
        with _progress(progress) as bar:
            bar_task = bar.add_task("tokenize", total=sum(s.weight for s in shares), tps="0")

            def advance(delta: int) -> None:
                bar.update(bar_task, advance=delta, tps=f"{part.tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")

            for share in shares:
                pending: deque = deque()
                done = 0
                gen = iter_share(share, init[1], batch_bytes)
                while True:
                    try:
                        pos, task = next(gen)
                    except StopIteration as stop:
                        records.append(stop.value)
                        break
                    delta, done = max(pos - done, 0), max(pos, done)
                    if pool is None:
                        part.consume(encode_block(task), share.file.path, share.file.name)
                        advance(delta)
                        continue
                    pending.append((pool.submit(encode_block, task), delta))
                    while len(pending) > 2 * workers:  # bounded in flight: memory stays flat
                        fut, d = pending.popleft()
                        part.consume(_result(fut, share.file.path), share.file.path, share.file.name)
                        advance(d)
                while pending:
                    fut, d = pending.popleft()
                    part.consume(_result(fut, share.file.path), share.file.path, share.file.name)
                    advance(d)
                advance(max(share.weight - done, 0))
        if pool is not None:
            pool.shutdown(wait=True)
            pool = None
    finally:
        if pool is not None:  # an error or Ctrl-C: do not wait for batches in flight
            _abort(pool)
    return records


# --------------------------------------------------------------------------- a part of a store


def default_source(path: str | Path) -> str:
    """The source name `mm tokenize FILE` uses: the file's name without its format suffix."""
    name = Path(path).name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0] if not Path(path).is_dir() else name


def _root_attrs(info: dict, dtype: str) -> dict:
    attrs = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype,
             "tokenizer": {k: info[k] for k in ("fingerprint", "vocab_size", "bos_id", "eos_id", "pad_id")}}
    attrs[ATTRS_CHECKSUM] = attrs_checksum(attrs)
    return attrs


def _open_root(store: Path, attrs: dict) -> None:
    """Create the store's root group if missing; refuse a store made with another tokenizer."""
    check_root_dir(store)
    store.mkdir(parents=True, exist_ok=True)
    create_if_missing(store / "zarr.json", group_document(attrs))
    meta = read_group_attrs(store)[1]
    have, want = meta.get("tokenizer") or {}, attrs["tokenizer"]
    if have.get("fingerprint") != want["fingerprint"]:
        raise UserError(f"{store}: made with another tokenizer (sha256 {str(have.get('fingerprint'))[:12]}, "
                        f"vocab {have.get('vocab_size')}; this one {want['fingerprint'][:12]}, vocab "
                        f"{want['vocab_size']}): write into another --out")


def _check_args(source: str, part: tuple[int, int], val_fraction: float, workers: int) -> None:
    if not SOURCE_NAME.fullmatch(source):
        raise UserError(f"source name {source!r}: use letters, digits, '_', '.', '-' (--source NAME)")
    index, count = part
    if not (1 <= count <= MAX_PARTS and 0 <= index < count):
        raise UserError(f"--part {index}/{count}: expected I/N with 0 <= I < N <= {MAX_PARTS}")
    if not (0.0 <= val_fraction <= 1.0):
        raise UserError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def init_store(out: str | Path, tokenizer_dir: str | Path) -> None:
    """Create the store's root group for this tokenizer (refusing a store made with another)."""
    from pipeline.data.tokenizer import load_tokenizer

    _, info = load_tokenizer(tokenizer_dir)
    attrs = _root_attrs(info, token_dtype(info["vocab_size"]))
    if is_url(out):
        from pipeline.data.store.upload import create_root

        return create_root(out, group_document(attrs))
    _open_root(Path(out), attrs)


def _check_kept(counts: dict, rejects, inputs: list, files: list, text_field: str, part: tuple[int, int]) -> None:
    """No document kept is a mistake (a wrong text field, a CSV, an empty file), not a part to publish:
    an empty part would fail only at `mm train`, and replacing it would need --force. A part of several
    whose share holds no line at all is fine: small inputs leave some parts nothing to read."""
    if counts["kept"] or not (counts["rejected"] or part[1] == 1 or not any(f.size for f in files)):
        return
    where = ", ".join(map(str, inputs)) + (f" (part {part[0]}/{part[1]})" if part[1] > 1 else "")
    raise no_text_error(where, text_field, rejects.counts, {r: lines[0] for r, lines in rejects.first.items() if lines})


def tokenize_files(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    source: str | None = None,
    part: tuple[int, int] = (0, 1),
    workers: int = 1,
    val_fraction: float,
    text_field: str = "text",
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
    batch_bytes: int = BATCH_BYTES,
) -> dict:
    """Tokenize part `part` = (I, N) of `inputs` into the group `out/source/part-I-of-N`;
    returns the part's attributes plus `seconds` (wall time), `path` (the part) and `store`.

    `source` defaults to the first input's name without its suffix. `workers`
    processes encode in parallel (1 = in this process); the output is
    byte-identical for any value. `val_fraction` has no default here: the one
    default is params' data.val_fraction (`mm tokenize`). `chunk_tokens` and
    `batch_bytes` exist for tests.
    """
    from pipeline.data.tokenizer import load_tokenizer

    if not inputs:
        raise UserError("no input files given")
    source = source or default_source(inputs[0])
    _check_args(source, part, val_fraction, workers)
    if is_url(out):  # object storage: built in a local staging store, checked, uploaded (store/upload.py)
        from pipeline.data.store.upload import tokenize_to_url

        return tokenize_to_url(out, source, part, force, lambda staging: tokenize_files(
            inputs, tokenizer_dir, staging, source=source, part=part, workers=workers, val_fraction=val_fraction,
            text_field=text_field, strict=strict, progress=progress, chunk_tokens=chunk_tokens,
            batch_bytes=batch_bytes))
    files = expand_inputs(inputs)
    _, info = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(info["vocab_size"])
    store = Path(out)
    _open_root(store, _root_attrs(info, dtype))
    sdir = ensure_source(store, source)
    name = part_name(*part)
    final = sdir / name
    t0 = time.perf_counter()
    with PartLock(sdir / f".{name}.lock", str(final)):
        clear_stale(sdir, name)  # first: a complete part a crash left moved aside is put back
        if final.exists() and not force:
            raise UserError(f"{final}: part exists (use --force to replace it)")
        tmp = sdir / f".{name}.tmp-{os.getpid()}"
        try:
            shares = plan_part(files, *part)
            tok_json = Path(tokenizer_dir) if Path(tokenizer_dir).is_file() else Path(tokenizer_dir) / "tokenizer.json"
            init = (str(tok_json), text_field, float(val_fraction), info["bos_id"], info["eos_id"], dtype)
            writer = PartWriter(tmp, dtype, chunk_tokens, strict)
            records = _encode_shares(shares, writer, init, workers, progress, batch_bytes)
            shapes, counts, hashes = writer.finish()
            _check_kept(counts, writer.rejects, inputs, files, text_field, part)
            attrs = {**_root_attrs(info, dtype), "source": source, "part": {"index": part[0], "count": part[1]},
                     "text_field": text_field, "val_fraction": float(val_fraction), "split_hash": SPLIT_HASH,
                     "inputs": records, "counts": counts, "rejected": writer.rejects.as_attrs(),
                     "chunk_sha256": hashes}
            attrs[ATTRS_CHECKSUM] = attrs_checksum(attrs)  # the reader refuses hand-edited attributes
            write_metadata(tmp, attrs, dtype, shapes)
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**attrs, "seconds": time.perf_counter() - t0, "path": str(final), "store": str(store)}
