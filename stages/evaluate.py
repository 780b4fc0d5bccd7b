"""`mm eval`: validation loss, perplexity and bits per byte on the val split of each source training
reads and of their weighted mix; or, with --tasks, benchmark tasks through lm-evaluation-harness on an
exported model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def evaluate(
    model: Annotated[Path, typer.Argument(help="An `mm export` directory or a ckpt.pth.")] = Path("export"),
    data: Annotated[str, typer.Option(
        "--data", help="Token store whose val/ split is scored (a directory or an s3://, gs://, az:// URL).")
    ] = "data/tokens.zarr",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Metrics JSON for dvc metrics (default out/eval.json; with --tasks out/bench.json).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="Window length (default: params train.seq_len).")] = None,
    per_document: Annotated[bool, typer.Option(
        "--per-document", help="Score each val document on its own (positions from 0, no earlier context).")] = False,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help="Benchmark tasks instead of the val split: lm-eval task names or task YAML files, "
                        "comma-separated (needs mm[bench]).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        "--num-fewshot", help="Examples in each prompt (default: params bench.num_fewshot, 0).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="Score the first N documents of each task (default: params bench.limit; 0 = all).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Requests per forward pass (default: params bench.batch_size).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Hugging Face home holding the tasks' cached data (hub/, datasets/).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Score the val split of each source and their mix (loss in nats/token, perplexity, bits per byte), or run
    benchmark tasks (--tasks). The sources and weights are training's: params data.sources."""
    p = load(params, sets)
    from pipeline.data.store.cache import configure

    configure(p.data.cache_dir, p.data.cache_gb)  # where a store in object storage (s3://...) is cached
    if tasks is not None:
        _benchmarks(model, tasks.split(","), out or Path("out/bench.json"), p, num_fewshot, limit, batch_size,
                    data_dir, device)
        return

    from rich.console import Console
    from rich.table import Table

    from pipeline.data.sources import source_weights
    from pipeline.evaluate.held_out import evaluate_model
    from pipeline.train.progress import write_metrics

    out = out or Path("out/eval.json")
    result = evaluate_model(model, data, seq_len or p.train.seq_len, p.eval.batches, p.eval.batch_size, device,
                            per_document=per_document, weights=source_weights(p.data.sources, p.data.text_field),
                            note=lambda line: print(line, file=sys.stderr, flush=True))
    write_metrics(out, result)

    pieces = "document pieces of at most" if per_document else "windows of"
    table = Table(title=f"{model} on {data} val ({result['windows']} {pieces} {result['seq_len']} tokens)")
    for column in ("source", "share", "val loss (nats/token)", "perplexity", "bits per byte", "tokens", "bytes"):
        table.add_column(column, justify="left" if column == "source" else "right")
    total = sum(s["weight"] for s in result["by_source"].values())
    rows = [(name, f"{s['weight'] / total:.3f}", s) for name, s in result["by_source"].items()]
    if len(rows) > 1:  # the top level of out/eval.json: the figures training's validation reports
        rows.append(("mix", "1", result))
    for name, weight, s in rows:
        table.add_row(name, weight, f"{s['val_loss']:.4f}", f"{s['perplexity']:.2f}", f"{s['bits_per_byte']:.4f}",
                      f"{s['tokens']:,}", f"{s['bytes']:,}")
    if "train_val_loss" in result:
        # Same scorer and window rule; training scored train.eval_batches windows in its own precision.
        table.caption = (f"val loss at training: {result['train_val_loss']:.4f} (its own number of windows, "
                         "train.eval_batches, in its training dtype)")
    Console().print(table)
    Console().print(f"wrote {out}")


def _benchmarks(model: Path, tasks: list[str], out: Path, p, num_fewshot, limit, batch_size, data_dir, device) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.evaluate.benchmarks import metric_rows, run_benchmarks
    from pipeline.train.progress import write_metrics

    harness_dir = out.with_suffix("")  # out/bench.json → the harness's own files in out/bench/
    result = run_benchmarks(model, tasks, harness_dir,
                            num_fewshot=p.bench.num_fewshot if num_fewshot is None else num_fewshot,
                            limit=p.bench.limit if limit is None else limit,
                            batch_size=batch_size or p.bench.batch_size, device=device, data_dir=data_dir)
    write_metrics(out, {**result["results"], "config": result["config"]})

    config = result["config"]
    shots = f"{config['num_fewshot']}-shot" + (f", first {config['limit']} per task" if config["limit"] else "")
    table = Table(title=f"{model}: lm-eval {config['lm_eval']}, {shots}")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metric, value, stderr in metric_rows(result["results"]):
        table.add_row(task, metric, f"{value:.4f}", "n/a" if stderr is None else f"{stderr:.4f}")
    Console().print(table)
    Console().print(f"wrote {out} and the harness's files under {harness_dir}/")
