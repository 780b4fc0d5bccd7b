"""Sources and parts of the token store: input formats, `mm tokenize --part I/N`, params.

Real inputs of every format (JSONL, gzip, zstd, Parquet, a `datasets` directory
written by `Dataset.save_to_disk`), real parallel writers, stores read back by
zarr-python.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _mm_args(*args) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *map(str, args)]


def _run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(_mm_args(*args), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def _texts(tiny_store, a: int, b: int) -> list[str]:
    with open(tiny_store.corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][a:b]


def _arrays(store, split: str) -> tuple[np.ndarray, np.ndarray]:
    s = getattr(store, split)
    return np.asarray(s.tokens[0:len(s.tokens)], dtype=np.int64), np.asarray(s.doc_offsets)


def _documents(parts, split: str) -> list[np.ndarray]:
    docs = []
    for p in parts:
        toks, offs = _arrays(p, split)
        docs.extend(toks[a:b] for a, b in zip(offs[:-1], offs[1:], strict=True))
    return docs


@pytest.fixture(scope="module")
def mixed_dir(tiny_store, tmp_path_factory) -> Path:
    """A directory holding a plain JSONL, a gzipped JSONL and a Parquet file of several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("mixed") / "src"
    d.mkdir()
    lines = tiny_store.corpus.read_bytes().splitlines(keepends=True)
    (d / "a.jsonl").write_bytes(b"".join(lines[:500]) + b"not json\n")
    (d / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[500:700])))
    texts = _texts(tiny_store, 700, 1000)
    texts[3] = None  # counted as not_string, like {"text": null}
    pq.write_table(pa.table({"text": texts}), d / "c.parquet", row_group_size=40)
    return d


# --------------------------------------------------------------------------- parts


def test_four_parts_written_out_of_order_and_concurrently_equal_one_run(tiny_store, mixed_dir, tmp_path):
    import zarr

    from pipeline.data.store.reader import list_parts, list_sources, open_part, open_store, part_dir
    from pipeline.data.tokenize import tokenize_files

    kw = {"source": "mix", "val_fraction": 0.1, "progress": False}
    one = tokenize_files([mixed_dir], tiny_store.tokenizer, tmp_path / "one.zarr", **kw)
    store = tmp_path / "four.zarr"
    # Parts 2 and 0 at the same time, in two processes (the first to come creates the store), then 3 and 1.
    procs = [subprocess.Popen(_mm_args("tokenize", mixed_dir, "--source", "mix", "--part", f"{i}/4", "--out", store,
                                       "--tokenizer", tiny_store.tokenizer, "--val-fraction", 0.1, "--workers", 1),
                              cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (2, 0)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for i in (3, 1):
        tokenize_files([mixed_dir], tiny_store.tokenizer, store, part=(i, 4), workers=2 if i == 3 else 1, **kw)

    assert list_sources(store) == ["mix"] and list_parts(store, "mix") == [(i, 4) for i in range(4)]
    parts = [open_part(part_dir(store, "mix", i, 4)) for i in range(4)]
    single = open_store(tmp_path / "one.zarr")
    for split in ("train", "val"):
        want, got = _documents([single], split), _documents(parts, split)
        assert len(got) == len(want) > 0 and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    # Every part read a share of the input; together, each line and row once.
    assert sum(p.attrs["counts"]["lines"] for p in parts) == one["counts"]["lines"] == 500 + 1 + 200 + 300
    assert {k: sum(p.attrs["rejected"].get(k, {}).get("count", 0) for p in parts) for k in one["rejected"]} == \
        {"not_json": 1, "not_string": 1}
    units = [(r["name"], r["range"]["unit"]) for p in parts for r in p.attrs["inputs"]]
    assert ("a.jsonl", "bytes") in units and ("b.jsonl.gz", "file") in units and ("c.parquet", "row_groups") in units
    assert sum(u == ("b.jsonl.gz", "file") for u in units) == 1  # a compressed file is read whole, by one part
    assert len({r["name"] for r in parts[0].attrs["inputs"]}) < 3  # part 0 did not read everything

    # zarr-python opens every part and reads what the memory-mapped reader returns; chunk hashes hold.
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["tokenizer"] == single.attrs["tokenizer"] and root.attrs["version"] == 2
    for i, p in enumerate(parts):
        g = root[f"mix/part-{i:05d}-of-00004"]
        assert dict(g.attrs) == p.attrs and g.attrs["part"] == {"index": i, "count": 4}
        for split in ("train", "val"):
            toks, offs = _arrays(p, split)
            np.testing.assert_array_equal(g[f"{split}/tokens"][:], toks)
            np.testing.assert_array_equal(g[f"{split}/doc_offsets"][:], offs)
        for rel, digest in p.attrs["chunk_sha256"].items():
            assert hashlib.sha256((p.path / rel).read_bytes()).hexdigest() == digest, rel
    assert not [f for f in store.rglob(".*")]  # no lock files or temporaries left

    # One writer per part: a second is refused, naming the process that holds the part.
    from pipeline.data.store.writer import PartLock

    with PartLock(store / "mix" / ".part-00001-of-00004.lock", "held"):
        with pytest.raises(UserError, match=rf"part-00001-of-00004: being written by process {os.getpid()}"):
            tokenize_files([mixed_dir], tiny_store.tokenizer, store, part=(1, 4), force=True, **kw)
    with pytest.raises(UserError, match="part-00001-of-00004: part exists"):
        tokenize_files([mixed_dir], tiny_store.tokenizer, store, part=(1, 4), **kw)
    with pytest.raises(UserError, match="--part 4/4"):
        tokenize_files([mixed_dir], tiny_store.tokenizer, store, part=(4, 4), **kw)


def test_a_part_moved_aside_by_a_crashed_publish_is_put_back(tiny_store, tmp_path):
    """A writer killed between publish_dir's two renames leaves the complete part at .PART.old-PID and
    its new one at .PART.tmp-PID: the next writer renames the old copy back (the only complete one), so
    it then finds the part and refuses without --force, every byte as before; the temporary is gone."""
    from pipeline.data.store.reader import open_store, part_dir
    from pipeline.data.tokenize import tokenize_files

    lines = tiny_store.corpus.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:200]) + "\n")
    store = tmp_path / "s.zarr"
    kw = {"source": "a", "val_fraction": 0.1, "progress": False}
    tokenize_files([tmp_path / "a.jsonl"], tiny_store.tokenizer, store, **kw)
    final = part_dir(store, "a", 0, 1)
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    os.replace(final, final.with_name(f".{final.name}.old-99999"))  # the first rename done, not the second
    shutil.copytree(final.with_name(f".{final.name}.old-99999"), final.with_name(f".{final.name}.tmp-99999"))

    with pytest.raises(UserError, match="part exists"):
        tokenize_files([tmp_path / "a.jsonl"], tiny_store.tokenizer, store, **kw)
    assert {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name, "zarr.json"]
    assert open_store(store).train.n_tokens > 0


# --------------------------------------------------------------------------- formats


def test_every_format_gives_the_same_tokens_and_the_same_rejects(tiny_store, tmp_path):
    """The same texts as JSONL, .jsonl.zst, Parquet and a `datasets` save_to_disk directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from pipeline.data.store.reader import open_part
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer_training import train_tokenizer

    texts: list = _texts(tiny_store, 0, 400)
    texts[10], texts[20], texts[30] = None, "", "ünïcödé ✓ 漢字 🙂"
    jsonl = b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts)
    (tmp_path / "t.jsonl").write_bytes(jsonl)
    (tmp_path / "t.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "t.parquet",
                   row_group_size=64)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"), max_shard_size="100KB")
    assert len(list((tmp_path / "ds").glob("*.arrow"))) > 1  # several Arrow files, read in the dataset's order

    store = tmp_path / "s.zarr"
    results = {}
    for name, path in [("jsonl", "t.jsonl"), ("zst", "t.jsonl.zst"), ("parquet", "t.parquet"), ("ds", "ds")]:
        results[name] = tokenize_files([tmp_path / path], tiny_store.tokenizer, store, source=name,
                                       val_fraction=0.1, progress=False)
    ref = open_part(store / "jsonl/part-00000-of-00001")
    for name, r in results.items():
        assert r["counts"] == ref.attrs["counts"], name
        assert {k: v["count"] for k, v in r["rejected"].items()} == {"not_string": 1, "empty_text": 1}, name
        part = open_part(store / name / "part-00000-of-00001")
        for split in ("train", "val"):
            for a, b in zip(_arrays(part, split), _arrays(ref, split), strict=True):
                np.testing.assert_array_equal(a, b)
    assert results["ds"]["rejected"]["not_string"]["first_lines"] == ["ds/data-00000-of-00002.arrow:row 10"]
    assert results["jsonl"]["rejected"]["empty_text"]["first_lines"] == ["t.jsonl:21"]

    # A store is made with one tokenizer: another one is refused, and nothing is written.
    train_tokenizer([tmp_path / "t.jsonl"], tmp_path / "tok2", vocab_size=300)
    with pytest.raises(UserError, match=r"s.zarr: made with another tokenizer .*: write into another --out"):
        tokenize_files([tmp_path / "t.jsonl"], tmp_path / "tok2", store, source="new", val_fraction=0.1,
                       progress=False)
    assert not (store / "new").exists()
    with pytest.raises(UserError, match=r"t.parquet: no column 'body'"):
        tokenize_files([tmp_path / "t.parquet"], tiny_store.tokenizer, store, source="p2", val_fraction=0.1,
                       text_field="body", progress=False)


# --------------------------------------------------------------------------- params


def test_sources_in_params_drive_mm_tokenizer_and_mm_tokenize(tiny_store, mixed_dir, tmp_path):
    from pipeline.data.store.reader import list_sources, open_part
    from pipeline.params import load_params

    params = tmp_path / "params.yaml"
    params.write_text(f"""
data:
  sources:
    web: {{path: {mixed_dir / 'a.jsonl'}, weight: 0.7}}
    books: {{path: [{mixed_dir / 'c.parquet'}, {mixed_dir / 'b.jsonl.gz'}], weight: 0.3}}
  val_fraction: 0.1
tokenizer:
  vocab_size: 300
  sources: [books]
""")
    p = load_params(params, ["data.sources.books.weight=0.25", "data.sources.web.text_field=body"])
    assert p.data.sources["books"]["weight"] == 0.25 and p.data.sources["web"]["text_field"] == "body"
    for bad, needle in [("data.sources.web.wieght=1", "data.sources.web.wieght: unknown key"),
                        ("data.sources.web.weight=-1", "data.sources.web.weight: must be a number >= 0"),
                        ("tokenizer.sources=[nope]", "tokenizer.sources names 'nope'")]:
        with pytest.raises(UserError, match=needle):
            load_params(params, [bad])

    r = _run("tokenizer", "--params", params, "--out", tmp_path / "tok", cwd=tmp_path)  # trains on `books` only
    assert r.returncode == 0, r.stderr
    r = _run("tokenize", "--params", params, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "s.zarr",
             "--workers", 1, cwd=tmp_path)  # every source in params, one part each
    assert r.returncode == 0, r.stderr
    assert list_sources(tmp_path / "s.zarr") == ["books", "web"]
    books = open_part(tmp_path / "s.zarr/books/part-00000-of-00001")
    assert [i["name"] for i in books.attrs["inputs"]] == ["c.parquet", "b.jsonl.gz"] and books.vocab_size == 300
    r = _run("tokenize", "--params", params, "--source", "nope", "--tokenizer", tmp_path / "tok", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --source nope: not in data.sources (known: web, books); give input files to tokenize a source "
        "params does not name"]
