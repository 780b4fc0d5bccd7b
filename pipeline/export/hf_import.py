"""Read a Hugging Face model directory into mm's Transformer: an `mm export`, or a Llama / Qwen3 /
Qwen3-MoE / MiniMind model to continue training from (train.init); or an mm checkpoint as train.init.

Weights go through the exporter's table (pipeline/export/hf_format.py `weight_map`), strictly:
every tensor the files hold is used, every parameter is filled, every shape is checked. Files:
model.safetensors, sharded safetensors with model.safetensors.index.json, or pytorch_model.bin
(sharded or not; read weights-only and memory-mapped), in any float dtype. Each tensor is copied
into the model's fp32 parameter as soon as it is read and one file is open at a time, so loading
holds the model plus one tensor (and one file's mapped pages), never a second copy of the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.export.hf_config import config_from_hf
from pipeline.export.hf_format import TIED_HEAD, check_keys, weight_map
from pipeline.model.transformer import ModelConfig

_EMBED = "model.embed_tokens.weight"


@dataclass
class HFDir:
    path: Path
    config: ModelConfig
    model_type: str
    files: dict[str, Path]
    """Tensor name → the file holding it."""


def open_hf_dir(path: str | Path) -> HFDir:
    """config.json read and checked (pipeline/export/hf_config.py), and where each tensor is."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: not a model directory (no config.json; give a ckpt.pth or a Hugging Face "
                        "model directory)")
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config_path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    files = _tensor_files(path)
    config, model_type = config_from_hf(doc, str(config_path), files.keys())
    return HFDir(path, config, model_type, files)


def _tensor_files(path: Path) -> dict[str, Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise UserError(f"{index}: not a shard index (no weight_map)") from None
            files = {name: path / shard for name, shard in shards.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise UserError(f"{index}: shard {shard.name} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return dict.fromkeys(_names_in(path / single), path / single)
    raise UserError(f"{path}: no weights (model.safetensors, model.safetensors.index.json with its shards, "
                    "or pytorch_model.bin)")


def _names_in(file: Path) -> list[str]:
    return list(_read_file(file, names_only=True))


def _read_file(file: Path, names_only: bool = False, wanted=None):
    """(name, tensor) for each tensor of one file (only the names with names_only); one file open at a time."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if wanted is None or name in wanted:
                        yield (name if names_only else (name, f.get_tensor(name)))
            return
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except UserError:
        raise
    except Exception as e:  # safetensors' and torch's own errors: a truncated or foreign file
        raise UserError(f"{file}: not a readable weights file ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{file}: not a state dict of tensors")
    for name in list(state):
        if wanted is None or name in wanted:
            yield (name if names_only else (name, state.pop(name)))


def load_into(model: torch.nn.Module, hf: HFDir) -> None:
    """Fill every parameter of `model` (built from hf.config) from the directory's files, strictly."""
    table = weight_map(hf.config, hf.model_type)  # ours → theirs
    names = set(hf.files)
    head_only = TIED_HEAD in names and _EMBED not in names
    found = (names - {TIED_HEAD}) | ({_EMBED} if head_only else set())
    check_keys(found, table.values(), str(hf.path))
    ours_of = {theirs: ours for ours, theirs in table.items()}
    if head_only:
        ours_of[TIED_HEAD] = ours_of.pop(_EMBED)
    params = dict(model.named_parameters())
    by_file: dict[Path, set[str]] = {}
    for name, file in hf.files.items():
        by_file.setdefault(file, set()).add(name)
    head = None
    with torch.no_grad():
        for file in sorted(by_file):
            for name, tensor in _read_file(file, wanted=by_file[file]):
                if not tensor.is_floating_point():
                    raise UserError(f"{file}: {name} is {tensor.dtype}, not a float tensor (quantized weights "
                                    "are not supported)")
                if name == TIED_HEAD and not head_only:
                    head = (file, tensor)  # compared with the embedding once that is loaded
                    continue
                param = params[ours_of[name]]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise UserError(f"{file}: {name} has shape {tuple(tensor.shape)}, config.json says "
                                    f"{tuple(param.shape)}")
                param.copy_(tensor)
                del tensor
        if head is not None and not torch.equal(head[1].to(params["embed_tokens.weight"].dtype),
                                                params["embed_tokens.weight"]):
            raise UserError(f"{head[0]}: {TIED_HEAD} differs from {_EMBED}: the output head is not tied to the "
                            "embedding, which mm's model cannot represent")


# ---------------------------------------------------------------------------
# train.init: the weights at step 0
# ---------------------------------------------------------------------------

def initial_model(config: ModelConfig, init: str, tokenizer_sha256: str, note=None) -> torch.nn.Module:
    """The model training starts from: random weights, or with train.init those of `init` (on the CPU)."""
    from pipeline.model.transformer import Transformer

    model = Transformer(config)
    if init:
        loaded = init_weights(model, init, tokenizer_sha256)
        if note is not None:
            note(f"train.init: {loaded}")
    return model


# Fields that do not change what the weights compute: the init may differ from model.json in these.
_FREE_FIELDS = {"init_std", "aux_loss_coef"}


def init_weights(model: torch.nn.Module, path: str | Path, tokenizer_sha256: str, where: str = "train.init") -> str:
    """Overwrite `model`'s weights with those of a Hugging Face directory or an mm checkpoint.

    The init must describe the same architecture as the model (model.json; `mm config --from`
    writes it) and, where it names its tokenizer, the run's tokenizer. Returns what was loaded,
    for the run's log line."""
    path = Path(path)
    source = f"{where} {path}"
    if not path.exists():
        raise UserError(f"{source}: not found (give a Hugging Face model directory or an mm ckpt.pth)")
    if path.is_dir():
        hf = open_hf_dir(path)
        _same_architecture(hf.config, model.config, source)
        tok = path / "tokenizer.json"
        if tok.is_file():
            _same_tokenizer(hashlib.sha256(tok.read_bytes()).hexdigest(), tokenizer_sha256, source)
        load_into(model, hf)
        return f"{hf.model_type} weights from {path} ({len(set(hf.files.values()))} file(s))"
    from pipeline.checkpoint.format import load_checkpoint, model_config

    state = load_checkpoint(path)
    _same_architecture(model_config(state, str(path)), model.config, source)
    saved_tokenizer = (state.get("data") or {}).get("tokenizer_sha256")
    if saved_tokenizer:
        _same_tokenizer(saved_tokenizer, tokenizer_sha256, source)
    model.load_state_dict(state["model"], strict=True)
    return f"the weights of {path} (step {state.get('step')})"


def _same_architecture(init: ModelConfig, ours: ModelConfig, source: str) -> None:
    a, b = dataclasses.asdict(init), dataclasses.asdict(ours)
    differing = [f"{k} ({a[k]} vs {b[k]})" for k in a if k not in _FREE_FIELDS and a[k] != b[k]]
    if differing:
        if init.vocab_size != ours.vocab_size and len(differing) == 1:
            raise UserError(f"{source}: its embedding has {init.vocab_size} rows, the model config and tokenizer "
                            f"say vocab_size {ours.vocab_size}")
        raise UserError(f"{source}: differs from the model config in {', '.join(differing)} (write the model config "
                        "from it: mm config --from DIR)")


def _same_tokenizer(init_sha: str, run_sha: str, source: str) -> None:
    if init_sha != run_sha:
        raise UserError(f"{source}: its tokenizer.json differs from the run's tokenizer (train with --tokenizer "
                        "pointing at the init's own, and tokenize the data with it)")
