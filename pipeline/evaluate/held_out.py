"""`mm eval`: validation loss, perplexity and bits per byte of a checkpoint or an export.

Loads the model (pipeline/export/loading.py), checks it was trained with the
store's tokenizer, and scores the val split with the scorer training uses
(pipeline/evaluate/scoring.py): stream windows, or each document on its own with
`per_document`.
"""

from __future__ import annotations

import math

from pipeline.errors import UserError
from pipeline.evaluate.scoring import score_tokens, token_byte_lengths

# ---------------------------------------------------------------------------
# `mm eval`
# ---------------------------------------------------------------------------


def evaluate_model(model_path, store_path, seq_len: int, batches: int, batch_size: int, device: str | None = None,
                   per_document: bool = False) -> dict:
    """`mm eval`: load a checkpoint or export, check it matches the store's tokenizer, score the val split.

    `batches` × `batch_size` windows (0 = all). `device`: None/"auto", "cpu" or "cuda"
    (`hardware.pick_device`; anything else is a UserError)."""
    from pipeline.data.store.reader import open_store
    from pipeline.export.loading import load_model
    from pipeline.hardware import pick_device

    if seq_len < 1 or batch_size < 1 or batches < 0:
        raise UserError("eval: seq_len and batch_size must be positive, batches >= 0")
    device = pick_device(device, local_rank=0)
    store = open_store(store_path)
    loaded = load_model(model_path, device=device)
    model_vocab = loaded.model.config.vocab_size
    if seq_len > loaded.model.config.max_seq_len:
        raise UserError(f"eval: seq_len {seq_len} exceeds the model's context ({loaded.model.config.max_seq_len})")
    if store.vocab_size > model_vocab:
        raise UserError(f"{store_path}: store vocabulary ({store.vocab_size}) is larger than the model's "
                        f"({model_vocab}): different tokenizer")
    trained_on = (loaded.meta.get("data") or {}).get("tokenizer_sha256")
    if trained_on and trained_on != store.tokenizer_fingerprint:
        raise UserError(f"{store_path}: tokenized with a different tokenizer than {model_path} was trained on "
                        "(tokenizer fingerprint differs)")
    val = store.val
    if len(val.tokens) < seq_len + 1 and not per_document:
        raise UserError(f"{store_path} val/tokens: {len(val.tokens)} tokens, fewer than one window of "
                        f"seq_len + 1 = {seq_len + 1} (lower --seq-len)")
    score = score_tokens(loaded.model, val.tokens, seq_len, batches * batch_size, batch_size, device,
                         byte_lengths=token_byte_lengths(loaded.tokenizer, model_vocab),
                         doc_offsets=val.doc_offsets if per_document else None, source=store_path)
    if not score.tokens:
        raise UserError(f"{store_path} val: no document has two tokens to score")
    result = {
        "val_loss": score.loss,
        "perplexity": math.exp(score.loss),
        "bits_per_byte": score.bits_per_byte,
        "tokens": score.tokens,
        "bytes": score.bytes,
        "bytes_per_token": score.bytes / score.tokens,
        "windows": score.windows,
        "seq_len": seq_len,
        "mode": "per-document" if per_document else "stream",
        "model": str(model_path),
        "data": str(store_path),
    }
    train_val = (loaded.meta.get("metrics") or {}).get("val_loss")
    if isinstance(train_val, (int, float)):
        result["train_val_loss"] = float(train_val)
    return result
