"""Pretraining: the loop of the seed workflow, in one function with ruled sections.

    processes and device → data → model, precision, optimizer → resume →
    loop { learning rate → micro-batches (forward, backward, accumulate) →
           agree across ranks → clip and step (or skip a non-finite step) →
           log → evaluate → checkpoint }

Every choice that affects the numbers comes from params (TrainParams) and
model.json; the data order is a function of the step (pipeline/sampler.py),
so a resumed run continues the identical loss curve, with any process count.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.architecture import flops_per_token, load_model_json
from pipeline.checkpoint import FORMAT, LATEST, VERSION, find_resumable, load_checkpoint, save_checkpoint, step_checkpoints
from pipeline.errors import UserError
from pipeline.hardware import peak_flops, pick_device, resolve_dtype
from pipeline.model import Transformer
from pipeline.params import Params, TrainParams
from pipeline.plots import write_loss_png
from pipeline.progress import TRAIN_COLUMNS, VAL_COLUMNS, Display, MetricLog, write_metrics
from pipeline.sampler import WindowSampler, eval_windows
from pipeline.token_store import open_store
from pipeline.tokenizer import TOKENIZER_FILES, load_tokenizer

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; rerun to resume


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: every rank stopped at the same step boundary and saved."""


def train(
    params: Params, store_path: Path, tokenizer_dir: Path, model_path: Path,
    resume: str = "auto", allow_data_change: bool = False, device: str | None = None,
) -> dict:
    """Run (or continue) training; returns the final metrics. Raises UserError or Preempted."""
    tp = params.train
    check_train_params(tp)
    requested = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = distributed.init_world("cuda" if requested in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    with ExitStack() as cleanup:  # undone in reverse order, however the run ends
        cleanup.callback(distributed.close_world, world)
        stop = _StopRequest()
        cleanup.callback(stop.restore)
        return _train(tp, store_path, tokenizer_dir, model_path, resume, allow_data_change, requested, world, stop, cleanup)


def _train(tp: TrainParams, store_path, tokenizer_dir, model_path, resume, allow_data_change, requested, world, stop,
           cleanup: ExitStack) -> dict:
    # ------------------------------------------------------------------ device
    device = pick_device(requested, world.local_rank)
    amp_dtype = resolve_dtype(tp.dtype, device)
    torch.manual_seed(tp.seed)
    out_dir = Path(tp.out_dir)

    # ------------------------------------------------------------------ data
    store = open_store(store_path)
    tokenizer_files, tokenizer_sha = read_tokenizer_dir(tokenizer_dir)
    if store.tokenizer_fingerprint != tokenizer_sha:
        raise UserError(f"{tokenizer_dir}: tokenizer differs from the one {store_path} was tokenized with (fingerprint)")
    model_config = load_model_json(model_path)
    if model_config.vocab_size != store.vocab_size:
        raise UserError(f"{model_path}: vocab_size {model_config.vocab_size} does not match the token store's {store.vocab_size} ({store_path})")
    if tp.seq_len > model_config.max_seq_len:
        raise UserError(f"train.seq_len {tp.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len} ({model_path})")
    train_data = WindowSampler(store.train.tokens, tp.seq_len, tp.seed)
    val_data = WindowSampler(store.val.tokens, tp.seq_len, tp.seed)
    if train_data.n_windows < 1:
        raise UserError(f"{store_path}: the train split has {len(store.train.tokens)} tokens, fewer than train.seq_len + 1")
    global_batch = tp.micro_batch_size * tp.accumulation_steps * world.size
    tokens_per_step = global_batch * tp.seq_len
    total_steps = resolve_total_steps(tp, train_data.n_windows, global_batch)

    # ------------------------------------------------------------------ model, precision, optimizer
    raw_model = Transformer(model_config).to(device)
    model = distributed.wrap_model(raw_model, world, tp.parallel, device, find_unused=model_config.n_experts > 0)
    optimizer = make_optimizer(model, tp, device)
    sync_counter = distributed.grad_sync_counter(model)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    forward = torch.compile(model) if tp.compile else model

    fingerprints = {
        "tokenizer_sha256": tokenizer_sha, "store_fingerprint": store.fingerprint,
        "vocab_size": store.vocab_size, "seq_len": tp.seq_len, "global_batch": global_batch,
    }

    # ------------------------------------------------------------------ resume
    def note(text: str) -> None:
        if world.is_main:
            print(text, file=sys.stderr, flush=True)

    start_step, skipped, loss, val_loss = 0, 0, float("nan"), float("nan")
    checkpoint = pick_checkpoint(resume, out_dir, note)
    if checkpoint is not None:
        check_compatible(checkpoint, model_config, fingerprints, allow_data_change)
        distributed.load_full_state(model, optimizer, checkpoint["model"], checkpoint["optimizer"], world)
        if scaler is not None and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        start_step = checkpoint["step"]
        skipped = checkpoint["metrics"].get("skipped_steps", 0)
        loss = checkpoint["metrics"].get("train_loss", loss)
        val_loss = checkpoint["metrics"].get("val_loss") or float("nan")
        note(f"resuming from {checkpoint['path']} at step {start_step}")
        del checkpoint
    # Every rank reads the checkpoint itself, so all must see the same one (a shared out_dir).
    distributed.check_same(start_step, world, f"the step to resume from (is {out_dir} on a filesystem every node shares?)")
    if start_step >= total_steps:
        note(f"nothing to do: {out_dir} already holds step {start_step} of {total_steps} (--resume none starts over)")
        return {"steps": start_step, "train_loss": loss, "val_loss": val_loss}
    display = Display(total_steps, start_step, tp.log_interval, enabled=world.is_main)
    cleanup.callback(display.close)  # a live bar left running would leave the terminal's cursor hidden
    display.val_loss = val_loss
    train_log = MetricLog(out_dir / "train_log.tsv", TRAIN_COLUMNS, start_step) if world.is_main else None
    val_log = MetricLog(out_dir / "val_log.tsv", VAL_COLUMNS, start_step) if world.is_main else None
    for log in (train_log, val_log):
        if log is not None:
            cleanup.callback(log.close)
    flops = flops_per_token(model_config, tp.seq_len)
    peak = peak_flops(device, amp_dtype) * world.size if world.is_main else 1.0
    nan_steps = injected_nan_steps()

    def save(step: int, loss: float) -> None:
        """All ranks gather the full state; rank 0 writes it; all learn whether that worked."""
        model_state, optimizer_state = distributed.full_state(model, optimizer, world)
        failure = ""
        if world.is_main:
            try:
                if not all_finite(model_state) or not all_finite(optimizer_state):
                    raise UserError(f"step {step}: the weights or optimizer state hold non-finite values; refusing to save a checkpoint")
                save_checkpoint({
                    "format": FORMAT, "version": VERSION, "step": step,
                    "model": model_state, "optimizer": optimizer_state,
                    "scaler": scaler.state_dict() if scaler else None,
                    "rng": {"torch": torch.get_rng_state()},
                    "model_config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(tp),
                    "data": fingerprints, "tokenizer": tokenizer_files,
                    "metrics": {"train_loss": loss, "val_loss": None if math.isnan(val_loss) else val_loss,
                                "tokens_seen": step * tokens_per_step, "skipped_steps": skipped},
                }, out_dir, tp.keep_last)
            except UserError as e:
                failure = str(e)
        failed = distributed.all_reduce_sum(torch.tensor([float(bool(failure))]), world)
        if failed.item():
            raise UserError(failure or "rank 0 could not save the checkpoint")

    # ------------------------------------------------------------------ loop
    run_start, tokens_per_s, mfu = time.perf_counter(), 0.0, 0.0
    step = start_step
    while step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tp, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Forward and backward over this rank's micro-batches. Each micro loss is a token
        # sum divided by the rank's tokens per step, so the accumulated gradient is the
        # rank mean, and DDP/FSDP's average over ranks makes it the global-batch mean.
        local_loss = torch.zeros((), device=device)
        grad_syncs = 0  # micro-steps whose backward all-reduced gradients (DDP; see distributed.GradSyncCounter)
        micro_batches = train_data.micro_batches(step, world.rank, world.size, tp.micro_batch_size, tp.accumulation_steps)
        for m, (x, y) in enumerate(micro_batches):
            x, y = x.to(device), y.to(device)
            distributed.set_gradient_sync(model, m == tp.accumulation_steps - 1)
            with autocast:
                logits, aux_loss = forward(x)
            token_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            micro_loss = token_loss / (tp.seq_len * tp.micro_batch_size * tp.accumulation_steps)
            objective = micro_loss + aux_loss / tp.accumulation_steps
            reductions = sync_counter.reductions if sync_counter else 0
            (scaler.scale(objective) if scaler else objective).backward()
            grad_syncs += bool(sync_counter and sync_counter.reductions > reductions)
            local_loss += micro_loss.detach()
        if step + 1 in nan_steps:
            local_loss *= float("nan")

        # Agree across ranks on the global loss and on whether a stop was requested.
        agreed = distributed.all_reduce_sum(torch.stack([local_loss.float().cpu(), torch.tensor(float(stop.requested))]), world)
        loss, stop_now = agreed[0].item() / world.size, agreed[1].item() > 0

        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or scaler is not None)
        if finite:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        else:
            skipped += 1
            display.message(f"step {step + 1}: non-finite loss ({loss}) or grad norm ({grad_norm}); step skipped")
            if tp.nonfinite == "abort" or skipped > tp.max_skips:
                raise UserError(f"step {step + 1}: non-finite loss or gradient ({skipped} skipped, train.nonfinite={tp.nonfinite}, "
                                f"train.max_skips={tp.max_skips}); lower train.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Log.
        if world.is_main:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            tokens_per_s = tokens_per_step / dt
            mfu = flops * tokens_per_s / peak
            train_log.write(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=step * tokens_per_step,
                            tokens_per_s=round(tokens_per_s, 1), skipped=skipped,
                            grad_syncs=grad_syncs if sync_counter or not world.distributed else float("nan"))
            display.step(step, loss, lr, grad_norm, tokens_per_s, mfu)

        # Evaluate.
        if tp.eval_interval and (step % tp.eval_interval == 0 or step == total_steps) and len(val_data.tokens) > tp.seq_len:
            # The bare module: no DDP hooks; under FSDP it is the sharded model itself.
            val_loss = evaluate(raw_model, val_data, tp, device, autocast)
            if world.is_main:
                val_log.write(step=step, val_loss=val_loss)
                display.val_loss = val_loss

        # Checkpoint. train.stop_after ends this invocation early (a planned stop, exit 0)
        # with a checkpoint; the schedule still runs to total_steps when resumed.
        pause = bool(tp.stop_after) and step - start_step >= tp.stop_after and step < total_steps
        if step % tp.save_interval == 0 or step == total_steps or stop_now or pause:
            save(step, loss)
        if stop_now:
            display.message(f"stop requested: saved step {step} in {out_dir}; rerun with --resume auto to continue")
            if world.distributed:  # every rank says where it stopped: the logs show that they agree
                print(f"rank {world.rank}: stopped after step {step}", file=sys.stderr, flush=True)
            raise Preempted(step)
        if pause:
            display.message(f"train.stop_after={tp.stop_after}: saved step {step} of {total_steps} in {out_dir}; "
                            f"rerun with --resume auto to continue")
            break

    # ------------------------------------------------------------------ done
    elapsed = time.perf_counter() - run_start
    steps_run = step - start_step
    metrics = {
        "train_loss": loss, "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if math.isfinite(val_loss) else None,
        "steps": step, "tokens_seen": step * tokens_per_step, "skipped_steps": skipped,
        "tokens_per_s": round(steps_run * tokens_per_step / elapsed, 1) if steps_run else None,
        "mfu": round(mfu, 4), "processes": world.size, "dtype": str(amp_dtype).removeprefix("torch."),
    }
    if world.is_main:
        write_metrics(out_dir / "metrics.json", metrics)
        write_loss_png(out_dir)  # the logs are flushed row by row; the cleanup closes them
    return metrics


# ---------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------


def check_train_params(tp: TrainParams) -> None:
    for name in ("seq_len", "micro_batch_size", "accumulation_steps", "save_interval", "log_interval", "keep_last"):
        if getattr(tp, name) < 1:
            raise UserError(f"train.{name} must be at least 1, got {getattr(tp, name)}")
    for name in ("max_steps", "max_tokens", "eval_interval", "eval_batches", "warmup_steps", "max_skips", "stop_after",
                 "grad_clip", "weight_decay", "epochs"):
        if getattr(tp, name) < 0:
            raise UserError(f"train.{name} must not be negative, got {getattr(tp, name)}")
    if tp.eval_interval and not tp.eval_batches:
        raise UserError("train.eval_batches must be at least 1 when train.eval_interval is set (0 turns evaluation off)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(tp, name) < 1:
            raise UserError(f"train.{name} must be in [0, 1), got {getattr(tp, name)}")
    if tp.lr <= 0 or tp.min_lr < 0 or tp.min_lr > tp.lr:
        raise UserError(f"train.lr ({tp.lr}) must be positive and train.min_lr ({tp.min_lr}) in [0, lr]")
    if tp.parallel not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel: expected ddp or fsdp, got '{tp.parallel}'")
    if tp.nonfinite not in ("skip", "abort"):
        raise UserError(f"train.nonfinite: expected skip or abort, got '{tp.nonfinite}'")


def resolve_total_steps(tp: TrainParams, n_windows: int, global_batch: int) -> int:
    if tp.max_steps:
        return tp.max_steps
    if tp.max_tokens:
        return math.ceil(tp.max_tokens / (global_batch * tp.seq_len))
    if tp.epochs > 0:
        return math.ceil(tp.epochs * n_windows / global_batch)
    raise UserError("train.max_steps, train.max_tokens and train.epochs are all 0: set one of them")


def lr_at(step: int, tp: TrainParams, total_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < tp.warmup_steps:
        return tp.lr * (step + 1) / tp.warmup_steps
    progress = (step - tp.warmup_steps) / max(total_steps - tp.warmup_steps, 1)
    return tp.min_lr + 0.5 * (tp.lr - tp.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, tp: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, decaying matrices only: norms' gains (and any bias) are not pulled towards 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tp.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # Fused: one kernel for the whole update (CUDA, and CPU since torch 2.4) instead of ~10 per tensor.
    return torch.optim.AdamW(groups, lr=tp.lr, betas=(tp.beta1, tp.beta2), fused=True)


@torch.no_grad()
def evaluate(model, val_data: WindowSampler, tp: TrainParams, device, autocast) -> float:
    """Mean loss over the fixed validation windows; every rank scores all of them (cheap, exact)."""
    model.eval()
    windows = eval_windows(val_data.n_windows, tp.eval_batches * tp.micro_batch_size)
    total, count = 0.0, 0
    for i in range(0, len(windows), tp.micro_batch_size):
        x, y = val_data.batch(windows[i : i + tp.micro_batch_size])
        with autocast:
            logits, _ = model(x.to(device))
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def pick_checkpoint(resume: str, out_dir: Path, warn) -> dict | None:
    if resume == "none":
        return None
    if resume == "auto":
        if not out_dir.exists():
            return None
        state = find_resumable(out_dir, warn)
        if state is None and (step_checkpoints(out_dir) or (out_dir / LATEST).exists()):
            # Never quietly start a long run over because its checkpoints are damaged.
            raise UserError(f"{out_dir}: none of its checkpoints verifies (reasons above); move them away, "
                            "or pass --resume none to start over")
        return state
    state = load_checkpoint(resume)
    state["path"] = resume
    return state


def check_compatible(checkpoint: dict, model_config, fingerprints: dict, allow_data_change: bool) -> None:
    """Refuse to resume into a different model, tokenizer, data or batch, naming each field."""
    where = checkpoint["path"]
    differing = [f"model.{k} ({checkpoint['model_config'].get(k)} → {v})"
                 for k, v in dataclasses.asdict(model_config).items() if checkpoint["model_config"].get(k) != v]
    data_fields = ["tokenizer_sha256", "vocab_size", "seq_len", "global_batch"]
    if not allow_data_change:
        data_fields.append("store_fingerprint")
    differing += [f"{k} ({_short(checkpoint['data'].get(k))} → {_short(fingerprints[k])})"
                  for k in data_fields if checkpoint["data"].get(k) != fingerprints[k]]
    if differing:
        hint = " (new data on purpose? pass --allow-data-change)" if any(d.startswith("store_") for d in differing) else ""
        raise UserError(f"{where}: cannot resume, the run differs in {', '.join(differing)}{hint}")


def _short(value) -> str:
    return value[:12] if isinstance(value, str) else str(value)


def read_tokenizer_dir(path: Path) -> tuple[dict[str, str], str]:
    """The tokenizer's files as text (embedded in checkpoints) and its fingerprint.

    Decoded from bytes, not read as text: newline translation would change the
    fingerprint of a CRLF tokenizer.json once exported.
    """
    _, info = load_tokenizer(path)  # validates it; UserError names it
    directory = Path(info["path"])  # the directory, also when given the path of tokenizer.json
    files = {name: (directory / name).read_bytes().decode("utf-8") for name in TOKENIZER_FILES if (directory / name).is_file()}
    return files, info["fingerprint"]


def all_finite(state) -> bool:
    """No NaN or inf in any floating tensor of a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return not isinstance(state, float) or math.isfinite(state)


def injected_nan_steps() -> set[int]:
    """Fault injection for the reliability tests: MM_INJECT_NAN_STEPS=5,9 poisons those steps' loss."""
    text = os.environ.get("MM_INJECT_NAN_STEPS", "")
    return {int(s) for s in text.split(",") if s.strip()}


class _StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption) ask for a stop at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
