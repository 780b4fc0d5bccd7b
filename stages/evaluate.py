"""`mm eval`: validation loss, perplexity and bits per byte of a model on the val split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def evaluate(
    model: Annotated[Path, typer.Argument(help="An `mm export` directory or a ckpt.pth.")] = Path("export"),
    data: Annotated[Path, typer.Option("--data", help="Token store whose val/ split is scored.")] = Path("data/tokens.zarr"),
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON to write (for dvc metrics).")] = Path("out/eval.json"),
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Window length (default: params train.seq_len).")] = None,
    per_document: Annotated[bool, typer.Option("--per-document", help="Score each val document on its own (positions from 0, no earlier context).")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Score the val split: loss (nats/token), perplexity, bits per byte; JSON + a table."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.evaluate import evaluate_model
    from pipeline.progress import write_metrics

    p = load(params, sets)
    result = evaluate_model(model, data, seq_len or p.train.seq_len, p.eval.batches, p.eval.batch_size, device,
                            per_document=per_document)
    write_metrics(out, result)

    table = Table(title=f"{model} on {data} val", show_header=False)
    table.add_row("val loss (nats/token)", f"{result['val_loss']:.4f}")
    table.add_row("perplexity", f"{result['perplexity']:.2f}")
    table.add_row("bits per byte", f"{result['bits_per_byte']:.4f}")
    pieces = "document pieces of at most" if per_document else "windows of"
    table.add_row("scored", f"{result['tokens']:,} tokens, {result['bytes']:,} bytes, {result['windows']} {pieces} {result['seq_len']}")
    if "train_val_loss" in result:
        # Same scorer and window rule; training scored train.eval_batches windows in its own precision.
        table.add_row("val loss at training", f"{result['train_val_loss']:.4f}")
        table.caption = "training scored its own number of windows (train.eval_batches) in its training dtype"
    Console().print(table)
    Console().print(f"wrote {out}")
