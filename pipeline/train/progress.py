"""What rank 0 shows and records while training: a live bar or log lines, and metric files.

Files in the output directory (DVC reads them: see dvc.yaml):
  train_log.tsv   one row per optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s, skipped,
                  grad_syncs (micro-steps that all-reduced gradients: 1 under DDP, 0 on one
                  process, nan under FSDP where it is not counted)
  val_log.tsv     one row per evaluation: step, val_loss
  perf_log.tsv    one row per optimizer step: step, mfu, peak_memory_mb (what the machine did; the
                  trackers' train/mfu and train/peak_memory_mb, re-logged from here on a resume)
  metrics.json    the final figures (`dvc metrics show`)
On resume the logs are cut back to the resumed step, so they always describe
one uninterrupted curve. A resume that adds or removes a source changes the
tokens/NAME and val_loss/NAME columns: the earlier rows are kept, their columns
migrated (a column a row did not have is an empty cell; a removed source's
column stays, empty from then on).
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
PERF_COLUMNS = ["step", "mfu", "peak_memory_mb"]


class MetricLog:
    """An append-only TSV, flushed every row, truncated to `keep_until_step` when reopened.

    The rows kept are rewritten under the new header, matched by column name: `columns` first,
    then any column of the earlier rows that this run does not write (empty in its rows)."""

    def __init__(self, path: Path, columns: list[str], keep_until_step: int):
        self.own = list(columns)
        kept: list[dict] = []
        earlier: list[str] = []
        if keep_until_step > 0 and path.exists():
            lines = path.read_text().splitlines()
            earlier = lines[0].split("\t") if lines else []
            for line in lines[1:]:
                # A kill -9 can leave a partial last row: keep only whole rows.
                fields = line.split("\t")
                if len(fields) == len(earlier) and fields[0].isdigit() and int(fields[0]) <= keep_until_step:
                    kept.append(dict(zip(earlier, fields, strict=True)))
        self.columns = self.own + [c for c in earlier if c not in self.own] if kept else self.own
        rows = "".join("\t".join(row.get(c, "") for c in self.columns) + "\n" for row in kept)
        # Rewrite atomically, so a kill while cutting back never loses the kept rows.
        atomic.write_text(path, "\t".join(self.columns) + "\n" + rows)
        self.file = open(path, "a")

    def write(self, **row) -> None:
        own = set(self.own)  # a column only earlier rows had is left empty
        self.file.write("\t".join(_fmt(row[c]) if c in own else "" for c in self.columns) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt(value) -> str:
    # repr keeps every bit of a float, so logs can be compared exactly across runs.
    return repr(float(value)) if isinstance(value, float) else str(value)


def read_log(path: Path) -> list[dict]:
    """The rows as {column: float}; an empty cell (a column the row's run did not write) is left out."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [{c: float(v) for c, v in zip(header, line.split("\t"), strict=False) if v != ""}
            for line in lines[1:] if line]


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
        self.last: tuple | None = None  # the last step's (step, loss, lr, grad_norm, tokens/s, MFU)
        self.held = False  # the last step's line waits for its evaluation (plain lines only)
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
        self.last = (step, loss, lr, grad_norm, tokens_per_s, mfu)
        if self.live:
            self.bar.update(self.task, completed=step, stats=self._stats())
        elif step == self.total:  # held until the last evaluation (or close): the last line shows its val
            self.held = True
        elif step % self.log_interval == 0:
            self._print_line()

    def evaluated(self, val_loss: float) -> None:
        """A new validation loss: shown from now on, and on the line of the step it was measured at."""
        self.val_loss = val_loss
        if self.live and self.last is not None:
            self.bar.update(self.task, stats=self._stats())
        elif self.held:
            self._print_line()

    def _stats(self) -> str:
        _, loss, lr, grad_norm, tokens_per_s, mfu = self.last
        val = f"  val {self.val_loss:.4f}" if math.isfinite(self.val_loss) else ""  # nothing until evaluated
        return (f"loss {loss:.4f}{val}  lr {lr:.2e}  |g| {grad_norm:.2f}  "
                f"{tokens_per_s:,.0f} tok/s  MFU {100 * mfu:.1f}% vs {self.peak_source}")

    def _print_line(self) -> None:
        step = self.last[0]
        eta = (time.perf_counter() - self.t0) / max(step - self.start_step, 1) * (self.total - step)
        print(f"step {step}/{self.total}  {self._stats()}  eta {eta:.0f}s", file=sys.stderr, flush=True)
        self.held = False

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.held:  # no evaluation at the last step
            self._print_line()
        if self.live:
            self.bar.stop()
