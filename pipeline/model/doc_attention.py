"""Document attention: in a window of packed documents, a token attends only to earlier tokens
of its own document, and RoPE positions may restart at each document.

The model builds one `DocumentMask` per forward from doc_ids (B, T), a
document number per token, and every layer's attention uses it: FlexAttention's
block mask on CUDA (its CPU kernel has no backward); on a CPU, tiles of
DOCUMENT_TILE queries whose keys start at the document of the tile's first
query, so the part of the causal triangle between documents is never computed.
Pure torch, like the model (docs/training.md measures the kernels and the tile).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.model.cpu_attention import masked_attention_cpu, use_matmul_attention


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 wherever doc_ids (B, T) changes: (B, T) int64."""
    t = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


# Query rows per tile of document attention without FlexAttention. A tile's keys start at the
# document of its first query, so when documents are shorter than the window most of the causal
# triangle is never computed (docs/training.md measures the tile size).
DOCUMENT_TILE = 256


@dataclass
class DocumentMask:
    """Where tokens may attend when each attends only to earlier tokens of its own document.

    Built once per forward from doc_ids (B, T), a document number per token, and
    shared by the layers: either FlexAttention's BlockMask (CUDA), or tiles of
    queries (first, end, first key, allowed (B, end - first, end - first key) bool).
    """

    tiles: list[tuple[int, int, int, torch.Tensor]]
    block_mask: object = None
    biases: dict = field(default_factory=dict)

    def bias(self, tile: int, dtype, kv_heads: int, group: int) -> torch.Tensor:
        """Tile's additive mask (0 / -inf) laid out like masked_attention_cpu's scores; made once per forward."""
        key = (tile, dtype, kv_heads, group)
        if key not in self.biases:
            allowed = self.tiles[tile][3]
            B, Tq, Tk = allowed.shape
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
            expanded = bias[:, None, None].expand(B, kv_heads, group, Tq, Tk)
            self.biases[key] = expanded.reshape(B * kv_heads, group * Tq, Tk)
        return self.biases[key]


def document_mask(doc_ids: torch.Tensor, tile: int | None = None) -> DocumentMask:
    """The mask of doc_ids (B, T); tile: query rows per tile on a CPU (None: DOCUMENT_TILE, read at
    call time so that a benchmark or test can set it)."""
    B, T = doc_ids.shape
    if doc_ids.device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask  # CUDA only: CPU flex has no backward

        def same_document_causal(b, h, q, k):
            return (k <= q) & (doc_ids[b, q] == doc_ids[b, k])

        return DocumentMask([], create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device))
    tile = tile or DOCUMENT_TILE
    t = torch.arange(T, device=doc_ids.device)
    doc_starts = t - document_positions(doc_ids)  # (B, T): first token of each token's document
    first_keys = doc_starts[:, ::tile].amin(dim=0).tolist()  # documents are contiguous: the tile's first query decides
    tiles = []
    for q0, k0 in zip(range(0, T, tile), first_keys, strict=True):
        q1 = min(q0 + tile, T)
        allowed = (doc_ids[:, q0:q1, None] == doc_ids[:, None, k0:q1]) & (t[q0:q1, None] >= t[None, k0:q1])
        tiles.append((q0, q1, k0, allowed))
    return DocumentMask(tiles)


_compiled_flex_attention = None


def document_attention(q, k, v, mask: DocumentMask):
    """Grouped-query attention within documents: q (B, H, T, hd), k, v (B, KV, T, hd)."""
    gqa = q.size(1) != k.size(1)
    if mask.block_mask is not None:
        global _compiled_flex_attention
        if _compiled_flex_attention is None:  # compiled once: uncompiled, flex is a slow reference
            from torch.nn.attention.flex_attention import flex_attention
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    out = []
    for i, (q0, q1, k0, allowed) in enumerate(mask.tiles):
        qt, kt, vt = q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1]
        if use_matmul_attention(qt, q1 - k0):
            out.append(masked_attention_cpu(qt, kt, vt, mask.bias(i, q.dtype, k.size(1), q.size(1) // k.size(1))))
        else:
            out.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed[:, None], enable_gqa=gqa))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]
