"""Pretraining: `setup` (pipeline/train/setup.py) builds a `Run`; `train_step` advances it by one step.

    train  = setup { device → data → model, precision, optimizer → resume } → outputs →
             loop { train_step { learning rate → micro-batches (forward, backward, accumulate) →
                                 agree across ranks → clip and step (or skip a non-finite step) → log }
                    → evaluate → checkpoint } → done

Every choice that affects the numbers comes from params (TrainParams) and
model.json; the data order is a function of the step (pipeline/data/sampler.py),
so a resumed run continues the identical loss curve, with any process count.

Where new behaviour goes: state that lives as long as the run is a field of
`Run`, set in the matching ruled section of `setup`; what one step measured is
a field of `StepStats`, filled by `train_step` and written by `log_step`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint.format import checkpoint_state, save_checkpoint
from pipeline.data.store.guard import check_token_ids
from pipeline.errors import UserError
from pipeline.params import Params, check_params
from pipeline.train import distributed
from pipeline.train.optim import lr_at, set_lr
from pipeline.train.plots import write_loss_png
from pipeline.train.progress import write_metrics
from pipeline.train.run_data import evaluate_sources, source_weights
from pipeline.train.setup import Run, StopRequest, open_outputs, setup
from pipeline.train.tracking import check_trackers, finish_trackers, open_trackers, peak_memory_mb

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; rerun to resume
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C; the checkpoint is saved all the same


class Preempted(Exception):
    """SIGTERM/SIGUSR1 or a first Ctrl-C arrived: every rank stopped at the same step boundary and saved."""

    def __init__(self, step: int, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(step)
        self.exit_code = exit_code


@dataclass
class StepStats:
    """What one optimizer step measured; `log_step` writes it."""

    step: int  # optimizer steps completed, this one included
    loss: float  # mean over the global batch, agreed by all ranks
    lr: float
    grad_norm: float
    grad_syncs: int  # micro-steps whose backward all-reduced gradients (DDP; see distributed.GradSyncCounter)
    stop_requested: bool  # some rank got SIGTERM/SIGUSR1/SIGINT: all stop after this step
    started: float  # time.perf_counter() at the start of the step
    data_s: float = 0.0  # of which waiting for batches: sampling, the token check, the copy to the device


def train(
    params: Params, store_path: Path, tokenizer_dir: Path, model_path: Path,
    resume: str = "auto", allow_data_change: bool = False, device: str | None = None,
) -> dict:
    """Run (or continue) training; returns the final metrics. Raises UserError or Preempted."""
    tp = params.train
    check_params(params)  # also when params were built in code, not loaded
    check_trackers(tp.trackers)  # a tracker that is not installed is named before any work
    requested = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = distributed.init_world("cuda" if requested in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    with ExitStack() as cleanup:  # undone in reverse order, however the run ends
        cleanup.callback(distributed.close_world, world)
        stop = StopRequest()
        cleanup.callback(stop.restore)
        weights = source_weights(params)
        run = setup(tp, weights, store_path, tokenizer_dir, model_path, resume, allow_data_change, requested, world,
                    stop, params.data.phases)
        if run.start_step >= run.total_steps:
            run.note(f"nothing to do: {run.out_dir} already holds step {run.start_step} of {run.total_steps} "
                     "(--resume none starts over)")
            return {"steps": run.start_step, "train_loss": run.loss, "val_loss": run.val_loss}
        open_outputs(run, cleanup)
        open_trackers(run, params, cleanup)
        return run_loop(run)


def run_loop(run: Run) -> dict:
    """Steps until the schedule ends, a stop is requested (Preempted) or train.stop_after is reached."""
    tp = run.tp
    run_start = time.perf_counter()
    step = run.start_step
    while step < run.total_steps:
        stats = train_step(run, step)
        step = stats.step

        # ------------------------------------------------------------------ evaluate
        if tp.eval_interval and (step % tp.eval_interval == 0 or step == run.total_steps) and run.data.val:
            # The bare module: no DDP hooks; under FSDP it is the sharded model itself.
            val = evaluate_sources(run.raw_model, run.data, tp, run.device, run.autocast)
            run.val_loss, run.val_bpb = val.loss, val.bits_per_byte
            run.val_losses = {n: s.loss for n, s in val.by_source.items()}
            run.val_bpbs = {n: s.bits_per_byte for n, s in val.by_source.items()}
            if run.world.is_main:
                row = {"step": step, "val_loss": run.val_loss,
                       **{f"val_loss/{n}": run.val_losses.get(n, math.nan) for n in run.data.names}}
                run.val_log.write(**row)
                run.trackers.log_row(step, "val", row)
                run.display.evaluated(run.val_loss)  # the last step's line waits for it

        # ------------------------------------------------------------------ checkpoint
        # train.stop_after ends this invocation early (a planned stop, exit 0) with a
        # checkpoint; the schedule still runs to total_steps when resumed.
        pause = bool(tp.stop_after) and step - run.start_step >= tp.stop_after and step < run.total_steps
        if step % tp.save_interval == 0 or step == run.total_steps or stats.stop_requested or pause:
            save(run, step)
        if stats.stop_requested:
            run.display.message(f"stop requested: saved step {step} in {run.out_dir}; "
                                "rerun with --resume auto to continue")
            if run.world.distributed:  # every rank says where it stopped: the logs show that they agree
                print(f"rank {run.world.rank}: stopped after step {step}", file=sys.stderr, flush=True)
            raise Preempted(step, INTERRUPTED_EXIT_CODE if run.stop.interrupted else PREEMPTED_EXIT_CODE)
        if pause:
            run.display.message(f"train.stop_after={tp.stop_after}: saved step {step} of {run.total_steps} in "
                                f"{run.out_dir}; rerun with --resume auto to continue")
            break
    return finish(run, step, time.perf_counter() - run_start)


def train_step(run: Run, step: int) -> StepStats:
    """Optimizer step number `step` (0-based): forward/backward, agree, clip and step, log."""
    tp, world = run.tp, run.world
    started = time.perf_counter()

    # ------------------------------------------------------------------ learning rate
    lr = lr_at(step, tp, run.total_steps) * run.spike.lr_scale(step + 1)  # lowered for a while after a rollback
    set_lr(run.optimizer, lr * run.spike.fault(step + 1), tp)  # fault: 1 unless MM_INJECT_SPIKE_STEPS

    # ------------------------------------------------------------------ micro-batches
    # Forward and backward over this rank's micro-batches. Each micro loss is a token
    # sum divided by the rank's tokens per step, so the accumulated gradient is the
    # rank mean, and DDP/FSDP's average over ranks makes it the global-batch mean.
    local_loss = torch.zeros((), device=run.device)
    grad_syncs, counter = 0, run.sync_counter
    batches = step_batches(run, step)
    data_s, fetched = 0.0, time.perf_counter()
    for m, batch in enumerate(batches):
        check_token_ids(batch.inputs, batch.targets, run.model_config.vocab_size, run.store_path,
                        f"a batch of step {step + 1}")
        x, y, doc_ids = batch.inputs.to(run.device), batch.targets.to(run.device), batch.doc_ids.to(run.device)
        data_s += time.perf_counter() - fetched
        distributed.set_gradient_sync(run.model, m == tp.accumulation_steps - 1)
        # The loss comes from the model: cross-entropy fused with the output head, so the (B, T, vocab)
        # logits never exist. doc_ids (the store's documents, by offset) serve train.attention/positions = document.
        with run.autocast:
            token_loss, aux_loss = run.forward(x, targets=y, doc_ids=doc_ids)
        micro_loss = token_loss / (tp.seq_len * tp.rank_batch)
        objective = micro_loss + aux_loss / tp.accumulation_steps
        reductions = counter.reductions if counter else 0
        (run.scaler.scale(objective) if run.scaler else objective).backward()
        grad_syncs += bool(counter and counter.reductions > reductions)
        local_loss += micro_loss.detach()
        fetched = time.perf_counter()  # the next micro-batch's wait starts here
    if step + 1 in run.nan_grad_steps:
        _poison_gradient(run.model)
    if step + 1 in run.nan_steps:
        local_loss *= float("nan")

    # ------------------------------------------------------------------ agree across ranks
    # On the global loss and on whether any rank was asked to stop.
    flags = torch.stack([local_loss.float().cpu(), torch.tensor(float(run.stop.requested))])
    agreed = distributed.all_reduce_sum(flags, world)
    run.loss, stop_now = agreed[0].item() / world.size, agreed[1].item() > 0

    # ------------------------------------------------------------------ clip and step
    # fp16: the scaler's unscale_ finds inf/NaN gradients (an overflow: its step() skips and update()
    # lowers the scale; not counted as a skip). Under FSDP each rank checks only its shard, so the flag
    # is agreed across ranks first. update() follows every unscale_, also when the step is skipped
    # below: without it the next step's unscale_ raises.
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
        _agree_on_overflow(run.scaler, run.optimizer, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tp.grad_clip or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    run.spike.judge(run, step + 1)  # a loss spike drops this update (and rolls back or aborts): spike.py
    stepped = math.isfinite(run.loss) and (math.isfinite(grad_norm) or run.scaler is not None)
    if stepped:
        if run.scaler:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
    if run.scaler:
        run.scaler.update()
    if not stepped:
        run.skipped += 1
        run.display.message(f"step {step + 1}: non-finite loss ({run.loss}) or grad norm ({grad_norm}); step skipped")
        if tp.nonfinite == "abort" or run.skipped > tp.max_skips:
            raise UserError(f"step {step + 1}: non-finite loss or gradient ({run.skipped} skipped, "
                            f"train.nonfinite={tp.nonfinite}, train.max_skips={tp.max_skips}); "
                            "lower train.lr or check the data")
    run.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ log
    stats = StepStats(step=step + 1, loss=run.loss, lr=lr, grad_norm=grad_norm, grad_syncs=grad_syncs,
                      stop_requested=stop_now, started=started, data_s=data_s)
    log_step(run, stats)
    return stats


def log_step(run: Run, stats: StepStats) -> None:
    """Rank 0: one train_log.tsv row and the live bar (throughput and MFU measured here)."""
    if not run.world.is_main:
        return
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    step_s = time.perf_counter() - stats.started
    run.tokens_per_s = run.tokens_per_step / step_s
    run.data_wait_s, run.step_time_s = run.data_wait_s + stats.data_s, run.step_time_s + step_s
    run.mfu = run.flops_per_token * run.tokens_per_s / run.peak_flops
    counted = run.sync_counter is not None or not run.world.distributed  # FSDP's syncs are not counted
    row = {"step": stats.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
           "tokens": stats.step * run.tokens_per_step, "tokens_per_s": round(run.tokens_per_s, 1),
           "skipped": run.skipped, "grad_syncs": stats.grad_syncs if counted else float("nan"),
           **{f"tokens/{n}": t for n, t in run.data.tokens_seen(stats.step, run.global_batch).items()}}
    run.train_log.write(**row)
    perf = {"step": stats.step, "mfu": run.mfu, "peak_memory_mb": round(peak_memory_mb(run.device), 1)}
    run.perf_log.write(**perf)  # apart from train_log.tsv, whose rows runs compare exactly
    run.display.step(stats.step, stats.loss, stats.lr, stats.grad_norm, run.tokens_per_s, run.mfu)
    if run.trackers:  # the same rows, as train/<column>
        run.trackers.log_row(stats.step, "train", {**row, **perf})


def save(run: Run, step: int) -> None:
    """All ranks gather the full state; rank 0 writes it; all learn whether that worked."""
    model_state, optimizer_state = distributed.full_state(run.model, run.optimizer, run.world)
    failure = ""
    if run.world.is_main:
        try:
            metrics = {"train_loss": run.loss, "val_loss": _finite(run.val_loss),
                       "val_bits_per_byte": _finite(run.val_bpb),
                       "val_loss_by_source": {n: _finite(v) for n, v in run.val_losses.items()},
                       "val_bits_per_byte_by_source": {n: _finite(v) for n, v in run.val_bpbs.items()},
                       "tokens_seen": step * run.tokens_per_step, "skipped_steps": run.skipped,
                       "spike_guard": run.spike.state()}
            # The sources and the tokens drawn from each so far, for the model card; a resume compares
            # only the fingerprint fields of "data" (checkpoint.check_compatible).
            data = {**run.fingerprints, **run.data.checkpoint_record(step, run.global_batch)}
            run.trackers.flush()  # what the checkpoint covers is handed to the trackers first
            state = checkpoint_state(step, model_state, optimizer_state, run.scaler, run.model_config, run.tp,
                                     data, run.tokenizer_files, metrics, run.trackers.state())
            save_checkpoint(state, run.out_dir, run.tp.keep_last, require_finite=True)  # checked while hashing
        except UserError as e:
            failure = str(e)
    failed = distributed.all_reduce_sum(torch.tensor([float(bool(failure))]), run.world)
    if failed.item():
        raise UserError(failure or "rank 0 could not save the checkpoint")


def finish(run: Run, step: int, elapsed: float) -> dict:
    """The final metrics; rank 0 writes metrics.json and loss.png."""
    steps_run = step - run.start_step
    metrics = {
        "train_loss": run.loss, "val_loss": run.val_loss,
        "val_perplexity": math.exp(run.val_loss) if math.isfinite(run.val_loss) else None,
        "steps": step, "tokens_seen": step * run.tokens_per_step, "skipped_steps": run.skipped,
        "tokens_per_s": round(steps_run * run.tokens_per_step / elapsed, 1) if steps_run else None,
        "mfu": round(run.mfu, 4), "mfu_vs": run.display.peak_source,
        "processes": run.world.size, "dtype": str(run.amp_dtype).removeprefix("torch."),
        "tokens_by_source": run.data.tokens_seen(step, run.global_batch),
        "val_loss_by_source": run.val_losses,
        "val_bits_per_byte": run.val_bpb, "val_bits_per_byte_by_source": run.val_bpbs,
        **run.spike.metrics(),  # rollbacks, spike_skips
        "optimizer": run.tp.optimizer, "compiled": run.compiled, "compile_reason": run.compile_reason,
        # Rank 0's share of step time spent waiting for batches (sampling, checks, host-to-device copy).
        "data_wait": round(run.data_wait_s / run.step_time_s, 4) if run.step_time_s else None,
        "peak_memory_mb": round(peak_memory_mb(run.device), 1),
    }
    if run.world.is_main:
        write_metrics(run.out_dir / "metrics.json", metrics)
        write_loss_png(run.out_dir)  # the logs are flushed row by row; the cleanup closes them
        finish_trackers(run, step, metrics)
    return metrics


def _finite(value: float) -> float | None:
    """None for NaN (no evaluation yet): what a checkpoint's metrics hold for a figure not measured."""
    return None if math.isnan(value) else value


def _agree_on_overflow(scaler: torch.amp.GradScaler, optimizer, world) -> None:
    """Every rank skips or steps together: the scaler's inf/NaN flags, maxed over ranks. The all-reduce
    torch's ShardedGradScaler does in its unscale_ (that class is not used: its (1,)-shaped flag breaks
    fused AdamW's step). A rank's flag covers only its own gradient shard under FSDP."""
    if world.distributed:
        for found_inf in scaler._found_inf_per_device(optimizer).values():
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)


def _poison_gradient(model) -> None:
    """MM_INJECT_NAN_GRAD_STEPS: NaN in one gradient element, on every rank, as a real NaN is after the
    all-reduce. The loss stays finite: the grad norm alone must trigger the skip/abort policy."""
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")


def step_batches(run: Run, step: int):
    """This rank's micro-batches of optimizer step `step` (0-based).

    From a store in object storage (pipeline/data/store/remote.py) the batches are built before the
    forward, the next steps' chunks are prefetched in the background, and the ranks agree that each
    has its data: when a fetch still fails after its retries on any rank (server down, network gone),
    every rank saves step `step` and stops with one line naming the URL; rerunning resumes there."""
    tp, world = run.tp, run.world
    if isinstance(run.store_path, Path):
        return run.data.sampler.micro_batches(step, world.rank, world.size, tp.micro_batch_size,
                                              tp.accumulation_steps)
    from pipeline.data.store.cache import Prefetcher
    from pipeline.data.store.remote import RemoteUnavailable

    if not isinstance(run.data.sampler, Prefetcher):  # wrapped at the first step, once the schedule is set
        run.data.sampler = Prefetcher(run.data.sampler)
    failure = None
    try:
        batches = list(run.data.sampler.micro_batches(step, world.rank, world.size, tp.micro_batch_size,
                                                      tp.accumulation_steps))
    except RemoteUnavailable as e:
        failure = str(e)
    failed = distributed.all_reduce_sum(torch.tensor([float(failure is not None)]), world)
    if failed.item():
        if step > run.start_step:  # else that step is the checkpoint resumed from (or none: step 0)
            save(run, step)
        raise RemoteUnavailable(f"{failure or f'rank {world.rank}: another rank could not fetch its data'}; "
                                f"stopped after step {step} (checkpoint in {run.out_dir}): rerun to resume")
    return batches
