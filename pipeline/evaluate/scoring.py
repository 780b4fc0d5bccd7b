"""The one scorer: summed next-token cross-entropy over fixed windows of a token view.

Training's validation (pipeline/train/loop.py), per-source validation and `mm eval`
(pipeline/evaluate/held_out.py) all go through `score_tokens`, so they share one
window rule and one cross-entropy helper (`token_nll_sum`; training's loss is
the same sum, fused with the output head inside the model):

- Windows (the stream view). Window i is tokens[i·T : i·T + T + 1]
  (T = seq_len): inputs its first T tokens, targets its last T, the layout
  training reads. `count` windows are scored, evenly spread over the split
  (`sampler.eval_windows`; count 0 or ≥ the number of windows = all of them,
  and then every token after the first is a target exactly once). No
  sampling: the same numbers at every evaluation.
- Per document (`per_document`). Each
  document is scored on its own: its pieces of at most T + 1 tokens never
  cross into another document, positions start at 0 in each, and no earlier
  text is seen. Every target of a document is scored once (a document longer
  than T + 1 tokens is cut into consecutive pieces, each starting afresh).
  The same spreading rule picks `count` pieces. This puts models trained
  with and without document masking on the same footing.

- Documents. The split's `doc_offsets` say where documents start (never the
  token values: text may hold `<|im_start|>`, and some tokenizers' BOS is
  their EOS). Stream windows hand the model each token's document number
  (`sampler.document_ids`, as training's batches do); a model trained with
  document attention or positions uses it, a causal one ignores it.

Bits per byte = (Σ nats over the scored targets / ln 2) / (UTF-8 bytes those
targets stand for). Each token's byte count is the UTF-8 length of the text it
decodes to (`token_byte_lengths`); the BOS and EOS the store puts around each
document (found by position in doc_offsets) stand for 0 bytes, though their
loss is counted: predicting where a document ends is part of modelling it. A
special token anywhere else came from the document's text (the tokenizer
maps the string `<|im_start|>` in text to its id) and counts that string's
bytes. So bytes == the UTF-8 length of the scored text, and
bits_per_byte == loss · tokens / (ln 2 · bytes). Unlike loss per token, it
compares models with different tokenizers.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.sampler import document_ids, eval_windows
from pipeline.data.store.guard import check_token_ids

IGNORE = -100
"""Target id that scores nothing (padding of per-document pieces); F.cross_entropy's default."""


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ next-token cross-entropy in nats over every target (IGNORE excluded), computed in fp32.

    The one cross-entropy of validation and `mm eval`; training computes the same sum without
    materialising the logits (pipeline/model/transformer.py, LinearCrossEntropy)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# ---------------------------------------------------------------------------
# Bytes per token
# ---------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the character byte-level BPE uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
"""SentencePiece's byte-fallback tokens: one raw byte each."""


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes of the text each token id decodes to (0 for unused ids).

    Byte-level BPE (a ByteLevel decoder): one vocabulary character per byte. Otherwise
    (SentencePiece style, Metaspace): `<0xHH>` is one byte and `▁` is a space. Decoding a token
    alone would not do: the decoder strips a leading space and turns a lone byte into U+FFFD.
    Special tokens count the bytes of their string, which is what they stand for inside a text;
    the scorer gives the store's own BOS/EOS 0 bytes by position."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    byte_level = "ByteLevel" in _component_types(json.loads(tokenizer.to_str()).get("decoder"))
    byte_of = _byte_decoder()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size:
            continue
        if token in special:
            lengths[i] = len(token.encode("utf-8"))
        elif byte_level and all(c in byte_of for c in token):
            lengths[i] = len(token)
        elif BYTE_FALLBACK.fullmatch(token):
            lengths[i] = 1
        else:
            lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def _component_types(node) -> set[str]:
    """Every "type" in a tokenizer.json component (a decoder Sequence nests others)."""
    if isinstance(node, dict):
        return {node.get("type")} | {t for v in node.values() for t in _component_types(v)}
    if isinstance(node, list):
        return {t for v in node for t in _component_types(v)}
    return set()


# ---------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------


@dataclass
class Score:
    nats: float
    """Σ cross-entropy over the scored targets."""
    tokens: int
    """Targets scored."""
    bytes: int
    """UTF-8 bytes those targets stand for (0 when no byte lengths were given)."""
    windows: int
    """Windows (or per-document pieces) scored."""

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")


def stream_spans(n_tokens: int, seq_len: int) -> np.ndarray:
    """(start, end) of every stream window: [i·T, i·T + T + 1)."""
    starts = np.arange((n_tokens - 1) // seq_len, dtype=np.int64) * seq_len
    return np.stack([starts, starts + seq_len + 1], axis=1)


def document_spans(doc_offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """(start, end) of the per-document pieces: each document cut into pieces of at most
    seq_len + 1 tokens that share one boundary token, so each target is scored once."""
    spans = []
    for start, end in zip(doc_offsets[:-1].tolist(), doc_offsets[1:].tolist(), strict=True):
        for s in range(start, end - 1, seq_len):
            spans.append((s, min(s + seq_len + 1, end)))
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


@torch.no_grad()
def score_tokens(model, tokens, seq_len: int, count: int = 0, batch_size: int = 8, device="cpu",
                 byte_lengths: np.ndarray | None = None, doc_offsets=None, per_document: bool = False,
                 autocast=None, source="the token store") -> Score:
    """Score a token view (anything 1-D that slices to numpy: a split, a source, a part).

    `doc_offsets`: the view's document offsets: where documents start, for the document numbers
    the model gets (a model trained with document attention or positions uses them: validation
    sees what training saw), for per-document pieces, and for the store's BOS/EOS, which count 0
    bytes. Without them the view is one document. Stream windows by default; one piece per document
    (or document part) with `per_document`. `count` pieces evenly spread (0 = all). `autocast`: a
    context the forward runs in (training's precision); None = the model's own dtype. `source`
    names the store when a token id is not below the model's vocab_size (checked per batch, before
    any indexing). Leaves the model in eval mode."""
    if per_document:
        spans = document_spans(np.asarray(doc_offsets), seq_len)
    else:
        spans = stream_spans(len(tokens), seq_len)
    picked = spans[eval_windows(len(spans), count or len(spans))]
    nats, n_tokens, n_bytes = 0.0, 0, 0
    model.eval()
    for first in range(0, len(picked), batch_size):
        rows = picked[first : first + batch_size]
        x, y = _batch(tokens, rows, seq_len)
        check_token_ids(x, y, model.config.vocab_size, source, "an evaluation batch")
        valid = y != IGNORE
        if byte_lengths is not None:
            counted = valid & ~torch.from_numpy(_store_boundaries(doc_offsets, rows, y.shape[1]))
            n_bytes += int(byte_lengths[y[counted].numpy()].sum())
        doc_ids = None  # a per-document piece is one document, from position 0
        if doc_offsets is not None and not per_document:
            doc_ids = torch.from_numpy(document_ids(doc_offsets, rows[:, 0], x.shape[1])).to(device)
        x = x.to(device)
        with autocast or nullcontext():
            logits, _ = model(x, doc_ids=doc_ids) if doc_ids is not None else model(x)
        nats += float(token_nll_sum(logits, y.to(device)))
        n_tokens += int(valid.sum())
    return Score(nats=nats, tokens=n_tokens, bytes=n_bytes, windows=len(picked))


def _store_boundaries(doc_offsets, spans: np.ndarray, width: int) -> np.ndarray:
    """(len(spans), width) bool: which targets are the BOS or EOS the store put around a document
    (a target at position p is a BOS when a document starts at p, an EOS when one starts at p + 1),
    as opposed to a special token that came from the text. Found by position, so it holds for a
    tokenizer whose BOS is its EOS too."""
    out = np.zeros((len(spans), width), dtype=bool)
    if doc_offsets is None:
        return out
    n = len(doc_offsets)
    for row, (start, end) in enumerate(spans.tolist()):
        lo = bisect.bisect_left(doc_offsets, start + 1, 0, n)
        hi = bisect.bisect_right(doc_offsets, end, lo, n)
        starts = np.fromiter((doc_offsets[j] for j in range(lo, hi)), np.int64, hi - lo)
        positions = np.arange(start + 1, end, dtype=np.int64)
        out[row, : len(positions)] = np.isin(positions, starts) | np.isin(positions + 1, starts)
    return out


def _batch(tokens, spans: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of these spans; shorter spans are padded at the end (inputs with
    their last token, targets with IGNORE), which a causal model never looks back at."""
    width = int((spans[:, 1] - spans[:, 0]).max()) - 1
    x = np.empty((len(spans), width), dtype=np.int64)
    y = np.full((len(spans), width), IGNORE, dtype=np.int64)
    for row, (start, end) in enumerate(spans.tolist()):
        piece = np.asarray(tokens[start:end]).astype(np.int64)
        n = len(piece) - 1
        x[row, :n], x[row, n:] = piece[:-1], piece[-2]
        y[row, :n] = piece[1:]
    return torch.from_numpy(x), torch.from_numpy(y)
