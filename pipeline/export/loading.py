"""Load a model and its tokenizer from a checkpoint (ckpt.pth) or an `mm export` directory.

Loading an exported directory maps the safetensors names back through the
same table export wrote them with (pipeline/export/hf_format.py `weight_map`),
strictly. Used by `mm generate` and `mm eval`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import UserError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    """pipeline.model.transformer.Transformer in eval mode, fp32."""
    tokenizer: object
    """tokenizers.Tokenizer."""
    bos_id: int
    eos_id: int
    source: str
    """'checkpoint' or 'export'."""
    meta: dict = field(default_factory=dict)
    """For a checkpoint: its data and metrics fields (seq_len, val_loss, ...)."""


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A Transformer and its tokenizer from a ckpt.pth or from an `mm export` directory.

    BOS/EOS are the tokenizer's own (`tokenizer.tokenizer_from_files`), so a
    model trained with a GPT-2/Qwen-style tokenizer (EOS doubling as BOS) works too."""
    from pipeline.data.tokenizer import load_tokenizer, tokenizer_from_files

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model not found (give a ckpt.pth or an exported directory)")
    if path.is_dir():
        model = _load_export_dir(path)
        tokenizer, info = load_tokenizer(path)
        # Same fingerprint as the token store's (sha256 of tokenizer.json): export copies the file verbatim.
        meta = {"data": {"tokenizer_sha256": info["fingerprint"]}}
        source = "export"
    else:
        from pipeline.checkpoint.format import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(path)
        model = model_from_checkpoint(state)
        tokenizer, info = tokenizer_from_files(state.get("tokenizer") or {}, f"{path} tokenizer")
        meta = {"data": state.get("data") or {}, "metrics": state.get("metrics") or {}}
        source = "checkpoint"
    return LoadedModel(model.to(device).eval(), tokenizer, info["bos_id"], info["eos_id"], source, meta)


def _load_export_dir(path: Path):
    from safetensors import safe_open

    from pipeline.export.hf_format import check_keys, config_from_hf, weight_map
    from pipeline.model.transformer import Transformer

    config_path, weights_path, tok_path = path / "config.json", path / "model.safetensors", path / "tokenizer.json"
    for p in (config_path, weights_path, tok_path):
        if not p.is_file():
            raise UserError(f"{path}: not a model directory (no {p.name}; give a ckpt.pth or an `mm export` directory)")
    try:
        doc = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config_path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    config = config_from_hf(doc, source=str(config_path))
    table = weight_map(config, doc["model_type"])  # ours → HF
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            names = list(f.keys())
            check_keys(names, table.values(), str(weights_path))
            state = {ours: f.get_tensor(theirs).float() for ours, theirs in table.items()}
    except UserError:
        raise
    except Exception as e:  # safetensors' own errors: truncated or foreign file
        raise UserError(f"{weights_path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    model = Transformer(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        last = str(e).splitlines()[-1].strip()[:200]
        raise UserError(f"{weights_path}: weights do not fit config.json ({last})") from None
    return model
