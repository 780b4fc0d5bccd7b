"""One class per experiment tracker: TensorBoard, Weights & Biases, SwanLab.

Each imports its library inside its methods, never at module level, so a run
with no trackers never loads them (they take seconds to import and are optional
extras: `pip install 'mm[tensorboard]'`, `mm[wandb]`, `mm[swanlab]`).

A tracker is told at `start` the run id kept in the checkpoint (None for a new
run) and the step training resumes from; it returns its run id and whether the
history it shows starts empty. pipeline/train/tracking.py then re-logs the steps up to
the resumed one from train_log.tsv into every tracker that starts empty, so
each tracker holds one curve with one value per step, however often the run was
killed and resumed:

  tensorboard  out/tb/<run name>/; on resume the event files written before are
               moved to out/superseded/tb/<run name>/ (a killed writer leaves
               its last steps unflushed, and steps after the checkpoint must not
               stay in the curve), then the history is re-logged.
  wandb        offline unless WANDB_MODE is set; out/wandb/ unless WANDB_DIR is
               set. Offline, every invocation is a fragment directory of the
               same run id: earlier fragments move to out/superseded/wandb/ and
               the history is re-logged, so `wandb sync out/wandb` uploads one
               clean curve. Online, a resume rewinds the run to the resumed step
               (W&B's resume_from: what a killed invocation logged after its
               checkpoint is archived by W&B, and the new values take those
               steps); where the server refuses a rewind (a preview feature; a
               run not yet marked crashed) it says so and continues the run id
               (resume="allow"), and W&B then ignores steps at or below the last
               one it holds (docs/training.md).
  swanlab      offline mode (`swanlab sync` uploads a run directory) unless
               SWANLAB_MODE is set (local: the `swanlab watch` dashboard, which
               needs swanlab[dashboard]); out/swanlog/ unless SWANLAB_LOG_DIR is
               set; fragments handled as for W&B offline.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path


class Tracker:
    """The interface: start, log scalars, log text, flush, finish. Subclasses import lazily."""

    name = ""
    install = ""  # the pip extra that brings the library

    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict):
        self.out_dir, self.project, self.run_name, self.config = out_dir, project, run_name, config
        self.fault_step = injected_fault_step(self.name)

    def start(self, run_id: str | None, start_step: int) -> tuple[str, bool]:
        """Open the run (a new one when run_id is None); returns (run id, history starts empty)."""
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.fault_step is not None and step >= self.fault_step:
            raise RuntimeError(f"injected fault (MM_INJECT_TRACKER_FAULT) at step {step}")
        self._log(step, metrics)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_text(self, step: int, key: str, text: str) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def finish(self, summary: dict) -> None:
        raise NotImplementedError

    def _supersede(self, fragments: list[Path], root: Path) -> None:
        """Move earlier fragments of this run out of the tracker's directory (never deleted)."""
        target = self.out_dir / "superseded" / self.name
        for path in fragments:
            target.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            shutil.move(str(path), str(target / f"{stamp}-{path.relative_to(root).as_posix().replace('/', '_')}"))


def new_run_id() -> str:
    """8 characters of [a-z0-9], the shape of W&B's own run ids."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def injected_fault_step(name: str) -> int | None:
    """Fault injection for the tests, like MM_INJECT_NAN_STEPS: MM_INJECT_TRACKER_FAULT=wandb:30
    makes that tracker's log call raise from step 30 on."""
    for item in os.environ.get("MM_INJECT_TRACKER_FAULT", "").split(","):
        who, _, at = item.partition(":")
        if who.strip() == name and at.strip():
            return int(at)
    return None


# ---------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------


class TensorBoard(Tracker):
    name, install = "tensorboard", "pip install 'mm[tensorboard]'"

    def start(self, run_id, start_step):
        from torch.utils.tensorboard import SummaryWriter

        run_id = run_id or self.run_name
        root = self.out_dir / "tb"
        log_dir = root / run_id
        if log_dir.is_dir():
            self._supersede(sorted(log_dir.glob("events.out.tfevents.*")), root)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", _as_markdown(self.config), 0)
        return run_id, True

    def _log(self, step, metrics):
        for key, value in metrics.items():
            # A double tensor (new_style): readers get the exact float64 train_log.tsv holds.
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)

    def log_text(self, step, key, text):
        self.writer.add_text(key, text, step)

    def flush(self):
        self.writer.flush()

    def finish(self, summary):
        if summary:  # empty when the run stopped early (preempted, failed)
            self.writer.add_text("final_metrics", _as_markdown(summary), summary.get("steps", 0))
        self.writer.close()


# ---------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------


class WandB(Tracker):
    name, install = "wandb", "pip install 'mm[wandb]'"

    def start(self, run_id, start_step):
        import wandb

        offline = os.environ.get("WANDB_MODE", "offline") in ("offline", "dryrun")
        base = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else self.out_dir
        root = base / "wandb"
        fresh = run_id is None or offline
        if run_id is not None and offline and root.is_dir():
            self._supersede(sorted(root.glob(f"offline-run-*-{run_id}")), root)
        root.mkdir(parents=True, exist_ok=True)
        common = dict(project=os.environ.get("WANDB_PROJECT") or self.project, name=self.run_name, dir=str(base),
                      config=self.config, mode=None if os.environ.get("WANDB_MODE") else "offline",
                      settings=wandb.Settings(quiet=True, console="off"))  # mm prints its own progress
        rewind = wandb_resume(run_id, start_step, offline)
        if "resume_from" in rewind:
            try:
                self.run = wandb.init(**common, **rewind)
                return self.run.id, False  # steps 1..start_step stay on the server, the rest was archived
            except Exception as e:  # the server has no rewind, or the run is not yet marked crashed
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
                print(f"warning: W&B could not rewind run {run_id} to step {start_step} ({reason}); continuing it "
                      f"instead: W&B keeps what it holds after step {start_step} and ignores those steps now",
                      file=sys.stderr, flush=True)
        self.run = wandb.init(**common, **wandb_resume(run_id, start_step, offline, rewind=False))
        return self.run.id, fresh or not self.run.resumed

    # W&B keeps one row per step open until a later step arrives (or the run finishes), so the
    # samples logged after the last step's metrics join that step instead of being refused.
    def _log(self, step, metrics):
        self.run.log(metrics, step=step)

    def log_text(self, step, key, text):
        import wandb

        self.run.log({key: wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def finish(self, summary):
        self.run.summary.update({f"final/{k}": v for k, v in summary.items() if v is not None})
        self.run.finish()


def wandb_resume(run_id: str | None, start_step: int, offline: bool, rewind: bool = True) -> dict:
    """wandb.init's run arguments: a new run; offline, a fragment of the run id (the history re-logged);
    online at a resumed step, a rewind to it (`resume_from`, which W&B allows only without `resume`)."""
    if run_id is not None and not offline and start_step and rewind:
        return {"resume_from": f"{run_id}?_step={start_step}"}  # W&B keeps steps up to and including it
    return {"id": run_id or new_run_id(), "resume": "allow"}


# ---------------------------------------------------------------------------
# SwanLab
# ---------------------------------------------------------------------------


class SwanLab(Tracker):
    name, install = "swanlab", "pip install 'mm[swanlab]'"

    def start(self, run_id, start_step):
        import swanlab

        mode = None if os.environ.get("SWANLAB_MODE") else "offline"
        online = (os.environ.get("SWANLAB_MODE") or mode) in ("online", "cloud")
        user_dir = os.environ.get("SWANLAB_LOG_DIR")
        root = Path(user_dir) if user_dir else self.out_dir / "swanlog"
        fresh = run_id is None or not online
        if run_id is not None and not online and root.is_dir():
            self._supersede(sorted(root.glob(f"run-*-{run_id}")), root)
        with redirect_stdout(sys.stderr):  # stdout stays free for the user, as in the rest of mm
            self.run = swanlab.init(
                project=os.environ.get("SWANLAB_PROJECT_NAME") or self.project, name=self.run_name,
                id=run_id, resume="allow", mode=mode, log_dir=None if user_dir else str(root), config=self.config,
            )
        return self.run.id, fresh

    def _log(self, step, metrics):
        self.run.log(metrics, step=step)

    def log_text(self, step, key, text):
        import swanlab

        self.run.log({key: swanlab.Text(text)}, step=step)

    def finish(self, summary):
        final = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        if final:
            self.run.log(final, step=summary.get("steps") or 0)
        with redirect_stdout(sys.stderr):
            self.run.finish()


BACKENDS: dict[str, type[Tracker]] = {cls.name: cls for cls in (TensorBoard, WandB, SwanLab)}


def _as_markdown(obj: dict) -> str:
    # TensorBoard renders text as markdown: an indented block keeps the JSON as it is.
    return "\n".join("    " + line for line in json.dumps(obj, indent=2, default=str).splitlines())


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
