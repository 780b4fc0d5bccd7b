"""Grouped-query attention as batched matmuls, for the CPU in half precision.

On a CPU in bf16/fp16, when the score tensor is small, torch's flash kernel is
the slower choice; the same math as three batched matmuls runs at matmul speed
(AMX). `use_matmul_attention` is the whole rule for when the model takes this
path; tests/test_model.py pins both kernels to SDPA. Pure torch, like the model.
"""

from __future__ import annotations

import torch

# Largest B·H·Tq·Tk score tensor worth materialising (kept for backward: 64 MiB per layer
# in bf16); beyond it the flash kernel's O(T) memory wins. Batch 4 × 8 heads × 512² = 8M.
CPU_MATMUL_ATTENTION_MAX_SCORES = 2**25


def use_matmul_attention(q, keys: int | None = None) -> bool:
    """Half precision on a CPU with small scores: there torch's CPU flash kernel is the slower
    choice (34 % of a minimind2-small step for 14 % of its FLOPs; docs/training.md). In fp32
    the flash kernel is faster, and on GPUs SDPA's kernels are the ones to use."""
    B, H, T, _ = q.shape
    scores = B * H * T * (keys or T)
    half = q.dtype in (torch.bfloat16, torch.float16)
    # Not inside torch.compile: torch 2.13's inductor turns this path's backward into non-finite
    # gradients of k (and all that feeds it) when head_dim is 64, e.g. minimind2-small in bf16;
    # compiled SDPA is exact there (tests/test_model.py compiles a one-block model of that shape).
    compiling = torch.compiler.is_compiling()
    return q.device.type == "cpu" and half and scores <= CPU_MATMUL_ATTENTION_MAX_SCORES and not compiling


def causal_attention_cpu(q, k, v):
    """Causal grouped-query attention as three batched matmuls: q (B, H, T, hd), k, v (B, KV, T, hd).

    The matmuls run at matmul speed (AMX), and the causal mask rides along as
    the additive input of baddbmm. Each KV head's query heads are stacked along
    the rows, so K and V are never repeated (query head h uses KV head h // G,
    as SDPA's enable_gqa). tests/test_model.py pins it to SDPA.
    """
    B, H, T, hd = q.shape
    KV = k.size(1)
    group = H // KV
    mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1).repeat(group, 1)  # (G·T, T)
    scores = torch.baddbmm(mask, q.reshape(B * KV, group * T, hd), k.reshape(B * KV, T, hd).transpose(1, 2),
                           alpha=hd**-0.5)  # (B·KV, G·T, T)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(B * KV, T, hd)).view(B, H, T, hd)


def masked_attention_cpu(q, k, v, bias):
    """The same matmuls under a per-row mask: q (B, H, Tq, hd), k, v (B, KV, Tk, hd), bias the
    additive mask laid out like the scores, (B·KV, G·Tq, Tk) (DocumentMask.bias builds it)."""
    B, H, Tq, hd = q.shape
    KV, Tk = k.size(1), k.size(2)
    scores = torch.baddbmm(bias, q.reshape(B * KV, H // KV * Tq, hd), k.reshape(B * KV, Tk, hd).transpose(1, 2),
                           alpha=hd**-0.5)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(B * KV, Tk, hd)).view(B, H, Tq, hd)
