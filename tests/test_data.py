"""The data half: corpus, tokenizer, `mm tokenize` and the token store reader.

Everything here is real: real stdlib docstrings, real BPE training, real Zarr
stores read back by zarr-python, and the `mm` CLI run as a subprocess for exit
codes and one-line errors.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, mm

from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PART = "sample/part-00000-of-00001"
"""The one part of a store tokenized from sample.jsonl in one run."""


def only_part(store: Path):
    """The one part of a store holding one source tokenized in one run (its attributes, arrays)."""
    from pipeline.data.store.reader import list_parts, list_sources, open_part, part_dir

    (source,) = list_sources(store)
    ((index, count),) = list_parts(store, source)
    return open_part(part_dir(store, source, index, count))


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def corpus_texts(tiny, n: int | None = None) -> list[str]:
    with open(tiny.corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:n] if n else texts


def expected_arrays(tokenizer_dir: Path, texts: list[str], val_fraction: float):
    """An independent re-encoding: tokenizers + blake2b split, written from the spec."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    out = {"train": ([], [0]), "val": ([], [0])}
    for text in texts:
        h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
        split = "val" if h / 2**64 < val_fraction else "train"
        ids = [bos, *tok.encode(text, add_special_tokens=False).ids, eos]
        toks, offs = out[split]
        toks.extend(ids)
        offs.append(offs[-1] + len(ids))
    return {k: (np.array(t, dtype=np.int64), np.array(o, dtype=np.int64)) for k, (t, o) in out.items()}


# --------------------------------------------------------------------------- corpus and tokenizer


def test_sample_corpus_is_real_deduplicated_and_deterministic(tiny_store, tmp_path):
    lines = tiny_store.corpus.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) > 1000 and len(set(texts)) == len(texts)
    assert tiny_store.corpus.stat().st_size > 1_000_000
    # The stdlib's own docstrings, as Python itself reports them (an independent reading of the source).
    import inspect
    import json as json_module
    import textwrap

    from pipeline.data.corpus import MIN_CHARS

    present = set(texts)
    for fn in (json_module.dumps, textwrap.dedent, inspect.getdoc):
        assert inspect.getdoc(fn).strip() in present, fn.__qualname__
    assert all(len(t) >= MIN_CHARS and t == t.strip() for t in texts)
    r = mm("sample", tmp_path / "again.jsonl", "--params", tmp_path / "none.yaml", cwd=tmp_path)
    assert r.returncode == 1  # a named params file that does not exist is a user error
    r = mm("sample", tmp_path / "again.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again.jsonl").read_bytes() == tiny_store.corpus.read_bytes()


def test_tokenizer_dir_loads_with_transformers(tiny_store):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from pipeline.data.tokenizer import load_tokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_store.tokenizer))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer.from_file(str(tiny_store.tokenizer / "tokenizer.json"))
    text = "def f(x):\n    Return the café's value — 42."
    assert hf(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    assert hf.decode(raw.encode(text).ids) == text  # byte-level: lossless
    tok, info = load_tokenizer(tiny_store.tokenizer)
    assert info["vocab_size"] == len(hf) == 1024
    assert (info["pad_id"], info["bos_id"], info["eos_id"]) == (0, 1, 2)
    assert info["fingerprint"] == hashlib.sha256((tiny_store.tokenizer / "tokenizer.json").read_bytes()).hexdigest()


def test_tokenizer_cli_streams_jsonl_and_gz(tiny_store, tmp_path):
    gz = tmp_path / "part.jsonl.gz"
    with open(tiny_store.corpus, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read()[:300_000].rsplit(b"\n", 1)[0] + b"\n")
    r = mm("tokenizer", gz, "--vocab-size", 400, "--out", tmp_path / "tok", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from pipeline.data.tokenizer import load_tokenizer

    _, info = load_tokenizer(tmp_path / "tok")
    assert info["vocab_size"] == 400 and info["bos_id"] == 1
    assert_user_error(mm("tokenizer", tmp_path / "missing.jsonl", cwd=tmp_path), "missing.jsonl")

    # Deterministic: the same input trains the same tokenizer, byte for byte.
    r = mm("tokenizer", gz, "--vocab-size", 400, "--out", tmp_path / "tok2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (tmp_path / "tok2" / name).read_bytes(), name


def test_foreign_tokenizer_dirs(tiny_store, tmp_path):
    from pipeline.data.tokenizer import load_tokenizer

    # GPT-2 style: only an eos token → bos falls back to eos.
    d = tmp_path / "gpt2ish"
    d.mkdir()
    shutil.copy(tiny_store.tokenizer / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    _, info = load_tokenizer(d)
    assert info["bos_id"] == info["eos_id"] == info["pad_id"] == 0
    # No eos anywhere → unusable.
    (d / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="eos_token"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(UserError, match="not in the vocabulary"):
        load_tokenizer(d)


# --------------------------------------------------------------------------- bad lines


def _messy_jsonl(path: Path, texts: list[str], seed: int) -> dict:
    """A JSONL file mixing good documents with every kind of bad line.

    Returns the kept texts in order, the expected rejections and the line count.
    """
    rng = random.Random(seed)
    bad = [
        (b"", "empty_line"),
        (b"   \t", "empty_line"),
        (b'{"text": "caf\xe9 latin-1"}', "not_utf8"),
        (b'{"text": "\xff\xfe\x00"}', "not_utf8"),
        (b'{"text": "\\ud800 lone surrogate"}', "not_utf8"),
        (b'{"text": "unterminated', "not_json"),
        (b"not json at all", "not_json"),
        (b'{"text": "a"} trailing', "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (b'"just a string"', "not_object"),
        (b'{"title": "no text field"}', "missing_field"),
        (b'{"text": 42}', "not_string"),
        (b'{"text": null}', "not_string"),
        (b'{"text": ["a", "b"]}', "not_string"),
        (b'{"text": ""}', "empty_text"),
    ]
    # A document of ~1 MB of text, and one 10 MB line: a kept document whose other
    # field is 10 MB (the reader must carry it across many blocks).
    big = "\n\n".join(texts[:40]) + "\n"
    big = big * (1_000_000 // len(big.encode("utf-8")) + 1)
    docs = [t for t in texts] + [big, "ünïcödé ✓ 漢字 🙂 with\r\nCRLF inside", " leading space", "x"]
    rng.shuffle(docs)
    rows: list[tuple[bytes, str | None, str | None]] = []  # (line, kept text, reject reason)
    for d in docs:
        line = json.dumps({"text": d, "id": rng.randrange(10**6)}, ensure_ascii=rng.random() < 0.5).encode("utf-8")
        rows.append((line, d, None))
    huge = json.dumps({"html": "<p>" + "0123456789" * 1_000_000 + "</p>", "text": "the ten megabyte line"})
    rows.insert(rng.randrange(len(rows)), (huge.encode("utf-8"), "the ten megabyte line", None))
    for b, reason in bad * 3:
        rows.insert(rng.randrange(len(rows) + 1), (b, None, reason))
    kept, rejected = [], []
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf")  # UTF-8 BOM at file start: not an error
        for i, (line, text, reason) in enumerate(rows):
            end = b"\r\n" if rng.random() < 0.3 else b"\n"  # CRLF mixed in
            if i == len(rows) - 1:
                end = b""  # no newline at end of file
            f.write(line + end)
            if reason is None:
                kept.append(text)
            else:
                rejected.append((reason, i + 1))
    return {"kept": kept, "rejected": rejected, "lines": len(rows)}


@pytest.fixture(scope="module")
def messy(tiny_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("messy")
    texts = corpus_texts(tiny_store, 1500)
    info = _messy_jsonl(d / "messy.jsonl", texts, seed=7)
    return d, info


def test_bad_lines_counted_and_tokens_match_independent_encoding(tiny_store, messy, tmp_path):

    d, info = messy
    path = d / "messy.jsonl"
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    assert max(len(x) for x in raw.split(b"\n")) > 10_000_000
    n_lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    assert n_lines == info["lines"]

    out = tmp_path / "tokens.zarr"
    r = mm("tokenize", path, "--tokenizer", tiny_store.tokenizer, "--out", out,
           "--workers", 2, "--val-fraction", 0.1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "rejected" in r.stdout and "not_json" in r.stdout  # summary table

    store = only_part(out)
    c = store.attrs["counts"]
    assert c["lines"] == n_lines
    assert c["kept"] + c["rejected"] == n_lines
    assert c["kept"] == len(info["kept"])
    want = {}
    for reason, line_no in info["rejected"]:
        want.setdefault(reason, []).append(line_no)
    got = store.attrs["rejected"]
    assert {k: v["count"] for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    for reason, lines in want.items():
        assert got[reason]["first_lines"] == [f"messy.jsonl:{n}" for n in lines[:5]]
    src = store.attrs["inputs"][0]
    assert src["name"] == "messy.jsonl" and src["size"] == len(raw) and src["lines"] == n_lines
    assert src["sha256"] == hashlib.sha256(raw).hexdigest()

    expected = expected_arrays(tiny_store.tokenizer, info["kept"], 0.1)
    for name in ("train", "val"):
        split = getattr(store, name)
        toks, offs = expected[name]
        assert len(split.tokens) == len(toks) and len(split.doc_offsets) == len(offs)
        np.testing.assert_array_equal(np.asarray(split.tokens[0:len(split.tokens)], dtype=np.int64), toks)
        np.testing.assert_array_equal(split.doc_offsets, offs)
        assert c[name]["documents"] == len(offs) - 1
    assert c["val"]["documents"] > 0 and c["train"]["documents"] > 0

    # The same kind of input gzipped, and split over two files, gives the same tokens as one plain file.
    lines = [x for x in raw.split(b"\n") if len(x) < 500_000]
    half = len(lines) // 2
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[:half]) + b"\n"))
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines[half:]))
    (tmp_path / "ab.jsonl").write_bytes(b"\n".join(lines))
    for name, files in [("two.zarr", ["a.jsonl.gz", "b.jsonl"]), ("one.zarr", ["ab.jsonl"])]:
        r = mm("tokenize", *[tmp_path / f for f in files], "--tokenizer", tiny_store.tokenizer,
               "--out", tmp_path / name, "--workers", 1, "--val-fraction", 0.1, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    two, one = only_part(tmp_path / "two.zarr"), only_part(tmp_path / "one.zarr")
    assert [s["name"] for s in two.attrs["inputs"]] == ["a.jsonl.gz", "b.jsonl"]
    assert two.attrs["counts"]["lines"] == one.attrs["counts"]["lines"] == len(lines)
    assert two.attrs["counts"]["kept"] == one.attrs["counts"]["kept"] == c["kept"] - 2
    for name in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(getattr(two, name).tokens), np.asarray(getattr(one, name).tokens))
        np.testing.assert_array_equal(getattr(two, name).doc_offsets, getattr(one, name).doc_offsets)


def test_strict_names_file_and_line_and_leaves_nothing(tiny_store, tmp_path):
    src = tmp_path / "in.jsonl"
    good = tiny_store.corpus.read_bytes()
    src.write_bytes(good + b'{"text": 7}\r\n' + good)
    n = good.count(b"\n") + 1
    out = tmp_path / "strict.zarr"
    r = mm("tokenize", src, "--tokenizer", tiny_store.tokenizer, "--out", out, "--strict", "--workers", 2,
           cwd=tmp_path)
    assert_user_error(r, f"in.jsonl:{n}", "not string")
    # No part, no temporary directory, no lock file: only the (empty) root and source groups.
    assert sorted(store_files(out)) == ["in/zarr.json", "zarr.json"] and not list(out.glob("in/.*"))


# --------------------------------------------------------------------------- workers and the Zarr reader


def test_workers_1_and_2_byte_identical(tiny_store, tmp_path):
    src = tmp_path / "in.jsonl"
    # The corpus plus a few bad lines, small batches so work really spreads over workers.
    src.write_bytes(tiny_store.corpus.read_bytes() + b"oops\n\n" + tiny_store.corpus.read_bytes()[:50_000])
    from pipeline.data.tokenize import tokenize_files

    for w in (1, 2):
        tokenize_files([src], tiny_store.tokenizer, tmp_path / f"w{w}.zarr", workers=w, val_fraction=0.05,
                       progress=False, batch_bytes=64 * 1024, chunk_tokens=50_000)
    a, b = store_files(tmp_path / "w1.zarr"), store_files(tmp_path / "w2.zarr")
    assert a.keys() == b.keys() and len(a) > 10  # several chunk files per split
    assert all(a[k] == b[k] for k in a)
    # And through the CLI with its default chunking (a smaller input: this is about the CLI path).
    small = tmp_path / "small.jsonl"
    small.write_bytes(src.read_bytes()[:400_000] + b"\n")
    for w in (1, 2):
        r = mm("tokenize", small, "--tokenizer", tiny_store.tokenizer, "--out", tmp_path / f"c{w}.zarr",
               "--workers", w, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert store_files(tmp_path / "c1.zarr") == store_files(tmp_path / "c2.zarr")


@pytest.mark.parametrize("chunk_tokens", [None, 1000])
def test_zarr_reads_what_memmap_reader_returns(tiny_store, tmp_path, chunk_tokens):
    import zarr

    from pipeline.data.store.reader import ChunkedTokens
    from pipeline.data.tokenize import tokenize_files

    path = tiny_store.store
    if chunk_tokens:  # several chunk files per split, last one padded
        path = tmp_path / "chunked.zarr"
        tokenize_files([tiny_store.corpus], tiny_store.tokenizer, path, val_fraction=0.05,
                       progress=False, chunk_tokens=chunk_tokens)
    store = only_part(path)
    assert store.path == path / "sample" / "part-00000-of-00001"  # source named after the file
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["version"] == 2 and root.attrs["tokenizer"] == store.attrs["tokenizer"]
    group = root["sample/part-00000-of-00001"]
    assert group.attrs["format"] == "mm-tokens" and dict(group.attrs) == store.attrs
    for name in ("train", "val"):
        split = getattr(store, name)
        zt, zo = group[f"{name}/tokens"], group[f"{name}/doc_offsets"]
        assert zt.dtype == store.dtype == np.uint16 and zo.dtype == np.int64
        np.testing.assert_array_equal(zt[:], np.asarray(split.tokens[0:len(split.tokens)]))
        np.testing.assert_array_equal(zo[:], split.doc_offsets)
        assert zo[-1] == len(split.tokens) == zt.shape[0]
        if chunk_tokens:
            assert name == "val" or isinstance(split.tokens, ChunkedTokens)
            n = len(split.tokens)
            for a, b in [(0, 10), (995, 2010), (n - 1500, n), (n - 3, n + 5)]:
                np.testing.assert_array_equal(split.tokens[a:b], zt[a:min(b, n)])
            assert split.tokens[-1] == zt[n - 1]
        else:
            assert isinstance(split.tokens, np.memmap)
        # every document starts with BOS and ends with EOS
        offs = split.doc_offsets
        t = np.asarray(split.tokens[0:len(split.tokens)])
        assert (t[offs[:-1]] == store.bos_id).all() and (t[offs[1:] - 1] == store.eos_id).all()


def test_array_metadata_is_what_zarr_python_writes(tiny_store, tmp_path):
    """mm writes zarr.json itself; it must match zarr-python's own for the same array."""
    import zarr

    for name in ("train/tokens", "val/doc_offsets"):
        ours = json.loads((tiny_store.store / PART / name / "zarr.json").read_text())
        ref = zarr.create_array(str(tmp_path / name.replace("/", "_")), shape=tuple(ours["shape"]),
                                chunks=tuple(ours["chunk_grid"]["configuration"]["chunk_shape"]),
                                dtype=ours["data_type"], compressors=None, filters=None, fill_value=0)
        theirs = json.loads((tmp_path / name.replace("/", "_") / "zarr.json").read_text())
        assert ours == theirs, (ref, ours, theirs)


def test_fingerprint_and_empty_val_split(tiny_store, tmp_path):
    import zarr

    from pipeline.data.store.reader import open_store
    from pipeline.data.tokenize import tokenize_files

    tokenize_files([tiny_store.corpus], tiny_store.tokenizer, tmp_path / "noval.zarr", val_fraction=0.0,
                   progress=False)
    s = open_store(tmp_path / "noval.zarr")
    assert len(s.val.tokens) == 0 and list(s.val.doc_offsets) == [0] and s.val.n_docs == 0
    assert zarr.open_group(str(tmp_path / "noval.zarr"), mode="r")[f"{PART}/val/tokens"].shape == (0,)
    base = open_store(tiny_store.store)
    assert s.fingerprint != base.fingerprint
    assert base.tokenizer_fingerprint == base.attrs["tokenizer"]["fingerprint"]
    shutil.copytree(tiny_store.store, tmp_path / "moved.zarr")
    assert open_store(tmp_path / "moved.zarr").fingerprint == base.fingerprint
    assert base.vocab_size == 1024


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline.data.store.reader import open_store
    from pipeline.data.tokenize import tokenize_files

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i + 4 for i in range(70_000)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "wl"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    src = tmp_path / "w.jsonl"
    src.write_text("".join(json.dumps({"text": f"w69999 w5 zz w{i}"}) + "\n" for i in range(100)))
    tokenize_files([src], d, tmp_path / "u32.zarr", val_fraction=0.0, progress=False)
    s = open_store(tmp_path / "u32.zarr")
    assert s.dtype == np.uint32 and s.train.tokens.dtype == np.dtype("<u4")
    assert list(s.train.tokens[:6]) == [1, 70003, 9, 3, 4, 2]


# --------------------------------------------------------------------------- errors


def test_cli_user_errors(tiny_store, tmp_path):
    tk = tiny_store.tokenizer
    assert_user_error(mm("tokenize", tmp_path / "missing.jsonl", "--tokenizer", tk, "--out", tmp_path / "o.zarr",
                         cwd=tmp_path), "missing.jsonl", "not found")
    empty = tmp_path / "notatokenizer"
    empty.mkdir()
    assert_user_error(mm("tokenize", tiny_store.corpus, "--tokenizer", empty, "--out", tmp_path / "o.zarr",
                         cwd=tmp_path), "notatokenizer", "tokenizer.json")
    (empty / "tokenizer.json").write_text("{ this is not a tokenizer")
    assert_user_error(mm("tokenize", tiny_store.corpus, "--tokenizer", empty, "--out", tmp_path / "o.zarr",
                         cwd=tmp_path), "tokenizer.json")
    assert_user_error(mm("tokenize", tiny_store.corpus, "--tokenizer", tk, "--out", tiny_store.store,
                         cwd=tmp_path), f"tokens.zarr/{PART}", "--force")
    assert not (tmp_path / "o.zarr").exists()
    # A directory of the user's is not written into, even with --force.
    out = tmp_path / "forced.zarr"
    out.mkdir()
    (out / "junk").write_text("x")
    assert_user_error(mm("tokenize", tiny_store.corpus, "--tokenizer", tk, "--out", out, "--force", cwd=tmp_path),
                      "forced.zarr", "not a token store")
    assert sorted(p.name for p in out.iterdir()) == ["junk"]
    # --force replaces the one part named, and nothing else: the other source stays as it was.
    from pipeline.data.store.reader import open_part

    shutil.copytree(tiny_store.store, out := tmp_path / "two.zarr")
    small = tmp_path / "small.jsonl"
    small.write_bytes(tiny_store.corpus.read_bytes()[:100_000].rsplit(b"\n", 1)[0] + b"\n")
    before = store_files(out / "sample")
    r = mm("tokenize", small, "--tokenizer", tk, "--out", out, "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert store_files(out / "sample") == before
    other = store_files(out / "small")
    r = mm("tokenize", small, "--source", "sample", "--force", "--tokenizer", tk, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert store_files(out / "small") == other
    replaced = open_part(out / PART).attrs
    assert replaced["counts"] == open_part(out / "small/part-00000-of-00001").attrs["counts"]
    assert replaced["counts"]["lines"] < open_part(tiny_store.store / PART).attrs["counts"]["lines"]
    assert sorted(p.name for p in out.iterdir()) == ["sample", "small", "zarr.json"]  # no lock or temporary left
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["part-00000-of-00001", "zarr.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forced.zarr", "notatokenizer", "small.jsonl", "two.zarr"]


def test_corrupt_gzip_is_one_line_error_naming_the_file(tiny_store, tmp_path):
    """A damaged deflate stream (zlib.error, not OSError) in `mm tokenize` and `mm tokenizer`."""
    data = bytearray(gzip.compress(tiny_store.corpus.read_bytes()[:300_000]))
    for i in range(200, 260):
        data[i] ^= 0x5A
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(bytes(data))
    assert_user_error(mm("tokenize", bad, "--tokenizer", tiny_store.tokenizer, "--out", tmp_path / "o.zarr",
                         "--workers", 1, cwd=tmp_path), "bad.jsonl.gz", "cannot read")
    assert_user_error(mm("tokenizer", bad, "--vocab-size", 300, "--out", tmp_path / "tok", cwd=tmp_path),
                      "bad.jsonl.gz", "cannot read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl.gz", "o.zarr"]
    # The store's root and source groups stay (made before reading); no part, no temporary, no lock.
    assert sorted(store_files(tmp_path / "o.zarr")) == ["bad/zarr.json", "zarr.json"]


def _corrupt(tiny_store, tmp_path, name) -> Path:
    p = tmp_path / name
    shutil.copytree(tiny_store.store, p)
    return p


def test_corrupt_stores_are_refused_naming_the_file(tiny_store, tmp_path):
    from pipeline.data.store.reader import open_store

    p = _corrupt(tiny_store, tmp_path, "trunc.zarr")
    chunk = p / PART / "train/tokens/c/0"
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size - 2)
    with pytest.raises(UserError, match=r"train/tokens/c/0: chunk file is .* bytes, expected"):
        open_store(p)

    p = _corrupt(tiny_store, tmp_path, "missing.zarr")
    (p / PART / "val/doc_offsets/c/0").unlink()
    with pytest.raises(UserError, match=r"val/doc_offsets/c/0: chunk file missing"):
        open_store(p)

    p = _corrupt(tiny_store, tmp_path, "attrs.zarr")
    meta = json.loads((p / PART / "zarr.json").read_text())
    meta["attributes"]["counts"]["train"]["tokens"] += 7
    (p / PART / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"attrs.zarr/sample/part-00000-of-00001/zarr.json: attributes say train"):
        open_store(p)

    p = _corrupt(tiny_store, tmp_path, "edited.zarr")  # counts still consistent: the checksum catches it
    meta = json.loads((p / PART / "zarr.json").read_text())
    meta["attributes"]["tokenizer"]["fingerprint"] = "0" * 64
    (p / PART / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"edited.zarr/sample/part-00000-of-00001/zarr.json: attributes altered"):
        open_store(p)
    del meta["attributes"]["attrs_sha256"]  # deleting the checksum does not turn the check off
    (p / PART / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"attrs_sha256 missing"):
        open_store(p)
    root_meta = json.loads((p / "zarr.json").read_text())
    del root_meta["attributes"]["attrs_sha256"]
    (p / "zarr.json").write_text(json.dumps(root_meta))
    with pytest.raises(UserError, match=r"edited.zarr/zarr.json: attributes altered .*missing"):
        open_store(p)

    p = _corrupt(tiny_store, tmp_path, "version.zarr")
    meta = json.loads((p / PART / "zarr.json").read_text())
    meta["attributes"]["version"] = 99
    (p / PART / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="version 99"):
        open_store(p)

    p = _corrupt(tiny_store, tmp_path, "dtype.zarr")
    meta = json.loads((p / PART / "train/tokens/zarr.json").read_text())
    meta["data_type"] = "uint32"
    (p / PART / "train/tokens/zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"train/tokens/zarr.json: data_type 'uint32', expected 'uint16'"):
        open_store(p)

    p = _corrupt(tiny_store, tmp_path, "codec.zarr")
    meta = json.loads((p / PART / "val/tokens/zarr.json").read_text())
    meta["codecs"].append({"name": "zstd", "configuration": {"level": 0, "checksum": False}})
    (p / PART / "val/tokens/zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="encoded"):
        open_store(p)

    with pytest.raises(UserError, match="not found"):
        open_store(tmp_path / "nothing.zarr")
    with pytest.raises(UserError, match="not a token store"):
        open_store(tiny_store.tokenizer)
