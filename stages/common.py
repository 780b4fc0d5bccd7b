"""Options every stage shares, and params loading for the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a param: section.key=value (repeatable)."),
]


def load(params_path: Path, sets: list[str] | None):
    """Load params.yaml plus --set overrides (imported lazily: keeps `mm --help` fast).

    Every command binds --set to a parameter named `sets` (SetOption)."""
    from pipeline.params import load_params

    return load_params(params_path, sets or [])
