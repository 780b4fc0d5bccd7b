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
    score = score_tokens(model, tokens, seq_len, count=0, batch_size=3, doc_offsets=few, per_document=True)
    by_hand = sum(_nll(model, tokens[a:b]) for a, b in spans.tolist())
    assert score.tokens == int((few[1:] - few[:-1] - 1).sum())
    assert score.nats == pytest.approx(by_hand, rel=1e-5)
    # Padding inside a batch changes nothing: one piece per batch gives the same sum.
    one_by_one = score_tokens(model, tokens, seq_len, batch_size=1, doc_offsets=few, per_document=True)
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
    assert "bits per byte" in r.stdout


# ---------------------------------------------------------------------------
# Bytes and documents, counted apart from the scorer
# ---------------------------------------------------------------------------


def _val_texts(corpus, val_fraction: float) -> list[str]:
    """The val documents of a JSONL corpus, by the store's split rule (tokenize_worker.split_of)."""
    import json

    from pipeline.data.tokenize_worker import split_of

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    return [t for t in texts if t and split_of(t.encode("utf-8"), val_fraction)]


def test_bits_per_byte_counts_the_bytes_of_the_val_text(model_and_val, tiny_store, tmp_path):
    """`mm eval --per-document` over every val document: its bytes are the UTF-8 length of those
    documents' text, counted from the corpus (not from token lengths), and bits per byte is its nats
    over ln 2 and those bytes."""
    import json

    from conftest import mm
    from test_export import make_state

    from pipeline.checkpoint.format import save_checkpoint

    expected = sum(len(t.encode("utf-8")) for t in _val_texts(tiny_store.corpus, 0.05))
    save_checkpoint(make_state(tiny_store.tokenizer, "tiny", {}), tmp_path / "run", keep_last=1)
    out = tmp_path / "eval.json"
    r = mm("eval", tmp_path / "run" / "ckpt.pth", "--data", tiny_store.store, "--out", out, "--seq-len", 64,
           "--per-document", "--set", "eval.batches=0")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["bytes"] == expected
    # The scorer's nats: the sum of each document run alone through the model (fp32), by hand.
    model, val = model_and_val
    offsets = np.asarray(val.doc_offsets)
    few = offsets[:4] - offsets[0]
    tokens = np.asarray(val.tokens[: offsets[3]])
    score = score_tokens(model, tokens, 64, doc_offsets=few, per_document=True,
                         byte_lengths=np.ones(model.config.vocab_size, dtype=np.int64))
    nats = sum(_nll(model, tokens[a:b]) for a, b in document_spans(few, 64).tolist())
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / score.bytes, rel=1e-5)
    assert score.bytes == int((np.diff(few) - 2).sum())  # text tokens only: the store's BOS/EOS are 0 bytes


def test_special_token_text_stays_inside_its_document(tiny_store, tmp_path):
    """A document whose text holds `<|im_start|>` (BOS's string) and `<|im_end|>`: the tokenizer maps them to
    their ids, the store's doc_offsets still say where documents start, so the sampler's doc_ids and
    the scorer's document numbers do not split it, and bits per byte counts the strings' bytes."""
    import json

    from pipeline.data.sampler import MixtureSampler, SourceSplit, document_ids
    from pipeline.data.store.reader import open_store
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluate.scoring import token_byte_lengths

    texts = [f"doc {i}: user said <|im_start|>hello<|im_end|> and then more words follow here" for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenize_files([tmp_path / "chat.jsonl"], tiny_store.tokenizer, tmp_path / "t.zarr", val_fraction=0.0,
                   progress=False)
    split = open_store(tmp_path / "t.zarr").train
    tokens, offsets = np.asarray(split.tokens), np.asarray(split.doc_offsets)
    assert split.n_docs == len(texts) and int((tokens == 1).sum()) == 2 * len(texts)  # a BOS id inside each text
    sampler = MixtureSampler([SourceSplit("chat", 1.0, split.tokens, split.doc_offsets)], seq_len=16, seed=0,
                             window_start="document")
    batch = next(sampler.micro_batches(0, 0, 1, 8, 1))
    assert (batch.doc_ids == 1).all()  # every 16-token window lies inside its document
    assert not torch.equal(batch.doc_ids, torch.cumsum(batch.inputs == 1, dim=1))  # what counting BOS ids gave
    starts = np.asarray(offsets[:-1])
    ids = document_ids(offsets, starts[:2], int(offsets[2] - offsets[0]))
    assert ids[0].tolist() == [1] * int(offsets[1] - offsets[0]) + [2] * int(offsets[2] - offsets[1])

    model = _tiny_model(tiny_store)
    lengths = token_byte_lengths(load_tokenizer(tiny_store.tokenizer)[0], model.config.vocab_size)
    score = score_tokens(model, tokens, 32, doc_offsets=offsets, per_document=True, byte_lengths=lengths)
    assert score.bytes == sum(len(t.encode("utf-8")) for t in texts)


def _tiny_model(tiny_store):
    from pipeline.architecture import build_config
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.transformer import Transformer

    _, info = load_tokenizer(tiny_store.tokenizer)
    torch.manual_seed(0)
    return Transformer(build_config("tiny", info["vocab_size"], {"dim": 32, "n_layers": 1, "n_heads": 4,
                                                                 "n_kv_heads": 2})).eval()


def test_sentencepiece_style_byte_lengths_are_the_decoded_bytes():
    """A Llama-style tokenizer (Metaspace `▁`, byte fallback `<0xHH>`, a decoder that strips the leading
    space): each token's bytes are those of the text it decodes to, so the bytes of a document's tokens
    are its UTF-8 length plus the one space the tokenizer prepends (was: `<0x0A>` 6 bytes, `▁` 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from pipeline.evaluate.scoring import token_byte_lengths

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "h", "e", "l", "o", "w", "r",
              "d", "\u2581h", "\u2581w", "\u2581he", "\u2581wo", "ll", "\u2581hell", "\u2581hello", "\u2581wor"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("\u2581", "h"), ("\u2581", "w"), ("\u2581h", "e"), ("\u2581w", "o"), ("l", "l"), ("\u2581he", "ll"),
              ("\u2581hell", "o"), ("\u2581wo", "r")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    lengths = token_byte_lengths(tok, len(pieces))
    for text in ["hello world", "hello\nworld\tü 中文 ✓", "hello  world\n\n"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")) + 1, (text, tok.encode(text).tokens)
    assert lengths[vocab["<0x0A>"]] == 1 and lengths[vocab["\u2581"]] == 1 and lengths[vocab["\u2581hello"]] == 6

