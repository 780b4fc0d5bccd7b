"""What rank 0 shows and records while training: a live bar or log lines, and metric files.

Files in the output directory (DVC reads them: see dvc.yaml):
  train_log.tsv   one row per optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s, skipped,
                  grad_syncs (micro-steps that all-reduced gradients: 1 under DDP, 0 on one
                  process, nan under FSDP where it is not counted)
  val_log.tsv     one row per evaluation: step, val_loss
  metrics.json    the final figures (`dvc metrics show`)
On resume the logs are cut back to the resumed step, so they always describe
one uninterrupted curve.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from pipeline import atomic

TRAIN_COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped", "grad_syncs"]
VAL_COLUMNS = ["step", "val_loss"]


class MetricLog:
    """An append-only TSV, flushed every row, truncated to `keep_until_step` when reopened."""

    def __init__(self, path: Path, columns: list[str], keep_until_step: int):
        self.columns = columns
        kept = []
        if keep_until_step > 0 and path.exists():
            for line in path.read_text().splitlines()[1:]:
                # A kill -9 can leave a partial last row: keep only whole rows.
                fields = line.split("\t")
                if len(fields) == len(columns) and fields[0].isdigit() and int(fields[0]) <= keep_until_step:
                    kept.append(line)
        # Rewrite atomically, so a kill while cutting back never loses the kept rows.
        atomic.write_text(path, "\t".join(columns) + "\n" + "".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, **row) -> None:
        self.file.write("\t".join(_fmt(row[c]) for c in self.columns) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt(value) -> str:
    # repr keeps every bit of a float, so logs can be compared exactly across runs.
    return repr(float(value)) if isinstance(value, float) else str(value)


def read_log(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, (float(v) for v in line.split("\t")), strict=False)) for line in lines[1:] if line]


def write_metrics(path: Path, metrics: dict) -> None:
    """Write a metrics JSON atomically; NaN/inf become null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    atomic.write_text(path, json.dumps(clean, indent=2) + "\n")


class Display:
    """A rich live bar on a terminal; plain lines every log_interval steps otherwise."""

    def __init__(self, total_steps: int, start_step: int, log_interval: int, enabled: bool):
        self.total, self.log_interval, self.enabled = total_steps, log_interval, enabled
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.val_loss = float("nan")
        self.peak_source = "measured matmul peak"  # what MFU divides by (hardware.peak_source)
        self.live = enabled and sys.stderr.isatty()
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            from rich.table import Column

            # Stats fold onto a second line on narrow terminals instead of being cut off.
            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=20), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}", table_column=Column(overflow="fold")),
                transient=False, console=Console(stderr=True),  # stdout stays free for the user
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, stats="")
            self.bar.start()

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float) -> None:
        if not self.enabled:
            return
        val = f"  val {self.val_loss:.4f}" if math.isfinite(self.val_loss) else ""  # nothing until evaluated
        stats = (f"loss {loss:.4f}{val}  lr {lr:.2e}  |g| {grad_norm:.2f}  "
                 f"{tokens_per_s:,.0f} tok/s  MFU {100 * mfu:.1f}% vs {self.peak_source}")
        if self.live:
            self.bar.update(self.task, completed=step, stats=stats)
        elif step % self.log_interval == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {stats}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            self.bar.stop()
