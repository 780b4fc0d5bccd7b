"""`mm tokenizer`: train a byte-level BPE tokenizer on raw JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def tokenizer(
    raw: Annotated[Optional[list[Path]], typer.Argument(help="JSONL files (.jsonl, .jsonl.gz); default: params data.raw.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="Vocabulary size (default: params tokenizer.vocab_size).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Tokenizer directory to write.")] = Path("data/tokenizer"),
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="JSON field with the text (default: params data.text_field).")] = None,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Train a byte-level BPE tokenizer (Hugging Face format) on JSONL text."""
    p = load(params, sets)
    from pipeline.tokenizer import train_tokenizer

    info = train_tokenizer(
        raw or [Path(p.data.raw)],
        out,
        vocab_size=vocab_size if vocab_size is not None else p.tokenizer.vocab_size,
        text_field=text_field or p.data.text_field,
    )
    typer.echo(f"wrote tokenizer to {info['path']} (vocab {info['vocab_size']}, sha256 {info['fingerprint'][:12]})")
