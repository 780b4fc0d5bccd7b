"""The loss-spike guard (train.spike_*): judge every step's loss, and roll back, skip or abort on a spike.

A spike is a step loss above spike_factor × the median of the last spike_window
losses judged normal (no step is judged before the window is full, and a
non-finite loss is train.nonfinite's business, not this guard's). The loss is the
global one every rank agreed on, so every rank takes the same decision.

What `judge` does with a spike (train.spike_action):
  rollback  restore the last good state: the weights and optimizer state as they were
            before the newest update whose effect was judged normal, kept in memory (one
            copy, refreshed every step: a step's loss, computed before its update, vouches
            for the state the update starts from); when there is none yet (the first step
            after a start or resume spikes) the newest older checkpoint on disk. The step
            counter goes on, so the data position moves past the data of every discarded
            update: those steps and global samples are a row of spikes.tsv. Optionally the
            learning rate runs at spike_lr_factor for spike_lr_steps steps.
  skip      drop this step's update (its data is skipped too).
  abort     stop with exit 1 and one line.
More than spike_max_rollbacks handled spikes abort the run as well. Every event is
a row of out_dir/spikes.tsv, of the trackers (`spike/*`) and a line on stderr; the
checkpoint keeps the window and the counters (so a resumed run judges as the
uninterrupted one would), and metrics.json counts `rollbacks` and `spike_skips`.

Fault injection for the tests: MM_INJECT_SPIKE_STEPS=30 takes step 30's update at
SPIKE_FAULT_SCALE × the learning rate (Adam's normalised update does not grow with
the gradient, so a multiplied gradient would not do it), and the next losses jump.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from pathlib import Path

import torch

from pipeline.checkpoint.format import load_checkpoint, step_checkpoints
from pipeline.errors import UserError
from pipeline.train import distributed
from pipeline.train.progress import MetricLog

SPIKE_COLUMNS = ["step", "event", "loss", "median", "restored_step", "discarded_steps", "discarded_samples"]
SPIKE_LOG = "spikes.tsv"
SPIKE_FAULT_SCALE = 1000.0


class SpikeGuard:
    def __init__(self, tp):
        self.tp, self.action = tp, tp.spike_action
        self.recent: deque[float] = deque(maxlen=tp.spike_window)  # losses judged normal, newest last
        self.rollbacks = self.skips = 0
        self.lr_low_until = 0  # steps up to this one (1-based) run at spike_lr_factor × the schedule
        self.good: tuple[int, list, list] | None = None  # (step it is the state after, params, optimizer states)
        self.log: MetricLog | None = None
        self.injected = {int(s) for s in os.environ.get("MM_INJECT_SPIKE_STEPS", "").split(",") if s.strip()}

    # ------------------------------------------------------------------ state kept in checkpoints
    def state(self) -> dict:
        return {"recent": list(self.recent), "rollbacks": self.rollbacks, "skips": self.skips,
                "lr_low_until": self.lr_low_until}

    def restore(self, saved: dict | None) -> None:
        """From a checkpoint's metrics["spike_guard"] (absent in older checkpoints: a fresh window)."""
        if saved:
            self.recent.extend(saved["recent"])
            self.rollbacks, self.skips, self.lr_low_until = saved["rollbacks"], saved["skips"], saved["lr_low_until"]

    def metrics(self) -> dict:
        return {"rollbacks": self.rollbacks, "spike_skips": self.skips}

    def open_log(self, out_dir: Path, start_step: int, cleanup) -> None:
        """Rank 0: spikes.tsv, cut back to the resumed step like the other logs."""
        self.log = MetricLog(out_dir / SPIKE_LOG, SPIKE_COLUMNS, start_step)
        cleanup.callback(self.log.close)

    # ------------------------------------------------------------------ per step
    def lr_scale(self, step: int) -> float:
        """The factor on the scheduled learning rate of step `step` (1-based) after a rollback."""
        return self.tp.spike_lr_factor if step <= self.lr_low_until else 1.0

    def fault(self, step: int) -> float:
        """MM_INJECT_SPIKE_STEPS: the factor on the learning rate actually applied (1 unless injected)."""
        return SPIKE_FAULT_SCALE if step in self.injected else 1.0

    def judge(self, run, step: int) -> bool:
        """Step `step` (1-based) has its agreed loss in run.loss and its gradients, not yet applied.
        True when it was a spike: its gradients are dropped, so the optimizer step that follows changes
        nothing (after restoring the good state under rollback). Raises UserError under abort."""
        loss = run.loss
        if self.action == "none" or not math.isfinite(loss):
            return False
        if len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.tp.spike_factor * median:
                self._handle(run, step, loss, median)
                run.optimizer.zero_grad(set_to_none=True)  # a parameter without a gradient is not updated
                return True
        self.recent.append(loss)
        if self.action == "rollback":
            self._keep(run, step - 1)
        return False

    # ------------------------------------------------------------------ a spike
    def _handle(self, run, step: int, loss: float, median: float) -> None:
        handled = self.rollbacks + self.skips
        what = (f"step {step}: loss spike, {loss:.4g} > train.spike_factor {self.tp.spike_factor} × median "
                f"{median:.4g} of the last {self.tp.spike_window} steps")
        if self.action == "abort" or handled >= self.tp.spike_max_rollbacks:
            self._record(run, step, "abort", loss, median, step, [])
            limit = "" if self.action == "abort" else f" after {handled} (train.spike_max_rollbacks)"
            raise UserError(f"{what}; stopped{limit} (train.spike_action={self.action}); the last checkpoint "
                            f"in {run.out_dir} is from before it: lower train.lr or check the data")
        if self.action == "skip":
            self.skips += 1
            self._record(run, step, "skip", loss, median, step - 1, [step])
            run.display.message(f"{what}; its update was dropped (train.spike_action=skip)")
            return
        restored = self._roll_back(run, step)
        self.rollbacks += 1
        if self.tp.spike_lr_steps:
            self.lr_low_until = step + self.tp.spike_lr_steps
        discarded = list(range(restored + 1, step + 1))
        self._record(run, step, "rollback", loss, median, restored, discarded)
        run.display.message(f"{what}; rolled back to the state after step {restored}, the data of steps "
                            f"{discarded[0]}-{discarded[-1]} skipped (rollback {self.rollbacks} of at most "
                            f"{self.tp.spike_max_rollbacks})")

    def _record(self, run, step: int, event: str, loss: float, median: float, restored: int, steps: list) -> None:
        """One row of spikes.tsv and of the trackers (rank 0)."""
        if not run.world.is_main:
            return
        g = run.global_batch
        row = {"step": step, "event": event, "loss": loss, "median": median, "restored_step": restored,
               "discarded_steps": f"{steps[0]}-{steps[-1]}" if steps else "-",
               "discarded_samples": f"{(steps[0] - 1) * g}-{steps[-1] * g - 1}" if steps else "-"}
        if self.log is not None:
            self.log.write(**row)
        run.trackers.log(step, {"spike/loss": loss, "spike/median": median, "spike/rollbacks": self.rollbacks,
                                "spike/skips": self.skips, "spike/discarded_steps": len(steps)})

    # ------------------------------------------------------------------ the good state
    def _keep(self, run, step: int) -> None:
        """Copy the weights and optimizer state (the state after `step`) into the in-memory good state,
        reusing its buffers from the second step on."""
        params = [p.detach() for p in run.model.parameters()]
        states = [opt.state for opt in _optimizers(run.optimizer)]
        if self.good is None or len(self.good[1]) != len(params):
            self.good = (step, [p.clone() for p in params], [_clone_state(s) for s in states])
            return
        with torch.no_grad():
            for dst, src in zip(self.good[1], params, strict=True):
                dst.copy_(src)
        kept = self.good[2]
        for i, state in enumerate(states):
            if _same_layout(kept[i], state):
                for p, entries in state.items():
                    for k, v in entries.items():
                        if torch.is_tensor(v):
                            kept[i][p][k].copy_(v)
            else:
                kept[i] = _clone_state(state)
        self.good = (step, self.good[1], kept)

    def _roll_back(self, run, step: int) -> int:
        """Restore the good state (or an older checkpoint); returns the step whose state it is."""
        if self.good is None:
            return self._from_disk(run, step)
        restored, params, states = self.good
        with torch.no_grad():
            for p, saved in zip(run.model.parameters(), params, strict=True):
                p.detach().copy_(saved)
        for opt, saved in zip(_optimizers(run.optimizer), states, strict=True):
            opt.state.clear()
            opt.state.update(_clone_state(saved))  # a copy: the good state stays good for a second spike
        return restored

    def _from_disk(self, run, step: int) -> int:
        """The newest checkpoint in out_dir older than the suspect state (the one after step - 1)."""
        for saved_step, path in sorted(step_checkpoints(run.out_dir), reverse=True):
            if saved_step < step - 1:
                state = load_checkpoint(path)
                distributed.load_full_state(run.model, run.optimizer, state["model"], state["optimizer"], run.world)
                return saved_step
        raise UserError(f"step {step}: loss spike with no earlier state to roll back to (none kept in memory yet, "
                        f"no checkpoint older than step {step - 1} in {run.out_dir}); set train.spike_action=skip "
                        "or abort, or resume from an earlier checkpoint")


def _optimizers(optimizer) -> list:
    """The torch optimizers inside: AdamW, or Muon and AdamW (optim.MuonWithAdamW iterates over its two)."""
    return list(optimizer) if hasattr(optimizer, "muon") else [optimizer]


def _clone_state(state) -> dict:
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in entries.items()} for p, entries in state.items()}


def _same_layout(kept: dict, state) -> bool:
    return kept.keys() == state.keys() and all(kept[p].keys() == state[p].keys() for p in state)
