"""`mm sample`: write the embedded default corpus (Python stdlib docstrings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, SetOption, load


def sample(
    out: Annotated[Path, typer.Argument(help="JSONL file to write.")] = Path("data/sample.jsonl"),
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Write the embedded default corpus: Python stdlib docstrings as JSONL."""
    load(params, sets)  # validates params.yaml and --set even though nothing here reads them
    from pipeline.data.corpus import write_sample

    info = write_sample(out)
    typer.echo(f"wrote {info['documents']} documents ({info['bytes'] / 1e6:.1f} MB) to {info['path']}")
