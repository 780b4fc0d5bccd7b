"""Validation loss, perplexity and bits per byte on the val split of a token store.

Windows: window i is val_tokens[i·T : i·T + T + 1] (T = seq_len), inputs its
first T tokens, targets its last T. Consecutive windows share one boundary
token, so every val token after the first is a target exactly once and the
order is fixed: no sampling, the same numbers every run. `batches` ×
`batch_size` windows are scored from the start (batches 0 = all of them).

Bits per byte = (Σ nats over the scored targets / ln 2) / (UTF-8 bytes those
targets stand for). Each token's byte count comes from its byte-level BPE
string (special tokens — BOS/EOS — stand for 0 bytes of text but their loss
is counted: predicting where a document ends is part of modelling it), so
bits_per_byte == val_loss · tokens / (ln 2 · bytes) exactly. Unlike loss per
token, it compares models with different tokenizers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the character byte-level BPE uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens and unused ids)."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    byte_of = _byte_decoder()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size or token in special:
            continue
        if all(c in byte_of for c in token):
            lengths[i] = len(token)  # byte-level: one character per byte
        else:  # not a byte-level vocabulary: count the decoded text
            lengths[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths


@torch.no_grad()
def evaluate_tokens(model, tokens, byte_lengths: np.ndarray, seq_len: int, batches: int, batch_size: int,
                    device="cpu", source: str = "val split") -> dict:
    """Score non-overlapping windows of seq_len + 1 over `tokens` (anything sliceable to numpy)."""
    if seq_len < 1 or batch_size < 1 or batches < 0:
        raise UserError("eval: seq_len and batch_size must be positive, batches >= 0")
    if seq_len > model.config.max_seq_len:
        raise UserError(f"eval: seq_len {seq_len} exceeds the model's context ({model.config.max_seq_len})")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise UserError(f"{source}: {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1} (lower --seq-len)")
    if batches:
        n_windows = min(n_windows, batches * batch_size)

    from pipeline.sampler import WindowSampler

    windows = WindowSampler(tokens, seq_len, seed=0)  # the training window layout; read in order, no permutation
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    model.eval()
    for first in range(0, n_windows, batch_size):
        x, y = windows.batch(np.arange(first, min(first + batch_size, n_windows)))  # (B, T) each
        total_bytes += int(byte_lengths[y.numpy()].sum())
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total_nats += float(nats)
        total_tokens += y.numel()

    loss = total_nats / total_tokens
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / math.log(2) / total_bytes if total_bytes else float("nan"),
        "tokens": total_tokens,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / total_tokens,
        "windows": n_windows,
        "seq_len": seq_len,
    }


def evaluate_model(model_path, store_path, seq_len: int, batches: int, batch_size: int, device: str | None = None) -> dict:
    """`mm eval`: load a checkpoint or export, check it matches the store's tokenizer, score the val split.

    `device`: None/"auto", "cpu" or "cuda" (`hardware.pick_device`; anything else is a UserError)."""
    from pipeline.model_loading import load_model
    from pipeline.hardware import pick_device
    from pipeline.token_store import open_store

    device = pick_device(device, local_rank=0)
    store = open_store(store_path)
    loaded = load_model(model_path, device=device)
    model_vocab = loaded.model.config.vocab_size
    if store.vocab_size > model_vocab:
        raise UserError(f"{store_path}: store vocabulary ({store.vocab_size}) is larger than the model's ({model_vocab}): different tokenizer")
    trained_on = (loaded.meta.get("data") or {}).get("tokenizer_sha256")
    if trained_on and trained_on != store.tokenizer_fingerprint:
        raise UserError(f"{store_path}: tokenized with a different tokenizer than {model_path} was trained on (tokenizer fingerprint differs)")
    lengths = token_byte_lengths(loaded.tokenizer, model_vocab)
    result = evaluate_tokens(loaded.model, store.val.tokens, lengths, seq_len, batches, batch_size, device,
                             source=f"{store_path} val/tokens")
    result.update(model=str(model_path), data=str(store_path))
    train_val = (loaded.meta.get("metrics") or {}).get("val_loss")
    if isinstance(train_val, (int, float)):
        result["train_val_loss"] = float(train_val)
    return result
