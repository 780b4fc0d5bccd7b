"""Load a model and its tokenizer from a checkpoint (ckpt.pth) or an `mm export` directory.

Loading a directory (an export, or any Hugging Face model mm can represent) maps
the tensor names back through the same table export wrote them with
(pipeline/export/hf_format.py `weight_map`), strictly: pipeline/export/hf_import.py.
Used by `mm generate` and `mm eval`.
"""

from __future__ import annotations

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
        meta = {"data": state.get("data") or {}, "metrics": state.get("metrics") or {},
                "train": state.get("train_config") or {}}
        source = "checkpoint"
    return LoadedModel(model.to(device).eval(), tokenizer, info["bos_id"], info["eos_id"], source, meta)


def _load_export_dir(path: Path):
    from pipeline.export.hf_import import load_into, open_hf_dir
    from pipeline.model.transformer import Transformer

    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: not a model directory (no tokenizer.json; give a ckpt.pth or an `mm export` "
                        "directory)")
    hf = open_hf_dir(path)
    model = Transformer(hf.config)
    load_into(model, hf)
    return model
