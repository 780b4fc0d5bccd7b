"""Model presets, model.json, and the arithmetic about a config (params, FLOPs, peak training memory)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import atomic
from pipeline.errors import UserError
from pipeline.model.cpu_attention import CPU_MATMUL_ATTENTION_MAX_SCORES
from pipeline.model.transformer import ModelConfig

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


def hidden_matrix_shapes(c: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix inside the blocks: what train.optimizer=muon orthogonalises."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    mlp = [(c.hidden_dim, c.dim), (c.hidden_dim, c.dim), (c.dim, c.hidden_dim)]
    ffn = mlp * c.n_experts + [(c.n_experts, c.dim)] if c.n_experts else mlp
    return c.n_layers * ([(q, c.dim), (kv, c.dim), (kv, c.dim), (c.dim, q)] + ffn)


def newton_schulz_flops(c: ModelConfig, steps: int = 5) -> int:
    """FLOPs of Muon's orthogonalisation per optimizer step (not in MFU, which counts model FLOPs).

    torch.optim.Muon's quintic iteration on an m×n matrix (m ≤ n after transposing),
    per step: A = X·Xᵀ (2m²n), B = b·A + c·A·A (2m³), X = a·X + B·X (2m²n).
    """
    total = 0
    for rows, cols in hidden_matrix_shapes(c):
        m, n = min(rows, cols), max(rows, cols)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


# ---------------------------------------------------------------------------
# Peak training memory (`mm config`); how it was derived and how close it comes: docs/training.md
# ---------------------------------------------------------------------------

# What the process holds besides tensors on a CPU: Python, torch's libraries, allocator slack.
# Measured: the RSS after imports and a few steps of a minute model (Linux, torch 2.13 CPU build).
CPU_RUNTIME_BYTES = 410 * 2**20
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def training_memory(c: ModelConfig, micro_batch: int, seq_len: int, dtype: str = "fp32", optimizer: str = "adamw",
                    device: str = "cpu", checkpointing: str = "none", fused_loss: bool = False,
                    spike_copy: bool = False) -> dict[str, int]:
    """Estimated peak bytes of one process's training tensors, by part, and their sum ("total").

    The peak of a step is during the backward pass: the persistent state (fp32
    weights, optimizer state, gradients), every activation the forward saved for the
    backward, and the loss's own tensors over (batch × seq × vocab). dtype is the
    autocast precision (fp32 = no autocast). checkpointing="blocks" keeps each block's
    input only and recomputes one block at a time in the backward; fused_loss is the
    model's chunked LinearCrossEntropy (targets= in Transformer.forward) instead of full logits.
    spike_copy: the loss-spike guard's copy of the weights and optimizer state (train.spike_action=rollback).
    """
    e = ACTIVATION_BYTES[dtype]
    counts = count_params(c)
    n_params = counts["total"]
    norm_params = c.n_layers * (2 * c.dim + (2 * c.head_dim if c.qk_norm else 0)) + c.dim
    hidden_matrices = counts["non_embedding"] - norm_params
    if optimizer == "muon":  # one fp32 momentum buffer per hidden matrix; AdamW's two moments for the rest
        optimizer_bytes = 4 * hidden_matrices + 8 * (n_params - hidden_matrices)
    else:
        optimizer_bytes = 8 * n_params
    tokens = micro_batch * seq_len
    block = block_activation_bytes(c, micro_batch, seq_len, e, device)
    if checkpointing == "blocks":  # every block's fp32 input, and one block's activations while it is recomputed
        blocks = c.n_layers * 4 * tokens * c.dim + block
        weight_copies = hidden_matrices // c.n_layers + counts["embedding"]
    else:
        blocks = c.n_layers * block
        weight_copies = hidden_matrices + counts["embedding"]
    head = 8 * tokens + 4 * tokens * c.dim * 2 + 4 * tokens  # ids, final norm
    if not fused_loss:
        head += e * tokens * c.dim  # the head's input
    if e < 4:  # autocast keeps a half-precision copy of each matmul weight until the backward has used it
        blocks += 2 * weight_copies
    parts = {
        "weights": 4 * n_params + 2 * 4 * c.max_seq_len * c.head_dim,  # + RoPE tables
        "optimizer": optimizer_bytes,
        # All of them: the backward frees activations in pieces that the allocator keeps for
        # reuse, so gradients are new memory even where they could have fitted in the freed space.
        "grads": 4 * n_params,
        "activations": blocks + head,
        "loss": fused_loss_bytes(tokens, c, e) if fused_loss else loss_bytes(tokens, c.vocab_size, e),
        "spike_copy": 4 * n_params + optimizer_bytes if spike_copy else 0,  # pipeline/train/spike.py
    }
    parts["total"] = sum(parts.values())
    return parts


def block_activation_bytes(c: ModelConfig, batch: int, seq_len: int, e: int, device: str = "cpu") -> int:
    """Bytes one transformer block saves for its backward (pipeline/model/transformer.py's Block, e-byte activations).

    Counted tensor by tensor from the autograd graph (tests/test_optim.py checks the
    count against torch's saved-tensor hooks): each RMSNorm keeps its fp32 input, the
    normalised fp32 product and 1/rms; each Linear keeps its input (under autocast a
    separate half-precision cast per projection: q, k, v, gate, up); attention keeps
    q, k, v and either its output + log-sum-exp (SDPA) or the softmax probabilities
    (the CPU matmul path); SwiGLU keeps gate, silu(gate), up and their product.
    """
    n, d, h = batch * seq_len, c.dim, c.hidden_dim
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    norms = 2 * (4 * n * d * 2 + 4 * n)
    linear_inputs = (5 if e < 4 else 2) * e * n * d
    scores = batch * c.n_heads * seq_len * seq_len
    if device == "cpu" and e < 4 and scores <= CPU_MATMUL_ATTENTION_MAX_SCORES:
        attention = e * n * (q + 2 * kv) + e * scores + e * n * q  # + o_proj's input, a copy of the output
    else:  # SDPA's output is laid out (B, T, H, hd): o_proj's input is a view of it
        attention = e * n * (2 * q + 2 * kv) + 4 * n * c.n_heads
    if c.qk_norm:
        attention += 2 * 4 * n * (q + kv) + 4 * n * (c.n_heads + c.n_kv_heads)
    mlp = 4 * e * n * h * (c.top_k if c.n_experts else 1)
    rope = 4 * seq_len * c.head_dim * e if e < 4 else 0  # cos/sin cast to the activation dtype, for q and k
    return norms + linear_inputs + attention + mlp + rope


def loss_bytes(tokens: int, vocab: int, e: int) -> int:
    """The cross-entropy over full logits: the e-byte logits, their fp32 log-softmax, and in the
    backward two fp32 gradients of the same size."""
    return (e + 12) * tokens * vocab


def fused_loss_bytes(tokens: int, c: ModelConfig, e: int) -> int:
    """pipeline.model.fused_loss.LinearCrossEntropy: the gradients for the head's input (fp32) and weight (fp32) are
    formed in the forward and kept; while forming them, one chunk of fp32 logits (and its e-byte copy),
    the e-byte weight and an e-byte (vocab × dim) product per chunk."""
    from pipeline.model.fused_loss import LOSS_CHUNK_ELEMENTS

    chunk = min(tokens * c.vocab_size, max(1, LOSS_CHUNK_ELEMENTS // c.vocab_size) * c.vocab_size)
    return 4 * tokens * c.dim + 4 * c.vocab_size * c.dim + (4 + e) * chunk + 2 * e * c.vocab_size * c.dim
