"""Model presets, model.json, and the arithmetic about a config (params, FLOPs, memory)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import atomic
from pipeline.errors import UserError
from pipeline.model import ModelConfig

# Shapes from MiniMind (README "Model Structure") and its successors; vocab comes from the tokenizer.
PRESETS: dict[str, dict] = {
    # Small enough to train in minutes on a laptop CPU: the demo and the tests.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=2048),
    "minimind2-small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2),  # 26M
    "minimind2": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2),  # 104M
    "minimind2-moe": dict(dim=640, n_layers=8, n_heads=8, n_kv_heads=2, n_experts=4, top_k=2),
    "minimind3": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, qk_norm=True),
}

MODEL_FORMAT = "mm-model"


def build_config(preset: str, vocab_size: int, overrides: dict | None = None) -> ModelConfig:
    """A preset plus overrides, checked: every error names the field."""
    if preset not in PRESETS:
        raise UserError(f"model.preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    values = {**PRESETS[preset], "vocab_size": vocab_size, **(overrides or {})}
    return config_from_dict(values, source="model")


def config_from_dict(values: dict, source: str) -> ModelConfig:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{source}: unknown model field '{key}'")
        kind = type(fields[key].default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{source}: model field '{key}' must be {kind.__name__}, got {value!r}")
        values[key] = value
    # Before construction: ModelConfig derives head_dim and hidden_dim by dividing.
    for name in ("dim", "n_heads"):
        if name in values and values[name] <= 0:
            raise UserError(f"{source}: model field '{name}' must be positive, got {values[name]}")
    config = ModelConfig(**values)
    _check(config, source)
    return config


def _check(c: ModelConfig, source: str) -> None:
    positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"]
    for name in positive:
        if getattr(c, name) <= 0:
            raise UserError(f"{source}: model field '{name}' must be positive, got {getattr(c, name)}")
    if c.n_heads % c.n_kv_heads:
        raise UserError(f"{source}: model field 'n_heads' ({c.n_heads}) must be a multiple of "
                        f"'n_kv_heads' ({c.n_kv_heads})")
    if c.head_dim % 2:
        raise UserError(f"{source}: model field 'head_dim' must be even for RoPE, got {c.head_dim}")
    if c.n_experts and not 0 < c.top_k <= c.n_experts:
        raise UserError(f"{source}: model field 'top_k' must be in 1..n_experts ({c.n_experts}), got {c.top_k}")


def save_model_json(config: ModelConfig, path: Path, preset: str) -> None:
    doc = {"format": MODEL_FORMAT, "preset": preset, **dataclasses.asdict(config)}
    atomic.write_text(path, json.dumps(doc, indent=2) + "\n")


def load_model_json(path: Path) -> ModelConfig:
    if not path.exists():
        raise UserError(f"{path}: model config not found (run `mm config` first)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno})") from None
    if not isinstance(doc, dict) or doc.pop("format", None) != MODEL_FORMAT:
        raise UserError(f"{path}: not an mm model config (missing \"format\": \"{MODEL_FORMAT}\")")
    doc.pop("preset", None)
    return config_from_dict(doc, source=str(path))


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------


def count_params(c: ModelConfig) -> dict[str, int]:
    """Parameter counts: total (tied embedding counted once), non-embedding, active per token (MoE)."""
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + (2 * c.head_dim if c.qk_norm else 0)
    mlp = 3 * c.dim * c.hidden_dim
    experts = max(c.n_experts, 1)
    ffn_total = mlp * experts + (c.dim * c.n_experts if c.n_experts else 0)
    ffn_active = mlp * (c.top_k if c.n_experts else 1) + (c.dim * c.n_experts if c.n_experts else 0)
    norms = 2 * c.dim
    embedding = c.vocab_size * c.dim
    non_embedding = c.n_layers * (attn + ffn_total + norms) + c.dim
    active = c.n_layers * (attn + ffn_active + norms) + c.dim
    return {"total": embedding + non_embedding, "non_embedding": non_embedding, "embedding": embedding,
            "active": embedding + active}


def flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6·(active matmul params) + attention.

    The matmul params include the tied output head (vocab × dim) but not the
    embedding lookup; attention scores and values add 12·layers·heads·head_dim·T
    (PaLM appendix B, no causal discount).
    """
    p = count_params(c)
    matmul = p["active"] - p["embedding"] - c.n_layers * 2 * c.dim - c.dim + c.vocab_size * c.dim
    return 6 * matmul + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def memory_bytes(c: ModelConfig) -> dict[str, int]:
    """Bytes of training state: fp32 weights, fp32 grads, AdamW's two fp32 moments."""
    n = count_params(c)["total"]
    return {"weights": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "total": 16 * n}
