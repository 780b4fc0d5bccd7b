"""`mm eval`: validation loss, perplexity and bits per byte of a checkpoint or an export.

Loads the model (pipeline/export/loading.py), checks it was trained with the
store's tokenizer, and scores the val split of every source it reads with the
scorer training uses (pipeline/evaluate/scoring.py): stream windows, or each
document on its own with `per_document`. The sources are training's
(`pipeline.data.sources.pick_sources`): data.sources, or while that is the
shipped default the store's own. Each source gets batches × batch_size
windows; the mix is what training's validation reports: the weight-averaged
loss per token, and bits per byte = that loss / (ln 2 · the weight-averaged
bytes per token), so one source scores exactly as before.
"""

from __future__ import annotations

import math

from pipeline.errors import UserError
from pipeline.evaluate.scoring import Score, score_tokens, token_byte_lengths

# ---------------------------------------------------------------------------
# `mm eval`
# ---------------------------------------------------------------------------


def evaluate_model(model_path, store_path, seq_len: int, batches: int, batch_size: int, device: str | None = None,
                   per_document: bool = False, weights: dict[str, float] | None = None, note=None) -> dict:
    """`mm eval`: load a checkpoint or export, check it matches the store's tokenizer, score the val split
    of each source and their weighted mix.

    `batches` × `batch_size` windows per source (0 = all). `weights`: data.sources' (`source_weights`;
    None = every source of the store at weight 1). `note(line)` hears which sources the shipped-default
    rule chose. `device`: None/"auto", "cpu" or "cuda" (`hardware.pick_device`; anything else is a UserError)."""
    from pipeline.data.sources import pick_sources, unread_note
    from pipeline.data.store.reader import open_store
    from pipeline.export.loading import load_model
    from pipeline.hardware import pick_device

    if seq_len < 1 or batch_size < 1 or batches < 0:
        raise UserError("eval: seq_len and batch_size must be positive, batches >= 0")
    device = pick_device(device, local_rank=0)
    in_store = list(open_store(store_path).sources)
    chosen_from = weights if weights is not None else dict.fromkeys(in_store, 1.0)
    chosen, why = pick_sources(chosen_from, in_store)
    if why and note is not None:
        note(why)
    if not chosen:
        raise UserError("data.sources: every weight is 0; at least one source must have a positive weight")
    store = open_store(store_path, sources=list(chosen))
    unread = "" if why else unread_note(store.path, store.ignored, chosen_from)
    if unread and note is not None:
        note(unread)
    loaded = load_model(model_path, device=device)
    _check_match(loaded, model_path, store, store_path, seq_len)
    # A checkpoint trained with document attention or positions is scored that way, as training's
    # validation scores it; an export is the plain causal model transformers runs.
    train = loaded.meta.get("train") or {}
    loaded.model.document_attention = train.get("attention") == "document"
    loaded.model.document_positions = train.get("positions") == "document" or (
        train.get("positions", "auto") == "auto" and loaded.model.document_attention)
    byte_lengths = token_byte_lengths(loaded.tokenizer, loaded.model.config.vocab_size)
    scores = {}
    for name, source in store.sources.items():
        val, where = source.val, f"{store_path} ({name})"
        if len(val.tokens) < seq_len + 1 and not per_document:
            raise UserError(f"{where} val/tokens: {len(val.tokens)} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1} (lower --seq-len)")
        scores[name] = score_tokens(loaded.model, val.tokens, seq_len, batches * batch_size, batch_size, device,
                                    byte_lengths=byte_lengths, doc_offsets=val.doc_offsets, per_document=per_document,
                                    source=where)
        if not scores[name].tokens:
            raise UserError(f"{where} val: no document has two tokens to score")
    result = {**_mix(scores, chosen), "seq_len": seq_len, "mode": "per-document" if per_document else "stream",
              "model": str(model_path), "data": str(store_path),
              "by_source": {name: {"weight": chosen[name], **_figures(s)} for name, s in scores.items()}}
    train_val = (loaded.meta.get("metrics") or {}).get("val_loss")
    if isinstance(train_val, (int, float)):
        result["train_val_loss"] = float(train_val)
    return result


def _check_match(loaded, model_path, store, store_path, seq_len: int) -> None:
    """The model reads the store's token ids and fits seq_len; UserErrors name what differs."""
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


def _figures(score: Score) -> dict:
    return {"val_loss": score.loss, "perplexity": math.exp(score.loss), "bits_per_byte": score.bits_per_byte,
            "tokens": score.tokens, "bytes": score.bytes, "bytes_per_token": score.bytes / score.tokens,
            "windows": score.windows}


def _mix(scores: dict[str, Score], weights: dict[str, float]) -> dict:
    """The weighted mix, as training's validation computes it (pipeline/train/run_data.py); tokens,
    bytes and windows are the totals scored."""
    total = sum(weights[n] for n in scores)
    loss = sum(weights[n] * s.loss for n, s in scores.items()) / total
    bytes_per_token = sum(weights[n] * s.bytes / s.tokens for n, s in scores.items()) / total
    return {"val_loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": loss / (math.log(2) * bytes_per_token) if bytes_per_token > 0 else math.nan,
            "tokens": sum(s.tokens for s in scores.values()), "bytes": sum(s.bytes for s in scores.values()),
            "bytes_per_token": bytes_per_token, "windows": sum(s.windows for s in scores.values())}
