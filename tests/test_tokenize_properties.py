"""Properties of tokenizing (pipeline.data.tokenize.tokenize_files, what `mm tokenize` runs), by Hypothesis.

For any list of documents, written as JSONL (raw UTF-8 or ASCII-escaped), .jsonl.gz or Parquet and
tokenized with the session's tiny tokenizer (tests/conftest.py) into a real store:

  count     the store holds one document per non-empty text, no more and no fewer: its
            doc_offsets, not its token values, say where documents are (an empty text is
            rejected as `empty_text`; input with no text at all is a UserError, nothing written)
  split     train and val hold the documents the split rule puts there, in input order
  text      every stored document is BOS + ids + EOS and its ids decode to exactly the text
  special   the special tokens' strings (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) inside
            a text, whole or cut, keep both: the count and the decoded text
  long      documents far longer than a chunk file (chunk_tokens 64) survive whole

What a special-token string becomes inside a text (its id, or the ids of its characters) is the
tokenizer's rule; both properties above hold either way, so these tests do not pin it.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.store.reader import open_store
from pipeline.data.tokenize import tokenize_files
from pipeline.data.tokenize_worker import split_of
from pipeline.data.tokenizer import SPECIAL_TOKENS, load_tokenizer
from pipeline.errors import UserError

# derandomize: the same examples every run (a failure reproduces; the suite stays deterministic).
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FORMATS = ("jsonl", "jsonl-ascii", "jsonl.gz", "parquet")
VAL_FRACTION = 0.3  # some documents on each side in most examples

# Any Unicode text (hypothesis excludes lone surrogates, which no UTF-8 file can hold).
texts = st.text(max_size=200)
# Pieces of special-token strings among ordinary text: whole, cut short, doubled, next to spaces.
special_pieces = st.sampled_from([*SPECIAL_TOKENS, "<|im_start|", "|im_end|>", "<|", "|>", " ", "\n",
                                  SPECIAL_TOKENS[1] + SPECIAL_TOKENS[2]])
with_specials = st.lists(st.one_of(special_pieces, st.text(max_size=20)), max_size=12).map("".join)
long_texts = st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=30), st.integers(200, 2000))


@pytest.fixture(scope="module")
def tokenizer(tiny_store):
    tok, info = load_tokenizer(tiny_store.tokenizer)
    return tiny_store.tokenizer, tok, info


def write_input(directory: Path, docs: list[str], fmt: str) -> Path:
    """The documents as one input file of the given format, one document per line or row."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "docs.parquet"
        pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), path)
        return path
    lines = "".join(json.dumps({"text": d}, ensure_ascii=fmt == "jsonl-ascii") + "\n" for d in docs)
    if fmt == "jsonl.gz":
        path = directory / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode("utf-8"), mtime=0))
    else:
        path = directory / "docs.jsonl"
        path.write_text(lines, encoding="utf-8")
    return path


def stored_documents(split, tok, bos: int, eos: int) -> list[str]:
    """Each document of a split, cut at its doc_offsets, checked for BOS/EOS and decoded."""
    offsets = [int(o) for o in split.doc_offsets[: split.n_docs + 1]]
    assert offsets[0] == 0 and offsets[-1] == len(split.tokens)
    out = []
    for a, b in zip(offsets, offsets[1:], strict=False):
        ids = [int(t) for t in split.tokens[a:b]]
        assert len(ids) >= 2 and ids[0] == bos and ids[-1] == eos, ids[:5]
        out.append(tok.decode(ids[1:-1], skip_special_tokens=False))
    return out


def check_round_trip(tokenizer, docs: list[str], fmt: str, chunk_tokens: int | None = None) -> None:
    """Tokenize `docs` into a fresh store and check count, split, order and decoded text."""
    tok_dir, tok, info = tokenizer
    kept = [d for d in docs if d]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw, store = write_input(tmp, docs, fmt), tmp / "tokens.zarr"
        options = {"chunk_tokens": chunk_tokens} if chunk_tokens else {}
        if not kept:  # nothing to keep is the user's mistake: one error, no part published
            with pytest.raises(UserError, match="no usable text|no text at all"):
                tokenize_files([raw], tok_dir, store, source="docs", val_fraction=VAL_FRACTION, progress=False,
                               **options)
            assert not (store / "docs" / "part-00000-of-00001").exists()
            return
        attrs = tokenize_files([raw], tok_dir, store, source="docs", val_fraction=VAL_FRACTION, progress=False,
                               **options)
        opened = open_store(store).sources["docs"]
        want = {0: [], 1: []}
        for d in kept:
            want[split_of(d.encode("utf-8"), VAL_FRACTION)].append(d)
        for s, split in enumerate((opened.train, opened.val)):
            assert split.n_docs == len(want[s]), (s, split.n_docs, len(want[s]))
            assert stored_documents(split, tok, info["bos_id"], info["eos_id"]) == want[s]
        empty = attrs["rejected"].get("empty_text", {"count": 0})["count"]
        assert empty == len(docs) - len(kept)


@PROPERTY
@given(docs=st.lists(texts, max_size=12), fmt=st.sampled_from(FORMATS))
def test_any_unicode_text_keeps_count_and_text(tokenizer, docs, fmt):
    check_round_trip(tokenizer, docs, fmt)


@PROPERTY
@given(docs=st.lists(with_specials, min_size=1, max_size=8), fmt=st.sampled_from(FORMATS))
def test_special_token_strings_inside_text_keep_count_and_text(tokenizer, docs, fmt):
    check_round_trip(tokenizer, docs, fmt)


@settings(PROPERTY, max_examples=10)
@given(docs=st.lists(st.one_of(long_texts, texts), min_size=1, max_size=4), fmt=st.sampled_from(FORMATS))
def test_long_documents_across_chunk_files_keep_count_and_text(tokenizer, docs, fmt):
    check_round_trip(tokenizer, docs, fmt, chunk_tokens=64)


def test_a_special_token_string_in_text_is_one_document(tokenizer):
    """The example the properties generalise: MiniMind-style chat text as a pretraining document.
    Whatever ids `<|im_start|>` takes inside it, the store's doc_offsets count one document."""
    doc = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"
    check_round_trip(tokenizer, [doc, "", doc + "<|endoftext|>"], "jsonl")
