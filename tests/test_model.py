"""The model's own pieces against torch's reference implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipeline.model.doc_attention as D
import pipeline.model.fused_loss as L
from pipeline.architecture import build_config
from pipeline.model.cpu_attention import causal_attention_cpu, masked_attention_cpu, use_matmul_attention
from pipeline.model.transformer import KVCache, Transformer


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
    for mine, t in zip(our_grads, (q, k, v), strict=True):
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


def test_compiled_model_gives_finite_gradients_equal_to_eager():
    """torch.compile of a bf16 block with head_dim 64 (minimind2-small's): torch 2.13's inductor made
    the CPU matmul attention's k-gradient non-finite there, so compiled code takes SDPA instead."""
    torch.manual_seed(0)
    config = build_config("tiny", 256, {"dim": 64, "n_layers": 1, "head_dim": 64, "hidden_dim": 128})
    eager = Transformer(config)
    compiled = Transformer(config)
    compiled.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 256, (2, 65))
    losses = []
    for forward in (eager, torch.compile(compiled)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, aux = forward(idx[:, :-1], targets=idx[:, 1:])
        (loss / 128 + aux).backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.isfinite(b.grad).all(), name
        assert (a.grad - b.grad).abs().max() <= 0.05 * a.grad.abs().max() + 1e-6, name


# ---------------------------------------------------------------------------
# Document attention and positions
# ---------------------------------------------------------------------------

BOS = 1


def packed_window(B: int, T: int, vocab: int, n_docs: int, seed: int):
    """Inputs with BOS at a few random places (row 0 starts with one, row 1 opens on a document's tail)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, vocab, (B, T), generator=g)
    for b in range(B):
        idx[b, torch.randperm(T - 1, generator=g)[: n_docs - 1] + 1] = BOS
    idx[0, 0] = BOS
    return idx, torch.randint(3, vocab, (B, T), generator=g), torch.cumsum(idx == BOS, dim=1)


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [1, 1, 1, 1, 2, 2]])
    assert D.document_positions(doc_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("half", [False, True])
def test_masked_attention_matches_sdpa(half):
    """The matmul path under a document mask equals SDPA with the same boolean mask (values, gradients)."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 20, 16, requires_grad=True)
    k = torch.randn(2, 2, 29, 16, requires_grad=True)  # a tile: its keys start 9 tokens before its queries
    v = torch.randn(2, 2, 29, 16, requires_grad=True)
    doc = torch.tensor([[0] * 12 + [1] * 17, [2] * 3 + [3] * 26])
    allowed = (doc[:, 9:, None] == doc[:, None, :]) & (torch.arange(9, 29)[:, None] >= torch.arange(29)[None])
    g = torch.randn(2, 8, 20, 16)
    cast = (lambda t: t.bfloat16()) if half else (lambda t: t)
    bias = D.DocumentMask([(9, 29, 0, allowed)]).bias(0, torch.bfloat16 if half else torch.float32, 2, 4)
    ours = masked_attention_cpu(cast(q), cast(k), cast(v), bias).float()
    (ours * g).sum().backward()
    our_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
    (ref * g).sum().backward()
    tol = 0.05 if half else 1e-5
    assert (ours - ref).abs().max() < tol
    for mine, t in zip(our_grads, (q, k, v), strict=True):
        assert (mine - t.grad).abs().max() < tol * 4


@pytest.mark.parametrize("preset", ["tiny", "minimind3", "minimind2-moe"])  # GQA, QK-norm, MoE
def test_document_attention_equals_each_document_alone(preset, monkeypatch):
    """Per-token losses and gradients of a packed window (document attention and positions) equal those
    of its documents run one by one from position 0, within 1e-5 in fp32; tiles of 16 queries."""
    monkeypatch.setattr(D, "DOCUMENT_TILE", 16)
    torch.manual_seed(0)
    model = Transformer(build_config(preset, 300, {"dim": 64, "n_layers": 2}))
    idx, targets, doc_ids = packed_window(2, 70, 300, n_docs=6, seed=1)

    model.document_attention = model.document_positions = True
    logits, _ = model(idx, doc_ids=doc_ids)
    packed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 70)
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone, total, runs = torch.zeros(2, 70), 0.0, 0
    for b in range(2):
        for d in doc_ids[b].unique():
            span = (doc_ids[b] == d).nonzero().squeeze(1)
            lo, hi = span[0].item(), span[-1].item() + 1
            logits, _ = model(idx[b : b + 1, lo:hi])  # no doc_ids: plain causal from position 0
            losses = F.cross_entropy(logits[0], targets[b, lo:hi], reduction="none")
            alone[b, lo:hi] = losses.detach()
            total, runs = total + losses.sum(), runs + 1
    total.backward()
    assert runs >= 10
    assert (packed.detach() - alone).abs().max() < 1e-5
    for name, p in model.named_parameters():
        assert (packed_grads[name] - p.grad).abs().max() < 1e-5, name


def test_document_attention_differs_from_causal_and_skips_keys():
    """The mask and the positions matter, except together: RoPE sees only distances, which the
    restart leaves unchanged inside a document. Each tile's keys start at its first query's document."""
    torch.manual_seed(0)
    model = Transformer(build_config("tiny", 300, {"dim": 64, "n_layers": 2}))
    idx, targets, doc_ids = packed_window(2, 64, 300, n_docs=8, seed=2)
    losses = {}
    with torch.no_grad():
        for attention, positions in [(False, False), (False, True), (True, False), (True, True)]:
            model.document_attention, model.document_positions = attention, positions
            losses[attention, positions] = model(idx, targets=targets, doc_ids=doc_ids)[0].item()
    assert abs(losses[False, False] - losses[False, True]) > 1e-3
    assert abs(losses[False, False] - losses[True, False]) > 1e-1
    assert abs(losses[True, False] - losses[True, True]) < 1e-4

    # Row 0: documents start at 0, 10, 30 and 40; row 1 at 0 and 37. A tile serves both rows.
    doc_ids = torch.tensor([[0] * 10 + [1] * 20 + [2] * 10 + [3] * 24, [0] * 37 + [1] * 27])
    mask = D.document_mask(doc_ids, tile=16)
    assert [(q0, q1, k0) for q0, q1, k0, _ in mask.tiles] == [(0, 16, 0), (16, 32, 0), (32, 48, 0), (48, 64, 37)]
    q0, q1, k0, allowed = mask.tiles[3]
    assert allowed.shape == (2, 16, 27)
    assert allowed[0, 0].tolist() == [False] * 3 + [True] * 9 + [False] * 15  # query 48 sees keys 40..48 of row 0


# ---------------------------------------------------------------------------
# The loss and activation checkpointing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_matches_full_logits(dtype, monkeypatch):
    """Summed cross-entropy and gradients through LinearCrossEntropy, 7 rows per chunk, equal
    F.cross_entropy over the full fp32 logits (ignored targets too): 1e-5 relative in fp32,
    bf16's rounding under autocast."""
    monkeypatch.setattr(L, "LOSS_CHUNK_ELEMENTS", 5000 * 7)
    torch.manual_seed(0)
    model = Transformer(build_config("tiny", 5000, {"dim": 64, "n_layers": 2}))
    idx, targets = torch.randint(0, 5000, (3, 40)), torch.randint(0, 5000, (3, 40))
    targets[1, 5:9] = L.IGNORE_INDEX  # padding scores nothing, as in F.cross_entropy
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    with autocast:
        logits, _ = model(idx)
    full = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with autocast:
        chunked, _ = model(idx, targets=targets)
    chunked.backward()

    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - full.item()) <= 1e-5 * full.item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, p in model.named_parameters():
        scale = full_grads[name].abs().max()
        assert (full_grads[name] - p.grad).abs().max() <= tol * scale, name


def test_fp16_loss_gradient_is_formed_in_fp32():
    """Under fp16 autocast the fused loss's gradients are the fp32 gradients of the logits it computed.
    They are formed before a GradScaler's scale reaches them: in fp16 the many probabilities below fp16's
    smallest normal (6e-5) would flush and every product round to 11 bits (~5e-4 relative)."""
    torch.manual_seed(0)
    N, C, V = 64, 32, 4000
    x = (torch.randn(N, C) * 0.5).requires_grad_()  # logits spread over ~±15: most probabilities tiny
    weight = torch.randn(V, C).requires_grad_()
    targets = torch.randint(0, V, (N,))
    scale = 2.0**16 / N  # what a GradScaler's scale times the per-token mean sends back
    with torch.autocast("cpu", dtype=torch.float16):
        loss = L.linear_cross_entropy(x, weight, targets)
    (loss * scale).backward()

    # The reference: the same fp16 logits, everything after them in float64.
    x16, w16 = x.detach().half(), weight.detach().half()
    d = (x16 @ w16.t()).double().softmax(-1)
    d[torch.arange(N), targets] -= 1.0
    assert loss.item() == pytest.approx(F.cross_entropy((x16 @ w16.t()).double(), targets, reduction="sum").item(),
                                        rel=1e-6)
    for got, ref in ((x.grad, d @ w16.double() * scale), (weight.grad, d.t() @ x16.double() * scale)):
        assert got.dtype == torch.float32
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_activation_checkpointing_gives_identical_gradients():
    """Blocks recomputed in backward: the same loss and bit-identical gradients in fp32, with and
    without document attention (the mask travels through torch.utils.checkpoint)."""
    torch.manual_seed(0)
    model = Transformer(build_config("minimind2-moe", 300, {"dim": 64, "n_layers": 2}))
    idx, targets, doc_ids = packed_window(2, 40, 300, n_docs=4, seed=3)
    for documents in (False, True):
        model.document_attention = model.document_positions = documents
        results = []
        for checkpointing in (False, True):
            model.checkpoint_blocks = checkpointing
            model.zero_grad()
            loss, aux = model(idx, targets=targets, doc_ids=doc_ids)
            (loss + aux).backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        assert results[0][0] == results[1][0]
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
