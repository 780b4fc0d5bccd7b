"""`mm tokenize`: raw text into one part of one source of the token store (tokens.zarr)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load

HELP = """Tokenize raw text into one source of the token store (train/val split by document hash).

A store holds named sources (web, code, zh, ...), each tokenized on its own, so adding
or changing one never re-tokenizes the others; training draws from them by the weights
in params (data.sources.NAME.weight). A source can be tokenized as N parts, on N machines
at once, into one store on a shared filesystem: part I of N reads only its share of the
input and writes only STORE/NAME/part-IIIII-of-NNNNN.

\b
  mm tokenize data/raw.jsonl                      source "raw", one part, into data/tokens.zarr
  mm tokenize --source web                        the files of data.sources.web in params
  mm tokenize                                     every source in data.sources
  mm tokenize data/web/ --source web --part 3/8   part 3 of 8 (run 0/8 ... 7/8 anywhere, any order)

Inputs: .jsonl, .jsonl.gz, .jsonl.zst, .parquet, a `datasets` save_to_disk directory, or a
directory of such files (read in sorted name order)."""


def _part(text: str) -> tuple[int, int]:
    from pipeline.errors import UserError

    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()):
        raise UserError(f"--part {text!r}: expected I/N, e.g. 0/4")
    return int(i), int(n)


def tokenize(
    raw: Annotated[Optional[list[Path]], typer.Argument(
        help="Input files or directories; default: the source's paths in params data.sources.")] = None,
    source: Annotated[Optional[str], typer.Option(
        "--source", help="Source name in the store (default: the first input's name; no inputs: a data.sources name)."
    )] = None,
    part: Annotated[str, typer.Option("--part", help="Which part of the source to write: I/N (from 0).")] = "0/1",
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="Hugging Face tokenizer directory.")] = Path(
        "data/tokenizer"),
    out: Annotated[str, typer.Option(
        "--out", help="Token store (created if missing): a directory or an s3://, gs://, az:// URL.")
    ] = "data/tokens.zarr",
    workers: Annotated[int, typer.Option(
        "--workers", help="Encoding processes (output is identical for any number).")] = min(os.cpu_count() or 1, 8),
    val_fraction: Annotated[Optional[float], typer.Option(
        "--val-fraction", help="Held-out fraction (default: params data.val_fraction).")] = None,
    text_field: Annotated[Optional[str], typer.Option(
        "--text-field", help="JSON field or column of the text (default: the source's, else data.text_field).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad line or row.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace this part if it exists (nothing else).")] = False,
    init: Annotated[bool, typer.Option(
        "--init", help="Only create the store's root group for this tokenizer (dvc.yaml's store stage).")] = False,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    p = load(params, sets)
    from pipeline.data.sources import parse_sources
    from pipeline.data.store.cache import configure
    from pipeline.data.tokenize import init_store, tokenize_files
    from pipeline.errors import UserError

    configure(p.data.cache_dir, p.data.cache_gb)  # its staging directory holds a part on its way to a URL
    if init:
        init_store(out, tokenizer)
        typer.echo(f"store root {out.rstrip('/')}/zarr.json ready")
        return
    sources = parse_sources(p.data.sources, p.data.text_field)
    if raw:
        spec = sources.get(source) if source else None
        jobs = [(list(raw), source, text_field or (spec.text_field if spec else p.data.text_field))]
    else:
        if source is not None and source not in sources:
            raise UserError(f"--source {source}: not in data.sources (known: {', '.join(sources)}); "
                            "give input files to tokenize a source params does not name")
        names = [source] if source else list(sources)
        jobs = [(list(sources[n].paths), n, text_field or sources[n].text_field) for n in names]
    if len(jobs) > 1:  # a source with no usable text stops the command before any other is published
        from pipeline.data.inputs import check_has_text

        for inputs, _, field in jobs:
            check_has_text(inputs, field)
    for inputs, name, field in jobs:
        r = tokenize_files(inputs, tokenizer, out, source=name, part=_part(part), workers=workers,
                           val_fraction=val_fraction if val_fraction is not None else p.data.val_fraction,
                           text_field=field, strict=strict, force=force)
        _summary(r, workers)


def _summary(r: dict, workers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    c = r["counts"]
    table = Table(title=f"{r['path']}  ({r['dtype']}, vocab {r['tokenizer']['vocab_size']})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name in ("train", "val"):
        s = c[name]
        bpt = f"{s['bytes'] / s['tokens']:.2f}" if s["tokens"] else "-"
        table.add_row(name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", bpt)
    console = Console()
    console.print(table)
    console.print(f"lines/rows {c['lines']:,}: kept {c['kept']:,}, rejected {c['rejected']:,}")
    for reason, info in r["rejected"].items():
        console.print(f"  {reason}: {info['count']:,} (first: {', '.join(info['first_lines'])})")
    tokens = c["train"]["tokens"] + c["val"]["tokens"]
    size = sum(_read_bytes(i) for i in r["inputs"])
    sec = r["seconds"]
    console.print(f"time {sec:.1f} s ({size / 1e6 / sec:.2f} MB/s of input read, {tokens / sec:,.0f} tokens/s, "
                  f"{workers} workers)")


def _read_bytes(record: dict) -> int:
    rng = record["range"]
    return rng["end"] - rng["start"] if rng["unit"] == "bytes" else record["size"]
