"""`mm tokenize`: raw JSONL into the packed token store (tokens.zarr)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def tokenize(
    raw: Annotated[Optional[list[Path]], typer.Argument(help="JSONL files (.jsonl, .jsonl.gz); default: params data.raw.")] = None,
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="Hugging Face tokenizer directory.")] = Path("data/tokenizer"),
    out: Annotated[Path, typer.Option("--out", help="Token store to write.")] = Path("data/tokens.zarr"),
    workers: Annotated[int, typer.Option("--workers", help="Encoding processes (output is identical for any number).")] = min(os.cpu_count() or 1, 8),
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Held-out fraction (default: params data.val_fraction).")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="JSON field with the text (default: params data.text_field).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad line instead of skipping it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output store.")] = False,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Tokenize JSONL into packed Zarr token shards (train/val split by document hash)."""
    p = load(params, sets)
    from rich.console import Console
    from rich.table import Table

    from pipeline.tokenize import tokenize_files

    r = tokenize_files(
        raw or [Path(p.data.raw)],
        tokenizer,
        out,
        workers=workers,
        val_fraction=val_fraction if val_fraction is not None else p.data.val_fraction,
        text_field=text_field or p.data.text_field,
        strict=strict,
        force=force,
    )
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
    console.print(f"lines {c['lines']:,}: kept {c['kept']:,}, rejected {c['rejected']:,}")
    for reason, info in r["rejected"].items():
        console.print(f"  {reason}: {info['count']:,} (first: {', '.join(info['first_lines'])})")
    tokens = c["train"]["tokens"] + c["val"]["tokens"]
    size = sum(s["size"] for s in r["sources"])
    sec = r["seconds"]
    console.print(f"time {sec:.1f} s ({size / 1e6 / sec:.1f} MB/s, {tokens / sec:,.0f} tokens/s, {workers} workers)")
