"""The `train` section's learning-rate schedule and loss-spike guard keys.

`TrainParams` (pipeline/params.py) inherits these fields, so they are ordinary
`train.*` keys (`--set train.schedule=wsd`, `--set train.spike_action=abort`)
checked like the others on load. What they do: pipeline/train/optim.py (`lr_at`)
and pipeline/train/spike.py; docs/training.md explains both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ParamError


@dataclass
class ScheduleAndSpikeParams:
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine (decay to min_lr over the rest of the run), wsd (warmup-stable-decay: lr until
    the last decay steps, then down to min_lr) or constant (lr to the end)."""
    decay_fraction: float = 0.2
    """wsd: the share of train.max_steps spent decaying (the last steps of the run)."""
    decay_steps: int = 0
    """wsd: decay over exactly this many last steps instead of decay_fraction (0 = use decay_fraction)."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd: the decay's curve from lr to min_lr: linear, cosine (half a period) or 1-sqrt (1 - sqrt(progress))."""
    lr_change: Literal["refuse", "allow"] = "refuse"
    """A resume whose schedule changes the learning rate of steps already taken: refuse (naming the ways out),
    or allow (the new schedule applies from the resumed step: the lr jumps there, said in a note). A branch
    into another out_dir is always allowed."""
    spike_action: Literal["rollback", "skip", "abort", "none"] = "rollback"
    """On a loss spike: rollback (restore the last good weights and optimizer state, skip the data that led
    there, go on), skip (drop that step's update), abort (exit 1), or none (no check)."""
    spike_factor: float = 2.0
    """A spike is a step loss above spike_factor × the median loss of the last spike_window steps."""
    spike_window: int = 50
    """Steps in the running median; no step is judged before that many losses were seen."""
    spike_max_rollbacks: int = 3
    """Spikes handled (rolled back or skipped) before the run aborts instead."""
    spike_lr_factor: float = 1.0
    """After a rollback, multiply the learning rate by this for spike_lr_steps steps (1.0 = unchanged)."""
    spike_lr_steps: int = 0
    """Steps after a rollback that run at spike_lr_factor × the scheduled learning rate."""

    def check_schedule_and_spike(self) -> None:
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ParamError("train.decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")
        for name in ("decay_steps", "spike_max_rollbacks", "spike_lr_steps"):
            if getattr(self, name) < 0:
                raise ParamError(f"train.{name}", f"must not be negative, got {getattr(self, name)}")
        if self.spike_factor <= 1.0:
            raise ParamError("train.spike_factor", f"must be above 1, got {self.spike_factor}")
        if self.spike_window < 1:
            raise ParamError("train.spike_window", f"must be at least 1, got {self.spike_window}")
        if not 0.0 < self.spike_lr_factor <= 1.0:
            raise ParamError("train.spike_lr_factor", f"must be in (0, 1], got {self.spike_lr_factor}")
