"""`mm export`: a checkpoint as a Hugging Face model directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="Checkpoint to export; a bare file name that is not here is taken from train.out_dir "
             "(`mm export ckpt.pth` exports out/ckpt.pth).")] = Path("out/ckpt.pth"),
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output directory (hf) or file (gguf; default export.gguf).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32 | bf16 | fp16 (default: params export.dtype).")
                     ] = None,
    format: Annotated[str, typer.Option("--format", help="hf (transformers directory) or gguf (llama.cpp file).")
                      ] = "hf",
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Export a checkpoint for transformers (safetensors + config + tokenizer) or llama.cpp (GGUF)."""
    from rich.console import Console

    from pipeline.checkpoint.format import load_checkpoint, model_config
    from pipeline.errors import UserError
    from pipeline.export.exporter import export_gguf, export_hf
    from pipeline.export.hf_format import ARCHITECTURES, hf_model_type

    p = load(params, sets)
    dtype = dtype or p.export.dtype
    if format not in ("hf", "gguf"):
        raise UserError(f"--format: must be hf or gguf, got {format!r}")
    if not checkpoint.exists() and checkpoint.parent == Path(".") and (Path(p.train.out_dir) / checkpoint).exists():
        checkpoint = Path(p.train.out_dir) / checkpoint  # `mm export ckpt.pth`: the run's own checkpoint
    state = load_checkpoint(checkpoint)
    source = str(checkpoint)
    if format == "hf":
        path = export_hf(state, out or Path("export"), dtype, source=source)
        kind = ARCHITECTURES[hf_model_type(model_config(state, source))]
    else:
        path = export_gguf(state, out or Path("export.gguf"), dtype, source=source)
        kind = "GGUF"
    Console().print(f"exported {checkpoint} (step {state['step']}) → {path} ({kind}, {dtype})")
