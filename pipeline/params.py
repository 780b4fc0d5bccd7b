"""`params.yaml`: every hyperparameter, one typed section per stage.

Each section is a dataclass whose fields carry a docstring. Loading checks
every key: an unknown key or a value of the wrong type is a UserError that
names it. `--set section.key=value` overrides are parsed as YAML scalars and
checked the same way, so `--set train.lr=3e-4` and `--set train.compile=true`
do what they look like.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import UserError


@dataclass
class DataParams:
    raw: str = "data/sample.jsonl"
    """The raw JSONL corpus (one {"text": ...} per line); point it at your own."""
    val_fraction: float = 0.02
    """Fraction of documents (chosen by a hash of their text) held out for validation."""
    text_field: str = "text"
    """The JSON field that holds each document's text."""


@dataclass
class TokenizerParams:
    vocab_size: int = 6400
    """Vocabulary size of the byte-level BPE tokenizer, special tokens included."""


@dataclass
class ModelParams:
    preset: str = "tiny"
    """Architecture preset (tiny, minimind2-small, minimind2, minimind2-moe, minimind3)."""
    overrides: dict = field(default_factory=dict)
    """Fields of the preset to change, e.g. {dim: 256, n_layers: 4}."""


@dataclass
class TrainParams:
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
    """Floor of the cosine decay."""
    warmup_steps: int = 30
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    dtype: str = "auto"
    """Precision: auto | bf16 | fp16 | fp32 (auto picks bf16 where the hardware has it)."""
    seed: int = 1337
    """Seeds the weights and the data order."""
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
    compile: bool = False
    """Wrap the model in torch.compile."""
    parallel: str = "ddp"
    """Multi-process strategy: ddp (replicate) or fsdp (shard parameters, grads and optimizer state)."""
    nonfinite: str = "skip"
    """On a non-finite loss or grad norm: skip the step (up to max_skips times) or abort."""
    max_skips: int = 10
    """Non-finite steps tolerated under nonfinite=skip before the run aborts."""


@dataclass
class ExportParams:
    dtype: str = "fp32"
    """Weight dtype of the exported model: fp32 | bf16 | fp16."""


@dataclass
class EvalParams:
    batches: int = 32
    """Micro-batches of the val split that `mm eval` scores (0 = the whole split)."""
    batch_size: int = 8
    """Sequences per batch in `mm eval`."""


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    export: ExportParams = field(default_factory=ExportParams)
    eval: EvalParams = field(default_factory=EvalParams)


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
    for section_name, section_values in raw.items():
        section = _section(params, section_name, source)
        if not isinstance(section_values, dict):
            raise UserError(f"{source}: section '{section_name}' must be a mapping")
        for key, value in section_values.items():
            _assign(section, section_name, key, value, source)
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
    return params


def _section(params: Params, name: str, source: str):
    if name not in {f.name for f in dataclasses.fields(Params)}:
        known = ", ".join(f.name for f in dataclasses.fields(Params))
        raise UserError(f"{source}: unknown section '{name}' (known: {known})")
    return getattr(params, name)


def _assign(section, section_name: str, key: str, value, source: str) -> None:
    # model.<field> is shorthand for model.overrides.<field>; the model stage checks the name.
    if isinstance(section, ModelParams) and key not in ("preset", "overrides"):
        section.overrides[key] = value
        return
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise UserError(f"{source}: unknown key '{section_name}.{key}'")
    setattr(section, key, _coerce(value, fields[key].type, f"{section_name}.{key}", source))


def _coerce(value, annotation, name: str, source: str):
    expected = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}[str(annotation)]
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
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise UserError(f"{source}: '{name}' must be {expected.__name__}, got {value!r}")
    return value

