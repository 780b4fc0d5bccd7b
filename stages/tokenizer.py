"""`mm tokenizer`: train a byte-level BPE tokenizer on raw text (files, or sources in params)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def tokenizer(
    raw: Annotated[Optional[list[Path]], typer.Argument(
        help="Input files or directories; default: the sources in params tokenizer.sources.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        "--vocab-size", help="Vocabulary size (default: params tokenizer.vocab_size).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Tokenizer directory to write.")] = Path("data/tokenizer"),
    text_field: Annotated[Optional[str], typer.Option(
        "--text-field", help="JSON field or column of the text (default: params data.text_field).")] = None,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Train a byte-level BPE tokenizer (Hugging Face format) on text files, or on the
    sources params names in tokenizer.sources (every data.sources entry when that is empty)."""
    p = load(params, sets)
    from pipeline.data.sources import parse_sources
    from pipeline.data.tokenizer_training import train_tokenizer_on

    if raw:
        groups = [(list(raw), text_field or p.data.text_field)]
    else:
        sources = parse_sources(p.data.sources, p.data.text_field)
        names = p.tokenizer.sources or list(sources)
        groups = [(list(sources[n].paths), text_field or sources[n].text_field) for n in names]
    vocab = vocab_size if vocab_size is not None else p.tokenizer.vocab_size
    info = train_tokenizer_on(groups, out, vocab)
    typer.echo(f"wrote tokenizer to {info['path']} (vocab {info['vocab_size']}, sha256 {info['fingerprint'][:12]})")
