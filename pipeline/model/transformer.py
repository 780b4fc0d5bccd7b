"""A decoder-only transformer in the MiniMind / Llama / Qwen3 family.

Read top to bottom: config, RMSNorm, RoPE, attention (grouped-query, through
scaled_dot_product_attention), SwiGLU MLP, mixture of experts, block, model.
Three pieces live in their own pure-torch modules: the CPU matmul attention
kernels (pipeline/model/cpu_attention.py: in bf16/fp16 with small scores, the same
math as three batched matmuls, which is faster there), document attention
(pipeline/model/doc_attention.py: tokens of a packed window attend only within their
own document) and the loss (pipeline/model/fused_loss.py: cross-entropy fused with
the output head, a chunk of rows at a time).
Pure torch: these four modules import only torch, the stdlib and one another
(tests/test_layout.py checks it), so parallelism, precision and compilation
are applied from outside (see pipeline/train/loop.py).

The parameter names and math match Hugging Face's Llama / Qwen3 / Mixtral
implementations so that export is a renaming table, not a conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.model.cpu_attention import causal_attention_cpu, use_matmul_attention
from pipeline.model.doc_attention import DocumentMask, document_attention, document_mask, document_positions
from pipeline.model.fused_loss import linear_cross_entropy


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    """Tokens in the vocabulary (taken from the tokenizer)."""
    dim: int = 512
    """Width of the residual stream."""
    n_layers: int = 8
    """Transformer blocks."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention: n_heads must be a multiple)."""
    head_dim: int = 0
    """Width of one head; 0 means dim // n_heads."""
    hidden_dim: int = 0
    """Inner width of the SwiGLU MLP; 0 means 8/3·dim rounded up to a multiple of 64."""
    max_seq_len: int = 32768
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 1e6
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3 style)."""
    n_experts: int = 0
    """Routed experts per MoE layer; 0 means a dense MLP."""
    top_k: int = 2
    """Experts each token is routed to (MoE only)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (MoE only)."""
    init_std: float = 0.02
    """Standard deviation of the initial weights."""

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim == 0:
            self.hidden_dim = 64 * math.ceil(self.dim * 8 / 3 / 64)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise and scale in fp32 even under autocast (one fused kernel), return the input dtype.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, in the rotate-half layout: (T, head_dim) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos, sin: (T, hd), or (B, 1, T, hd) for per-row positions. Rotates pairs (i, i + hd/2)."""
    # In x's dtype, as HF does: mixing bf16 and fp32 here costs ~50x on the CPU.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


class KVCache:
    """Keys and values of past positions for fast generation: one buffer pair per layer."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pos = 0  # positions already filled
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask: DocumentMask | None = None, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if mask is not None:
            y = document_attention(q, k, v, mask)
        elif cache is None and use_matmul_attention(q):
            y = causal_attention_cpu(q, k, v)
        else:
            attn_mask = None
            if cache is not None:
                # Append this step's keys and values; attend over everything so far.
                start = cache.pos
                cache.k[layer][:, :, start : start + T] = k
                cache.v[layer][:, :, start : start + T] = v
                k, v = cache.k[layer][:, :, : start + T], cache.v[layer][:, :, : start + T]
                # Query i sits at position start + i and may see keys 0 .. start + i.
                attn_mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            # Grouped-query attention: each KV head serves n_heads / n_kv_heads query heads.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=cache is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (softmax router, top-k weights renormalised, as Mixtral/Qwen3-MoE).

    The Switch-style balance loss n_experts · Σ_i f_i · P_i (f: share of tokens
    routed to expert i, P: mean router probability of i) is kept in
    self.aux_loss after each forward.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.dim, config.hidden_dim) for _ in range(config.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (N, C)
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).type_as(x)

        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])

        routed_share = F.one_hot(chosen, self.n_experts).float().sum(dim=1).mean(dim=0) / self.top_k  # (E,)
        self.aux_loss = self.n_experts * (routed_share * probs.mean(dim=0)).sum()
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if config.n_experts else MLP(config.dim, config.hidden_dim)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Not persistent: derived from the config, so checkpoints hold weights only.
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Training modes, set by the trainer; export and generation see a plain causal model.
        self.document_attention = False  # with doc_ids, tokens attend only within their document
        self.document_positions = False  # with doc_ids, RoPE positions restart at 0 at each document
        self.checkpoint_blocks = False  # keep each block's input only; recompute the block in backward
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        # Residual-stream outputs are scaled down by depth so the stream's variance stays O(1) (GPT-2).
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None):
        """idx: (B, T) token ids → (logits (B, T, vocab), MoE balance loss (scalar, 0 when dense)).

        targets (B, T): the first result is instead the sum of the tokens' cross-entropies (fp32
        scalar), computed without ever holding the logits (pipeline/model/fused_loss.py).
        doc_ids (B, T): a document number per token (from the store's doc_offsets), used as
        document_attention and document_positions say; ignored when both are off.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if doc_ids is not None and self.document_positions:
            positions = document_positions(doc_ids)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        mask = document_mask(doc_ids) if doc_ids is not None and self.document_attention else None

        x = self.embed_tokens(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # Keep only the block's input; its activations are recomputed during backward.
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        x = self.norm(x)
        moe_losses = (layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoE))
        aux = sum(moe_losses, torch.zeros((), device=idx.device))
        aux = aux * self.config.aux_loss_coef
        if targets is not None:
            return linear_cross_entropy(x.view(B * T, -1), self.embed_tokens.weight, targets.reshape(B * T)), aux
        logits = F.linear(x, self.embed_tokens.weight)  # tied output head: (B, T, V)
        if cache is not None:
            cache.pos += T
        return logits, aux

    @torch.no_grad()
    def generate_next(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position after feeding idx (B, T) through the cache: (B, vocab)."""
        logits, _ = self(idx, cache)
        return logits[:, -1, :].float()
