"""`params.yaml`: every hyperparameter, one typed section per stage.

Each section is a dataclass whose fields carry a docstring (the data and
tokenizer sections are in pipeline/params_data.py). Loading checks
every key: an unknown key, a value of the wrong type, a word outside a closed
set (the `Literal` fields) or a number out of its range is a UserError that
names the file (or `--set`) and the key. `--set section.key=value` overrides
are parsed as YAML scalars and checked the same way, so `--set train.lr=3e-4`
and `--set train.compile=true` do what they look like. The range checks are
the sections' `check` methods: every stage, `--dry-run` included, sees them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.errors import ParamError, UserError, did_you_mean
from pipeline.params_data import DataParams, TokenizerParams, check_tokenizer_sources
from pipeline.params_train import ScheduleAndSpikeParams

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
Compile = Literal["auto", True, False]
ExportDtype = Literal["fp32", "bf16", "fp16"]
Tracker = Literal["tensorboard", "wandb", "swanlab"]  # pipeline/train/trackers.py has one class each


@dataclass
class ModelParams:
    preset: str = "tiny"
    """Architecture preset (tiny, minimind2-small, minimind2, minimind2-moe, minimind3)."""
    overrides: dict = field(default_factory=dict)
    """Fields of the preset to change, e.g. {dim: 256, n_layers: 4}."""


@dataclass
class TrainParams(ScheduleAndSpikeParams):  # the schedule and spike-guard keys: pipeline/params_train.py
    seq_len: int = 256
    """Tokens per training sample (each sample is a window of seq_len + 1 tokens)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one process."""
    accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step on each process."""
    max_steps: int = 300
    """Optimizer steps to train; 0 means derive from max_tokens or epochs."""
    max_tokens: int = 0
    """Token budget (used when max_steps is 0): steps = ceil(max_tokens / tokens per step)."""
    epochs: float = 0.0
    """Passes over the training split (used when max_steps and max_tokens are 0)."""
    stop_after: int = 0
    """Stop this invocation after this many steps, with a checkpoint, and exit 0; the LR
    schedule still spans the full run, and `--resume auto` continues it. 0 = run to the end."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-4
    """Where the cosine or wsd decay ends, reached exactly at the last step (constant: unused)."""
    warmup_steps: int = 30
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: torch.optim.Muon for the blocks' weight matrices and AdamW (lr, betas,
    weight_decay above) for the embedding/output head and the norms."""
    muon_lr: float = 0.02
    """Muon's peak learning rate: the same warmup and schedule as lr, scaled to this."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay: each step multiplies its matrices by 1 - lr·muon_weight_decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    dtype: Dtype = "auto"
    """Precision: auto | bf16 | fp16 | fp32 (auto picks bf16 where the hardware has it)."""
    seed: int = 1337
    """Seeds the weights and the data order."""
    window_start: Literal["stream", "document"] = "stream"
    """Where training windows start: stream (every seq_len tokens of the packed documents) or
    document (at a document's first token, BOS; the window still packs the documents after it)."""
    eval_interval: int = 50
    """Steps between validation-loss evaluations; 0 turns them off."""
    eval_batches: int = 8
    """Micro-batches of the val split per evaluation."""
    save_interval: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 3
    """Step checkpoints to keep besides ckpt.pth."""
    log_interval: int = 10
    """Steps between plain-text log lines (the live bar updates every step)."""
    out_dir: str = "out"
    """Where checkpoints and metrics go."""
    init: str = ""
    """The weights at step 0: a Hugging Face model directory (Llama, Qwen3, Qwen3-MoE, MiniMind, an mm
    export) or an mm checkpoint; "" starts from random weights. A fresh optimizer and schedule, not a
    resume; the model config must describe it (`mm config --from DIR`). Under DVC, see docs/training.md."""
    compile: Compile = "auto"
    """torch.compile the model: true, false, or auto (always on CUDA; on a CPU when the run is
    long enough for the faster steps to repay the compile time; the run summary says which)."""
    attention: Literal["causal", "document"] = "causal"
    """causal: a token attends to every earlier token of its window; document: only to earlier
    tokens of its own document (documents start at the window's BOS tokens)."""
    positions: Literal["auto", "window", "document"] = "auto"
    """RoPE positions: window (0 .. seq_len - 1) or document (restarting at 0 at each document's
    BOS); auto means document when attention is document, window otherwise."""
    activation_checkpointing: Literal["none", "blocks"] = "none"
    """blocks: keep only each transformer block's input and recompute the block during backward
    (less memory for about one more forward pass of compute)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Multi-process strategy: ddp (replicate) or fsdp (shard parameters, grads and optimizer state)."""
    nonfinite: Literal["skip", "abort"] = "skip"
    """On a non-finite loss or grad norm: skip the step (up to max_skips times) or abort."""
    max_skips: int = 10
    """Non-finite steps tolerated under nonfinite=skip before the run aborts."""
    trackers: list[Tracker] = field(default_factory=list)
    """Experiment trackers to stream metrics to (rank 0): tensorboard, wandb, swanlab; each an optional
    extra (`pip install 'mm[wandb]'`), offline unless configured online. `--set train.trackers=tensorboard,wandb`."""

    @property
    def document_positions(self) -> bool:
        """Whether RoPE positions restart at each document (train.positions, auto resolved)."""
        return self.positions == "document" or (self.positions == "auto" and self.attention == "document")

    @property
    def rank_batch(self) -> int:
        """Sequences one process trains on per optimizer step."""
        return self.micro_batch_size * self.accumulation_steps

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all processes: what the loss of a step averages over."""
        return self.rank_batch * world_size

    def check(self) -> None:
        for name in ("seq_len", "micro_batch_size", "accumulation_steps", "save_interval", "log_interval", "keep_last"):
            if getattr(self, name) < 1:
                raise ParamError(f"train.{name}", f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "eval_interval", "eval_batches", "warmup_steps", "max_skips",
                     "stop_after", "grad_clip", "weight_decay", "epochs", "muon_weight_decay"):
            if getattr(self, name) < 0:
                raise ParamError(f"train.{name}", f"must not be negative, got {getattr(self, name)}")
        if self.eval_interval and not self.eval_batches:
            raise ParamError("train.eval_batches", "must be at least 1 when train.eval_interval is set "
                             "(0 turns evaluation off)")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ParamError(f"train.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ParamError("train.lr", f"must be positive, got {self.lr}")
        if self.muon_lr <= 0:
            raise ParamError("train.muon_lr", f"must be positive, got {self.muon_lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ParamError("train.min_lr", f"must be in [0, train.lr ({self.lr})], got {self.min_lr}")
        self.check_schedule_and_spike()


@dataclass
class TrackingParams:
    project: str = ""
    """Project name in the trackers; empty means the current directory's name."""
    run_name: str = ""
    """Run name in the trackers; empty means train.out_dir's name and the start time. A resumed run keeps
    the name and run ids stored in its checkpoint."""


@dataclass
class ExportParams:
    dtype: ExportDtype = "fp32"
    """Weight dtype of the exported model: fp32 | bf16 | fp16."""


@dataclass
class EvalParams:
    batches: int = 32
    """Micro-batches of the val split that `mm eval` scores (0 = the whole split)."""
    batch_size: int = 8
    """Sequences per batch in `mm eval`."""

    def check(self) -> None:
        if self.batches < 0:
            raise ParamError("eval.batches", f"must not be negative, got {self.batches}")
        if self.batch_size < 1:
            raise ParamError("eval.batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass
class BenchParams:
    tasks: str = "examples/bench/docstring_mc.yaml"
    """`mm eval --tasks` for the `bench` DVC stage: lm-eval task names or task YAML files, comma-separated."""
    num_fewshot: int = 0
    """Examples in each prompt (0 = zero-shot)."""
    limit: int = 0
    """Documents scored per task (0 = all)."""
    batch_size: int = 8
    """Requests per forward pass."""
    stages: list[str] = field(default_factory=list)
    """[bench] puts the stage in DVC's pipelines (bench/dvc.yaml: `dvc repro bench/dvc.yaml` runs it,
    `dvc status` checks it); [] leaves it out, so `dvc status` does not report a stage never run."""

    def check(self) -> None:
        if not self.tasks.strip():
            raise ParamError("bench.tasks", "must name at least one task")
        if self.stages not in ([], ["bench"]):
            raise ParamError("bench.stages", f"must be [] or [bench], got {self.stages}")
        if self.num_fewshot < 0 or self.limit < 0:
            raise ParamError("bench.num_fewshot" if self.num_fewshot < 0 else "bench.limit", "must not be negative")
        if self.batch_size < 1:
            raise ParamError("bench.batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    export: ExportParams = field(default_factory=ExportParams)
    eval: EvalParams = field(default_factory=EvalParams)
    bench: BenchParams = field(default_factory=BenchParams)


def check_params(params: Params) -> None:
    """Every section's range checks (load_params runs them; code that builds Params itself calls this)."""
    for f in dataclasses.fields(params):
        check = getattr(getattr(params, f.name), "check", None)
        if check is not None:
            check()
    check_tokenizer_sources(params.tokenizer, params.data)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (a missing default file means all defaults), then apply overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise UserError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
            if not isinstance(raw, dict):
                raise UserError(f"{path}: top level must be a mapping of sections")
        elif str(path) != "params.yaml":
            raise UserError(f"{path}: params file not found")
    source = str(path) if path is not None else "params"
    params = Params()
    origin: dict[str, str] = {}  # section.key → where its value came from, for range errors
    for section_name, section_values in raw.items():
        section = _section(params, section_name, source)
        if not isinstance(section_values, dict):
            raise UserError(f"{source}: section '{section_name}' must be a mapping")
        for key, value in section_values.items():
            _assign(section, section_name, key, value, source)
            origin[f"{section_name}.{key}"] = source
    for item in overrides or []:
        key_path, sep, text = item.partition("=")
        if not sep or "." not in key_path:
            raise UserError(f"--set {item!r}: expected section.key=value")
        section_name, _, key = key_path.partition(".")
        section = _section(params, section_name, "--set")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not a valid YAML scalar") from None
        _assign(section, section_name, key, value, "--set")
        origin[key_path] = "--set"
    if "tokenizer.sources" not in origin:  # absent: every source in data.sources
        params.tokenizer.sources = list(params.data.sources)
    try:
        check_params(params)
    except ParamError as e:
        raise UserError(f"{origin.get(e.key, source)}: {e}") from None
    return params


def _section(params: Params, name: str, source: str):
    if name not in {f.name for f in dataclasses.fields(Params)}:
        known = [f.name for f in dataclasses.fields(Params)]
        raise UserError(f"{source}: unknown section '{name}'{did_you_mean(name, known)} (known: {', '.join(known)})")
    return getattr(params, name)


def _assign(section, section_name: str, key: str, value, source: str) -> None:
    # model.<field> is shorthand for model.overrides.<field>; the model stage checks the name.
    if isinstance(section, ModelParams) and key not in ("preset", "overrides"):
        section.overrides[key] = value
        return
    types = typing.get_type_hints(type(section))
    head, dot, rest = key.partition(".")
    if dot and types.get(head) is dict:
        # data.sources.web.weight=0.3: one entry inside a mapping-valued key.
        _assign_nested(getattr(section, head), rest.split("."), value, f"{section_name}.{head}", source)
        return
    if key not in {f.name for f in dataclasses.fields(section)}:
        known = [f.name for f in dataclasses.fields(section)]
        raise UserError(f"{source}: unknown key '{section_name}.{key}'{did_you_mean(key, known, section_name + '.')}")
    setattr(section, key, _coerce(value, types[key], f"{section_name}.{key}", source))


def _assign_nested(mapping: dict, keys: list[str], value, name: str, source: str) -> None:
    for k in keys[:-1]:
        name = f"{name}.{k}"
        if not isinstance(mapping.get(k, {}), dict):
            raise UserError(f"{source}: '{name}' is not a mapping")
        mapping = mapping.setdefault(k, {})
    mapping[keys[-1]] = value


def _coerce(value, annotation, name: str, source: str):
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        # True/False by identity: 1 == True, but 1 is not an answer to a yes/no key.
        if not any(value is c if isinstance(c, bool) else (isinstance(value, str) and value == c) for c in choices):
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in choices)
            raise UserError(f"{source}: '{name}' must be one of {shown}, got {value!r}")
        return value
    if typing.get_origin(annotation) is list:
        # A YAML list, or one comma-separated string (what `--set key=a,b` gives); each item checked.
        if value is None or value == "":
            return []
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise UserError(f"{source}: '{name}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, name, source) for item in items]
    expected = annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; a user means the number.
        try:
            value = float(value)
        except ValueError:
            pass
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if expected is dict and value is None:
        value = {}
    if expected is list and isinstance(value, str):
        value = [value]  # --set tokenizer.sources=web
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise UserError(f"{source}: '{name}' must be {expected.__name__}, got {value!r}")
    return value

