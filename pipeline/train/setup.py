"""What one training invocation holds (`Run`) and how it is built (`setup`).

`setup` goes device → data → model, precision, optimizer → resume, one ruled
section each, and fills the matching fields of `Run`; `open_outputs` adds the
display and the logs once there is something to train. pipeline/train/loop.py
advances the run step by step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline.architecture import flops_per_token, load_model_json
from pipeline.checkpoint.format import WAYS_OUT, check_compatible
from pipeline.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from pipeline.errors import UserError
from pipeline.evaluate.scoring import token_byte_lengths
from pipeline.export.hf_import import initial_model
from pipeline.hardware import peak_flops, peak_source, pick_device, resolve_dtype
from pipeline.model.transformer import ModelConfig
from pipeline.params import TrainParams
from pipeline.train import distributed
from pipeline.train.branch import check_resume_schedule, copy_branch_logs
from pipeline.train.compiling import decide as decide_compile
from pipeline.train.optim import make_optimizer
from pipeline.train.progress import PERF_COLUMNS, TRAIN_COLUMNS, VAL_COLUMNS, Display, MetricLog
from pipeline.train.resume import pick_checkpoint, supersede_run
from pipeline.train.run_data import TrainData, open_train_data
from pipeline.train.spike import SpikeGuard
from pipeline.train.tracking import Trackers


@dataclass
class Run:
    """One invocation of training: built by `setup`, advanced by `train_step`, ended by `finish`.

    Fields are grouped by the section of `setup` (or `open_outputs`) that sets them."""

    tp: TrainParams
    world: distributed.World
    stop: StopRequest
    out_dir: Path
    # device
    device: torch.device = None
    amp_dtype: torch.dtype = torch.float32
    # data
    model_config: ModelConfig = None
    data: TrainData = None  # the sources, the sampler, the validation windows
    store_path: Path = None  # named when a batch holds a token id >= vocab_size
    total_steps: int = 0
    fingerprints: dict = field(default_factory=dict)  # what a resume must match: the checkpoint's "data"
    tokenizer_files: dict = field(default_factory=dict)  # {name: text}, embedded in every checkpoint
    # model, precision, optimizer
    raw_model: torch.nn.Module = None  # the bare Transformer (under FSDP the sharded model itself)
    model: torch.nn.Module = None  # what backward runs through: DDP/FSDP around raw_model, or raw_model
    forward: Callable = None  # model, or torch.compile(model)
    compiled: bool = False
    compile_reason: str = ""  # why train.compile chose as it did, for the summary
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    autocast: AbstractContextManager = field(default_factory=nullcontext)
    sync_counter: distributed.GradSyncCounter | None = None  # DDP only
    # resume (then advanced by train_step)
    start_step: int = 0
    branch_of: Path | None = None  # the run directory this one branched from (pipeline/train/branch.py)
    spike: SpikeGuard = None  # the loss-spike guard (pipeline/train/spike.py)
    skipped: int = 0
    loss: float = math.nan
    val_loss: float = math.nan
    val_losses: dict[str, float] = field(default_factory=dict)  # the last evaluation's, per source
    val_bpb: float = math.nan  # bits per byte of the last evaluation, on the training mixture
    val_bpbs: dict[str, float] = field(default_factory=dict)  # the same per source
    # outputs: the display on every rank (silent off rank 0), the logs on rank 0 only
    display: Display | None = None
    train_log: MetricLog | None = None
    val_log: MetricLog | None = None
    perf_log: MetricLog | None = None  # MFU and peak memory per step: the trackers' backfill reads them
    flops_per_token: int = 0
    peak_flops: float = 1.0
    tokens_per_s: float = 0.0  # of the last step, rank 0
    mfu: float = 0.0  # of the last step, rank 0
    data_wait_s: float = 0.0  # this invocation's time spent building batches and copying them to the device
    step_time_s: float = 0.0  # this invocation's time in train_step: data_wait_s / step_time_s is the data share
    nan_steps: set[int] = field(default_factory=set)
    nan_grad_steps: set[int] = field(default_factory=set)
    # experiment trackers (pipeline/train/tracking.py): empty unless train.trackers names some, on rank 0
    tracker_state: dict | None = None  # the resumed checkpoint's "trackers": the runs to continue
    trackers: Trackers = field(default_factory=Trackers)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, all ranks together."""
        return self.tp.global_batch(self.world.size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.tp.seq_len

    def note(self, text: str) -> None:
        """A line on stderr from rank 0 (before the display exists)."""
        if self.world.is_main:
            print(text, file=sys.stderr, flush=True)


# Long because its ruled sections (device, data, model, resume) fill one Run in order; each is short.
def setup(tp: TrainParams, weights: dict[str, float], store_path, tokenizer_dir, model_path, resume: str,
          allow_data_change: bool, requested: str, world: distributed.World, stop: StopRequest, phases=()) -> Run:
    """Device, data, model, optimizer, and the state of the checkpoint resumed from (if any).

    weights: {source name: weight} (data.sources), the sources to draw from; phases: data.phases (mixture.py)."""
    run = Run(tp=tp, world=world, stop=stop, out_dir=Path(tp.out_dir), spike=SpikeGuard(tp))

    # ------------------------------------------------------------------ device
    run.device = pick_device(requested, world.local_rank)
    run.amp_dtype = resolve_dtype(tp.dtype, run.device)
    torch.manual_seed(tp.seed)

    # ------------------------------------------------------------------ data
    run.data = open_train_data(store_path, weights, tp, run.note, phases)
    store = run.data.store
    run.store_path = store.path  # a Path, or a RemotePath that prints as its URL
    run.tokenizer_files, tokenizer_sha, tokenizer = read_tokenizer_dir(tokenizer_dir)
    if store.tokenizer_fingerprint != tokenizer_sha:
        raise UserError(f"{tokenizer_dir}: tokenizer differs from the one {store_path} was tokenized with "
                        "(fingerprint)")
    run.model_config = config = load_model_json(model_path)
    if config.vocab_size != store.vocab_size:
        raise UserError(f"{model_path}: vocab_size {config.vocab_size} does not match the token store's "
                        f"{store.vocab_size} ({store_path})")
    if tp.seq_len > config.max_seq_len:
        raise UserError(f"train.seq_len {tp.seq_len} exceeds the model's max_seq_len {config.max_seq_len} "
                        f"({model_path})")
    run.data.byte_lengths = token_byte_lengths(tokenizer, config.vocab_size)  # validation's bits per byte
    run.total_steps = resolve_total_steps(tp, run.data.n_windows, run.global_batch)
    run.data.plan(run.total_steps, run.global_batch)  # data.phases are placed over the run's length
    run.fingerprints = {
        "tokenizer_sha256": tokenizer_sha, "store_fingerprint": store.fingerprint,
        "data_mixture": run.data.mixture_key,
        "vocab_size": store.vocab_size, "seq_len": tp.seq_len, "global_batch": run.global_batch,
        "seed": tp.seed,  # keys the window order (pipeline/data/sampler.py)
    }

    # ------------------------------------------------------------------ model, precision, optimizer
    run.raw_model = initial_model(config, tp.init, tokenizer_sha, run.note).to(run.device)  # random or train.init
    run.raw_model.document_attention = tp.attention == "document"
    run.raw_model.document_positions = tp.document_positions
    run.raw_model.checkpoint_blocks = tp.activation_checkpointing == "blocks"
    run.model = distributed.wrap_model(run.raw_model, world, tp.parallel, run.device, find_unused=config.n_experts > 0)
    run.optimizer = make_optimizer(run.model, tp, run.device)
    run.sync_counter = distributed.grad_sync_counter(run.model)
    if run.amp_dtype != torch.float32:
        run.autocast = torch.autocast(run.device.type, dtype=run.amp_dtype)
    run.scaler = torch.amp.GradScaler(run.device.type) if run.amp_dtype == torch.float16 else None
    run.compiled, run.compile_reason = decide_compile(tp.compile, run.device, config, tp.seq_len, run.tokens_per_step,
                                                      run.total_steps)
    run.forward = torch.compile(run.model) if run.compiled else run.model

    # ------------------------------------------------------------------ resume
    checkpoint = pick_checkpoint(resume, run.out_dir, run.note, supersede=world.is_main)
    checkpoint = _unless_user_data_replaces_it(run, checkpoint, resume)
    if checkpoint is not None:
        run.fingerprints["data_mixture"] = run.data.resume(checkpoint["data"], checkpoint["step"] * run.global_batch)
        check_compatible(checkpoint, config, run.fingerprints, allow_data_change)
        saved_optimizer = checkpoint["train_config"].get("optimizer", "adamw")
        if saved_optimizer != tp.optimizer:  # their states have different shapes: refuse before loading
            raise UserError(f"{checkpoint['path']}: cannot resume, the run differs in train.optimizer "
                            f"({saved_optimizer} → {tp.optimizer}); {WAYS_OUT}")
        resume_schedule(run, checkpoint)  # the learning rate of steps taken stays theirs, except in a branch
        distributed.load_full_state(run.model, run.optimizer, checkpoint["model"], checkpoint["optimizer"], world)
        if run.scaler is not None and checkpoint["scaler"]:
            run.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        run.start_step = checkpoint["step"]
        run.skipped = checkpoint["metrics"].get("skipped_steps", 0)
        run.loss = checkpoint["metrics"].get("train_loss", run.loss)
        run.val_loss = checkpoint["metrics"].get("val_loss") or float("nan")
        run.val_bpb = checkpoint["metrics"].get("val_bits_per_byte") or float("nan")  # absent before it was recorded
        run.val_losses = dict(checkpoint["metrics"].get("val_loss_by_source") or {})
        run.val_bpbs = dict(checkpoint["metrics"].get("val_bits_per_byte_by_source") or {})
        run.tracker_state = None if run.branch_of else checkpoint.get("trackers")  # a branch is a new tracker run
        del checkpoint
    # Every rank reads the checkpoint itself, so all must see the same one (a shared out_dir).
    distributed.check_same(run.start_step, world,
                           f"the step to resume from (is {run.out_dir} on a filesystem every node shares?)")
    if run.compiled:  # the first step then takes a while: say why
        run.note(f"compiling the model ({run.compile_reason})")
    return run


def _unless_user_data_replaces_it(run: Run, checkpoint: dict | None, resume: str) -> dict | None:
    """`mm tokenize data/raw.jsonl && mm train` after the demo: the shipped-default rule now trains
    on the user's sources, so the run `--resume auto` found in out_dir (the demo's, on other sources)
    is not this run to continue. It is moved to out_dir/superseded/ (never deleted), with one line,
    and training starts fresh. Everywhere else a resume with other data is refused as before."""
    if checkpoint is None or resume != "auto" or run.data.chosen_by == "data.sources":
        return checkpoint
    trained_on = sorted((checkpoint["data"].get("sources") or {}).keys())
    if trained_on == sorted(run.data.names):
        return checkpoint
    if run.world.is_main:
        moved = supersede_run(run.out_dir)
        where = f"moved it to {moved[0]}" if moved else "left it in place"
        run.note(f"{run.out_dir} held a run on {', '.join(trained_on) or 'other sources'}; this one trains on "
                 f"{', '.join(run.data.names)} (the shipped-default rule), so it starts fresh: {where}")
    return None


def open_outputs(run: Run, cleanup: ExitStack) -> None:
    """The live bar and the metric logs (cut back to the resumed step), closed however the run ends."""
    main = run.world.is_main
    run.note(run.data.summary(run.total_steps, run.global_batch))  # only when there is something to train
    run.display = Display(run.total_steps, run.start_step, run.tp.log_interval, enabled=main)
    cleanup.callback(run.display.close)  # a live bar left running would leave the terminal's cursor hidden
    run.display.val_loss = run.val_loss
    if main:
        names = run.data.names
        if run.branch_of is not None:  # a branch's logs start as its parent's, up to the step it branched at
            copy_branch_logs(run.branch_of, run.out_dir, run.start_step)
        run.spike.open_log(run.out_dir, run.start_step, cleanup)  # spikes.tsv, cut back like the logs
        run.train_log = MetricLog(run.out_dir / "train_log.tsv", TRAIN_COLUMNS + [f"tokens/{n}" for n in names],
                                  run.start_step)
        cleanup.callback(run.train_log.close)
        run.val_log = MetricLog(run.out_dir / "val_log.tsv", VAL_COLUMNS + [f"val_loss/{n}" for n in names],
                                run.start_step)
        cleanup.callback(run.val_log.close)
        run.perf_log = MetricLog(run.out_dir / "perf_log.tsv", PERF_COLUMNS, run.start_step)
        cleanup.callback(run.perf_log.close)
    run.flops_per_token = flops_per_token(run.model_config, run.tp.seq_len)
    run.peak_flops = peak_flops(run.device, run.amp_dtype) * run.world.size if main else 1.0
    run.display.peak_source = peak_source(run.device)  # the bar says what MFU is measured against
    run.nan_steps = injected_nan_steps()
    run.nan_grad_steps = injected_nan_steps("MM_INJECT_NAN_GRAD_STEPS")


def resume_schedule(run: Run, checkpoint: dict) -> None:
    """The learning rate's rules at resume (pipeline/train/branch.py: refuse, or a note), whether this
    run is a branch, the spike guard's state, and the line saying where the run resumes."""
    run.branch_of, change = check_resume_schedule(
        checkpoint, run.tp, run.total_steps, lambda t: resolve_total_steps(t, run.data.n_windows, run.global_batch),
        run.out_dir)
    run.spike.restore(checkpoint["metrics"].get("spike_guard"))
    branch = f" as a branch of {run.branch_of} into {run.out_dir}" if run.branch_of else ""
    run.note(f"resuming from {checkpoint['path']} at step {checkpoint['step']}{branch}")
    if change:
        run.note(change)


def resolve_total_steps(tp: TrainParams, n_windows: int, global_batch: int) -> int:
    if tp.max_steps:
        return tp.max_steps
    if tp.max_tokens:
        return math.ceil(tp.max_tokens / (global_batch * tp.seq_len))
    if tp.epochs > 0:
        return math.ceil(tp.epochs * n_windows / global_batch)
    raise UserError("train.max_steps, train.max_tokens and train.epochs are all 0: set one of them")



def read_tokenizer_dir(path: Path) -> tuple[dict[str, str], str, object]:
    """The tokenizer's files as text (embedded in checkpoints), its fingerprint, and the tokenizers.Tokenizer.

    Decoded from bytes, not read as text: newline translation would change the
    fingerprint of a CRLF tokenizer.json once exported.
    """
    tokenizer, info = load_tokenizer(path)  # validates it; UserError names it
    directory = Path(info["path"])  # the directory, also when given the path of tokenizer.json
    files = {name: (directory / name).read_bytes().decode("utf-8")
             for name in TOKENIZER_FILES if (directory / name).is_file()}
    return files, info["fingerprint"], tokenizer


def injected_nan_steps(variable: str = "MM_INJECT_NAN_STEPS") -> set[int]:
    """Fault injection for the reliability tests: MM_INJECT_NAN_STEPS=5,9 poisons those steps' loss,
    MM_INJECT_NAN_GRAD_STEPS=3 one gradient element of step 3 (the loss stays finite)."""
    text = os.environ.get(variable, "")
    return {int(s) for s in text.split(",") if s.strip()}


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption) and a first Ctrl-C (SIGINT) ask for a stop
    at the next step boundary, with a checkpoint; a second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.interrupted = False  # the request was Ctrl-C: exit 130 rather than 75
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C: at once
            if os.environ.get("RANK", "0") == "0":  # os.write: safe inside a handler, even mid-print
                os.write(2, b"\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again stops at once)\n")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
