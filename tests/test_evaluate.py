"""The one scorer (pipeline/evaluate/scoring.py) and `mm eval`: stream windows and per-document scoring.

A tiny random-init model on the shared `tiny_store` val split; the scorer's
sums are checked against the model run by hand, window by window and
document by document.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluate.scoring import IGNORE, document_spans, score_tokens, stream_spans, token_nll_sum


@pytest.fixture(scope="module")
def model_and_val(tiny_store):
    from pipeline.architecture import build_config
    from pipeline.data.store.reader import open_store
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.transformer import Transformer

    _, info = load_tokenizer(tiny_store.tokenizer)
    config = build_config("tiny", info["vocab_size"], {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                       "max_seq_len": 256})
    torch.manual_seed(0)
    return Transformer(config).eval(), open_store(tiny_store.store).val


def _nll(model, ids) -> float:
    x = torch.tensor(np.asarray(ids[:-1], dtype=np.int64))[None]
    y = torch.tensor(np.asarray(ids[1:], dtype=np.int64))[None]
    with torch.no_grad():
        return float(token_nll_sum(model(x)[0], y))


def test_token_nll_sum_is_summed_cross_entropy_and_skips_ignored():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    expected = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
    assert float(token_nll_sum(logits, y)) == pytest.approx(float(expected), rel=1e-6)
    y2 = y.clone()
    y2[1, 3:] = IGNORE
    kept = -torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    assert float(token_nll_sum(logits, y2)) == pytest.approx(float(kept.sum() - kept[1, 3:].sum()), rel=1e-6)


def test_stream_windows_are_the_training_layout_and_all_means_every_target_once(model_and_val):
    model, val = model_and_val
    tokens = np.asarray(val.tokens[:1 + 5 * 32])
    spans = stream_spans(len(tokens), 32)
    assert spans.tolist() == [[i * 32, i * 32 + 33] for i in range(5)]
    score = score_tokens(model, tokens, 32, count=0, batch_size=2)
    assert score.windows == 5 and score.tokens == 5 * 32
    by_hand = sum(_nll(model, tokens[a:b]) for a, b in spans.tolist())
    assert score.nats == pytest.approx(by_hand, rel=1e-5)
    # `count` picks windows spread evenly, first and last included.
    assert score_tokens(model, tokens, 32, count=2, batch_size=2).nats == pytest.approx(
        _nll(model, tokens[0:33]) + _nll(model, tokens[128:161]), rel=1e-5)


def test_per_document_scores_each_document_alone_from_position_zero(model_and_val):
    model, val = model_and_val
    offsets = np.asarray(val.doc_offsets)
    # Six consecutive short documents (some longer than one piece of seq_len + 1 tokens).
    lengths = np.diff(offsets)
    first = next(d for d in range(len(lengths) - 6) if lengths[d : d + 6].max() < 120 and lengths[d : d + 6].max() > 40)
    few = offsets[first : first + 7] - offsets[first]
    tokens = np.asarray(val.tokens[offsets[first] : offsets[first + 6]])
    seq_len = 32
    spans = document_spans(few, seq_len)
    # Pieces never cross a document boundary and cover every target of each document once.
    for d in range(6):
        inside = [(a, b) for a, b in spans.tolist() if few[d] <= a < few[d + 1]]
        assert all(b <= few[d + 1] for _, b in inside)
        assert sum(b - a - 1 for a, b in inside) == few[d + 1] - few[d] - 1
    score = score_tokens(model, tokens, seq_len, count=0, batch_size=3, doc_offsets=few)
    by_hand = sum(_nll(model, tokens[a:b]) for a, b in spans.tolist())
    assert score.tokens == int((few[1:] - few[:-1] - 1).sum())
    assert score.nats == pytest.approx(by_hand, rel=1e-5)
    # Padding inside a batch changes nothing: one piece per batch gives the same sum.
    one_by_one = score_tokens(model, tokens, seq_len, batch_size=1, doc_offsets=few)
    assert one_by_one.nats == pytest.approx(score.nats, rel=1e-5)
    # The stream view of the same tokens sees across documents: a different number.
    stream = score_tokens(model, tokens, seq_len, batch_size=3)
    assert not math.isclose(stream.nats / stream.tokens, score.loss, rel_tol=1e-6)


def test_mm_eval_per_document(tiny_store, tmp_path):
    import json

    from conftest import mm
    from test_export import make_state

    from pipeline.checkpoint.format import save_checkpoint

    save_checkpoint(make_state(tiny_store.tokenizer, "tiny", {}), tmp_path / "run", keep_last=1)
    out = tmp_path / "eval.json"
    r = mm("eval", tmp_path / "run" / "ckpt.pth", "--data", tiny_store.store, "--out", out, "--seq-len", 64,
           "--per-document", "--set", "eval.batches=2", "--set", "eval.batch_size=4")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["mode"] == "per-document" and m["windows"] == 8 and 0 < m["tokens"] <= 8 * 64
    assert m["bits_per_byte"] == pytest.approx(m["val_loss"] * m["tokens"] / (math.log(2) * m["bytes"]), rel=1e-12)
    assert "bits per byte" in r.stdout
