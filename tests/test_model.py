"""The model's own pieces against torch's reference implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.architecture import build_config
from pipeline.model import KVCache, Transformer, causal_attention_cpu, use_matmul_attention


@pytest.mark.parametrize("heads, kv_heads, T", [(8, 2, 37), (4, 4, 16), (6, 1, 9), (4, 2, 1)])
def test_cpu_attention_matches_sdpa(heads, kv_heads, T):
    """Values and gradients equal SDPA's causal GQA (query head h uses KV head h // group)."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, T, 16, requires_grad=True)
    # A transposed view, as in the model: the function must not assume contiguity.
    k = torch.randn(2, T, kv_heads, 16).transpose(1, 2).requires_grad_()
    v = torch.randn(2, kv_heads, T, 16, requires_grad=True)
    g = torch.randn(2, heads, T, 16)

    ours = causal_attention_cpu(q, k, v)
    (ours * g).sum().backward()
    our_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    (ref * g).sum().backward()

    assert torch.allclose(ours, ref, atol=1e-5)
    for mine, t in zip(our_grads, (q, k, v)):
        assert torch.allclose(mine, t.grad, atol=1e-5)

    # In bf16 the scores are rounded before the softmax (as transformers' eager attention):
    # close to the fp32 result, within bf16's few parts in a thousand.
    half = causal_attention_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    assert (half - ref).abs().max() < 0.05


def test_matmul_attention_only_where_it_is_faster():
    cpu_half = torch.zeros(4, 8, 512, 64, dtype=torch.bfloat16)
    assert use_matmul_attention(cpu_half)
    assert not use_matmul_attention(cpu_half.float())  # fp32: the flash kernel is faster
    assert not use_matmul_attention(torch.zeros(16, 8, 2048, 64, dtype=torch.bfloat16))  # scores too large


def test_both_attention_paths_give_the_same_logits():
    """bf16 forward without a cache (matmul attention) vs through a KV cache (SDPA with a mask)."""
    torch.manual_seed(0)
    model = Transformer(build_config("tiny", 512, {"dim": 64, "n_layers": 2})).to(torch.bfloat16)
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        plain, _ = model(idx)
        cached, _ = model(idx, KVCache(model.config, 2, 24, "cpu", torch.bfloat16))
    assert (plain.float() - cached.float()).abs().max() < 0.1
    assert (plain.float().argmax(-1) == cached.float().argmax(-1)).float().mean() > 0.95
