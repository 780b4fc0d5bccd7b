"""Several sources: reading them from the store, and training from them by weight.

What is shown:
  parts         a source written as 3 parts reads as one source identical to the same text
                written as 1 part: tokens and document offsets, slices across part boundaries
  selection     open_store opens the sources asked for, in that order; one not in the store is an
                error naming it; a store source not asked for is left out with one note, and does
                not change the fingerprint
  completeness  a missing part is an error naming it; parts of different splits are refused
  scale         the views index and slice past 2^32 tokens and documents with int64 arithmetic
  training      `mm train` over three sources weighted 0.6/0.3/0.1 with window_start document:
                tokens/NAME in train_log.tsv within a sample of the weights at every step, the same
                figures in metrics.json, val_loss per source and overall (their weighted mean), the
                summary table; two processes give the same per-step losses (1e-5, fp32) and a run
                stopped halfway and resumed gives the identical log rows
  model card    the checkpoint records each source's weight and tokens trained on (= train_log.tsv's)
                and val bits per byte, per source (= the scorer of `mm eval` on the saved weights) and
                overall; the exported README.md shows those figures
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.store.reader import open_store, part_dir
from pipeline.data.store.views import ConcatArray, ConcatOffsets
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory) -> Path:
    """Sources `three` (3 parts) and `one` (1 part) of the same 600 documents; `other` (80 others)."""
    from pipeline.data.tokenize import tokenize_files

    root = tmp_path_factory.mktemp("sources")
    lines = tiny_store.corpus.read_text().splitlines()
    (root / "a.jsonl").write_text("\n".join(lines[:600]) + "\n")
    (root / "b.jsonl").write_text("\n".join(lines[600:680]) + "\n")
    out = root / "tokens.zarr"
    common = dict(val_fraction=0.1, progress=False, chunk_tokens=4096)  # several chunk files per part
    for i in (2, 0, 1):
        tokenize_files([root / "a.jsonl"], tiny_store.tokenizer, out, source="three", part=(i, 3), **common)
    tokenize_files([root / "a.jsonl"], tiny_store.tokenizer, out, source="one", **common)
    tokenize_files([root / "b.jsonl"], tiny_store.tokenizer, out, source="other", **common)
    return out


def test_parts_read_as_one_source(store):
    s = open_store(store, sources=["three", "one"])
    assert list(s.sources) == ["three", "one"] and len(s.sources["three"].parts) == 3
    for split in ("train", "val"):
        three, one = getattr(s.sources["three"], split), getattr(s.sources["one"], split)
        assert three.n_tokens == one.n_tokens and three.n_docs == one.n_docs > 0
        assert np.array_equal(np.asarray(three.tokens), np.asarray(one.tokens))
        assert np.array_equal(np.asarray(three.doc_offsets), np.asarray(one.doc_offsets))
    three = s.sources["three"].train
    first_part = s.sources["three"].parts[0].train
    edge = first_part.n_tokens  # the first token of part 1
    assert np.array_equal(three.tokens[edge - 5 : edge + 5], s.sources["one"].train.tokens[edge - 5 : edge + 5])
    d = first_part.n_docs  # document d is the first of part 1: it starts where part 0 ends
    assert three.doc_offsets[d] == edge and three.tokens[edge] == s.bos_id
    assert three.doc_offsets[three.n_docs] == three.n_tokens


def test_selection_missing_sources_and_notes(store):
    notes = []
    s = open_store(store, sources=["other"], note=notes.append)
    assert list(s.sources) == ["other"] and s.ignored == ["one", "three"]
    assert len(notes) == 1 and "one, three" in notes[0] and "ignored" in notes[0]
    assert s.train.n_tokens == s.sources["other"].train.n_tokens  # one source: its splits directly
    with pytest.raises(UserError, match="holds 3 sources"):
        _ = open_store(store).train
    with pytest.raises(UserError, match=r"no source web, zh .*holds: one, other, three"):
        open_store(store, sources=["web", "other", "zh"])


def test_fingerprint_covers_only_the_selected_sources(store, tmp_path):
    before = open_store(store, sources=["one", "other"]).fingerprint
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    shutil.rmtree(copy / "three")
    assert open_store(copy, sources=["one", "other"]).fingerprint == before  # moved, a source less
    assert open_store(copy, sources=["other", "one"]).fingerprint == before  # order is not data
    assert open_store(copy, sources=["one"]).fingerprint != before


def test_incomplete_or_mixed_parts_are_refused_naming_them(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    shutil.rmtree(part_dir(copy, "three", 1, 3))
    missing = r"source 'three' is incomplete: 1 of its 3 parts missing \(part-00001-of-00003\)"
    with pytest.raises(UserError, match=missing):
        open_store(copy, sources=["three"])
    open_store(copy, sources=["one"])  # the others still open
    shutil.copytree(part_dir(store, "one", 0, 1), part_dir(copy, "three", 0, 1))
    with pytest.raises(UserError, match="disagree on how many"):
        open_store(copy, sources=["three"])


def test_a_part_from_another_tokenizer_is_refused(store, tmp_path):
    from pipeline.data.store.reader import ATTRS_CHECKSUM, attrs_checksum

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    meta_path = part_dir(copy, "other", 0, 1) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["tokenizer"]["fingerprint"] = "0" * 64
    meta["attributes"][ATTRS_CHECKSUM] = attrs_checksum(meta["attributes"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="tokenizer differs from the store's"):
        open_store(copy, sources=["other"])


class Synthetic:
    """n values without storage: value i is i * step (so offsets grow, tokens wrap in uint16)."""

    def __init__(self, n: int, step: int = 1, dtype="int64"):
        self.n, self.step, self.dtype = n, step, np.dtype(dtype)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            return (np.arange(key.start, key.stop, dtype=np.int64) * self.step).astype(self.dtype)
        return np.array(int(key) * self.step, dtype=np.int64).astype(self.dtype)[()]


def test_views_past_2_to_the_32():
    big = 3 * 2**31  # tokens per part: 6.4·10^9 together
    tokens = ConcatArray([Synthetic(big, dtype="uint16"), Synthetic(big, dtype="uint16")])
    assert len(tokens) == 2 * big
    across = tokens[big - 2 : big + 2]
    assert across.tolist() == [(big - 2) % 2**16, (big - 1) % 2**16, 0, 1]
    assert int(tokens[2 * big - 1]) == (big - 1) % 2**16
    # Two parts of 2^32 + 1 one-token documents each: offsets run past 2^33.
    docs = 2**32 + 1
    offsets = ConcatOffsets([Synthetic(docs + 1), Synthetic(docs + 1)], [docs, docs])
    assert len(offsets) == 2 * docs + 1
    assert int(offsets[docs]) == docs and int(offsets[docs + 1]) == docs + 1
    assert offsets[docs - 1 : docs + 2].tolist() == [docs - 1, docs, docs + 1]
    assert int(offsets[2 * docs]) == 2 * docs and offsets[2 * docs - 1 :].dtype == np.int64


# ---------------------------------------------------------------------------
# Training from the three sources through the CLI (window_start document)
# ---------------------------------------------------------------------------

WEIGHTS = {"three": 0.6, "other": 0.3, "one": 0.1}
STEPS = 24


@pytest.fixture(scope="module")
def runs(store, tiny_store, tmp_path_factory) -> dict[str, Path]:
    """ref: one process, accumulation 2; procs2: two processes, accumulation 1 (same global batch);
    resumed: ref's settings stopped at step 12 (train.stop_after) and resumed in a new process."""
    import subprocess
    import sys

    from conftest import mm, mm_env

    root = tmp_path_factory.mktemp("mix_runs")
    params = {"data": {"sources": {n: {"path": "unused.jsonl", "weight": w} for n, w in WEIGHTS.items()}}}
    (root / "params.yaml").write_text(json.dumps(params))
    done = mm("config", "--tokenizer", tiny_store.tokenizer, "--out", root / "model.json", "--params",
              root / "params.yaml", "--set", "model.dim=32", "--set", "model.n_layers=1", cwd=root)
    assert done.returncode == 0, done.stderr

    def train(name: str, *extra: str) -> list[str]:
        sets = ["seq_len=32", "micro_batch_size=4", f"max_steps={STEPS}", "dtype=fp32", "eval_interval=12",
                "eval_batches=1", "save_interval=100", "log_interval=12", "warmup_steps=2", "seed=3",
                "window_start=document", f"out_dir={root / name}"]
        cmd = [sys.executable, "-m", "stages.cli", "train", "--data", str(store), "--tokenizer",
               str(tiny_store.tokenizer), "--model", str(root / "model.json"), "--device", "cpu",
               "--params", str(root / "params.yaml")]
        return cmd + [a for s in sets for a in ("--set", f"train.{s}")] + list(extra)

    env = mm_env(OMP_NUM_THREADS="1")
    procs = {
        "ref": train("ref", "--set", "train.accumulation_steps=2"),
        "procs2": train("procs2", "--procs", "2", "--master-port", str(_free_port())),
        "resumed": train("resumed", "--set", "train.accumulation_steps=2", "--set", "train.stop_after=12"),
    }
    started = {k: subprocess.Popen(c, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k, c in procs.items()}
    results = {k: p.communicate(timeout=600) for k, p in started.items()}
    for k, p in started.items():
        assert p.returncode == 0, f"{k}: {results[k][1][-3000:]}"
    again = subprocess.run(procs["resumed"][:-2], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (root / "ref.stderr").write_text(results["ref"][1])
    return {k: root / k for k in procs} | {"root": root}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def test_tokens_per_source_follow_the_weights(runs):
    header, rows = _rows(runs["ref"] / "train_log.tsv")
    cols = [header.index(f"tokens/{n}") for n in WEIGHTS]
    assert len(rows) == STEPS
    for row in rows:  # every step: each source within ½ + K·w/2 samples of its share
        step = int(row[0])
        samples = [int(row[c]) // 32 for c in cols]
        assert sum(samples) == step * 8
        for n, got in zip(WEIGHTS, samples, strict=True):
            assert abs(got - step * 8 * WEIGHTS[n]) <= 0.5 + 1.5 * WEIGHTS[n] + 1e-9, (step, n, got)
    metrics = json.loads((runs["ref"] / "metrics.json").read_text())
    assert metrics["tokens_by_source"] == {n: int(rows[-1][c]) for n, c in zip(WEIGHTS, cols, strict=True)}
    assert set(metrics["val_loss_by_source"]) == set(WEIGHTS)
    vheader, vrows = _rows(runs["ref"] / "val_log.tsv")
    assert vheader == ["step", "val_loss"] + [f"val_loss/{n}" for n in WEIGHTS] and len(vrows) == 2
    overall = sum(WEIGHTS[n] * float(vrows[-1][vheader.index(f"val_loss/{n}")]) for n in WEIGHTS)
    assert abs(float(vrows[-1][1]) - overall) < 1e-9
    summary = (runs["root"] / "ref.stderr").read_text()
    assert "window_start document" in summary and "passes" in summary
    for n, w in WEIGHTS.items():
        assert re.search(rf"\n\s+{n}\s+[\d,]+\s+[\d,]+\s+{w:.3f}\s+[\d.e-]+\n", summary), summary


def test_two_processes_and_resume_give_the_same_curve(runs):
    def losses(name):
        header, rows = _rows(runs[name] / "train_log.tsv")
        return [float(r[header.index("loss")]) for r in rows]

    ref = losses("ref")
    assert max(abs(a - b) for a, b in zip(ref, losses("procs2"), strict=True)) <= 1e-5
    header, ref_rows = _rows(runs["ref"] / "train_log.tsv")
    keep = [i for i, c in enumerate(header) if c != "tokens_per_s"]
    _, resumed_rows = _rows(runs["resumed"] / "train_log.tsv")
    assert [[r[i] for i in keep] for r in resumed_rows] == [[r[i] for i in keep] for r in ref_rows]


def test_checkpoint_records_sources_and_bits_per_byte_and_the_card_shows_them(runs, store, tiny_store, tmp_path):
    import math

    from pipeline.checkpoint.format import load_checkpoint, model_from_checkpoint
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluate.scoring import score_tokens, token_byte_lengths
    from pipeline.export.exporter import export_hf

    state = load_checkpoint(runs["ref"] / "ckpt.pth")
    header, rows = _rows(runs["ref"] / "train_log.tsv")
    recorded, metrics = state["data"]["sources"], state["metrics"]
    assert list(recorded) == list(WEIGHTS)
    for n, w in WEIGHTS.items():
        assert recorded[n]["weight"] == w
        assert recorded[n]["tokens_trained"] == int(rows[-1][header.index(f"tokens/{n}")])
    assert sum(e["tokens_trained"] for e in recorded.values()) == metrics["tokens_seen"]

    # Training's validation at the last step is the scorer's on the saved weights (eval_batches 1 × micro 4).
    model, opened = model_from_checkpoint(state).eval(), open_store(store)
    lengths = token_byte_lengths(load_tokenizer(tiny_store.tokenizer)[0], model.config.vocab_size)
    scores = {n: score_tokens(model, opened.sources[n].val.tokens, 32, 4, 4, byte_lengths=lengths,
                              bos_id=opened.bos_id) for n in WEIGHTS}
    for n, score in scores.items():
        assert metrics["val_bits_per_byte_by_source"][n] == pytest.approx(score.bits_per_byte, rel=1e-5)
    bytes_per_token = sum(WEIGHTS[n] * s.bytes / s.tokens for n, s in scores.items())
    assert metrics["val_bits_per_byte"] == pytest.approx(metrics["val_loss"] / (math.log(2) * bytes_per_token),
                                                         rel=1e-12)
    assert metrics["val_bits_per_byte"] == pytest.approx(
        sum(WEIGHTS[n] * s.loss for n, s in scores.items()) / (math.log(2) * bytes_per_token), rel=1e-5)

    card = (export_hf(state, tmp_path / "export") / "README.md").read_text()
    assert "pretrained only" in card
    assert f"| val bits per byte | {metrics['val_bits_per_byte']:.4f} |" in card
    assert f"| final val loss (nats/token) | {metrics['val_loss']:.4f} |" in card
    for n, w in WEIGHTS.items():
        e = recorded[n]
        row = (f"| {n} | {w:.3f} | {e['tokens_trained']:,} | {e['train_tokens']:,} | "
               f"{metrics['val_loss_by_source'][n]:.4f} | {metrics['val_bits_per_byte_by_source'][n]:.4f} |")
        assert row in card, card



# ---------------------------------------------------------------------------
# Which sources a run reads: data.sources, or while that is the shipped default the store's own
# ---------------------------------------------------------------------------


def test_shipped_default_reads_the_stores_own_sources_until_params_name_one(store):
    from pipeline.data.sources import parse_sources
    from pipeline.params import load_params
    from pipeline.train.run_data import open_train_data, source_weights

    repo = Path(__file__).resolve().parents[1]
    assert source_weights(load_params(repo / "params.yaml")).shipped  # the shipped file is the rule's default
    tp = load_params(None, ["train.seq_len=32"]).train
    notes = []
    # data.sources as shipped (sample alone) and a store without sample: its own sources, at equal weights.
    data = open_train_data(store, source_weights(load_params(None)), tp, notes.append)
    assert data.names == ["one", "other", "three"] and data.weights == [1.0, 1.0, 1.0]
    assert len(notes) == 1 and "sources one, other, three" in notes[0] and "shipped default" in notes[0]
    assert "(chosen by the shipped-default rule" in data.summary(10, 8)

    # Named on the command line, without a path (the store holds it): params win, silently.
    notes.clear()
    named = load_params(None, ["data.sources.other.weight=1", "data.sources.sample.weight=0"])
    data = open_train_data(store, source_weights(named), tp, notes.append)
    assert data.names == ["other"] and "(chosen by data.sources)" in data.summary(10, 8)
    assert not any("shipped" in n for n in notes)
    # Any change to the shipped entry is a choice too: sample is then required.
    with pytest.raises(UserError, match="no source sample in the store"):
        open_train_data(store, source_weights(load_params(None, ["data.sources.sample.weight=0.5"])), tp, print)
    # Reading raw text still needs the path, and says so.
    with pytest.raises(UserError, match=r"data.sources.other.path: .*training needs only the name"):
        parse_sources(named.data.sources, "text")


def test_an_entry_naming_another_text_field_than_the_store_used_is_refused(store):
    from pipeline.params import load_params
    from pipeline.train.run_data import open_train_data, source_weights

    sets = ["train.seq_len=32", "data.sources.other.weight=1", "data.sources.sample.weight=0"]
    tp = load_params(None, sets).train
    open_train_data(store, source_weights(load_params(None, [*sets, "data.sources.other.text_field=text"])), tp, print)
    with pytest.raises(UserError, match=r"data.sources.other.text_field: 'body', but .*other.* tokenized from 'text'"):
        open_train_data(store, source_weights(load_params(None, [*sets, "data.sources.other.text_field=body"])), tp,
                        print)


def test_mm_eval_scores_each_source_and_the_weighted_mix(runs, store):
    import math

    from conftest import mm

    root = runs["root"]
    out = root / "eval-mix.json"
    r = mm("eval", runs["ref"] / "ckpt.pth", "--data", store, "--out", out, "--seq-len", 32, "--params",
           root / "params.yaml", "--set", "eval.batches=1", "--set", "eval.batch_size=4", "--device", "cpu", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    by_source = result["by_source"]
    assert list(by_source) == list(WEIGHTS) and all(by_source[n]["weight"] == w for n, w in WEIGHTS.items())
    assert result["val_loss"] == pytest.approx(sum(w * by_source[n]["val_loss"] for n, w in WEIGHTS.items()))
    bytes_per_token = sum(w * by_source[n]["bytes"] / by_source[n]["tokens"] for n, w in WEIGHTS.items())
    assert result["bits_per_byte"] == pytest.approx(result["val_loss"] / (math.log(2) * bytes_per_token))
    assert result["tokens"] == sum(s["tokens"] for s in by_source.values())
    assert re.search(r"│ mix +│ +1 │", r.stdout) and all(re.search(rf"│ {n} +│", r.stdout) for n in WEIGHTS)
    # One source named alone scores exactly what the mix reported for it.
    alone = root / "eval-one.json"
    r = mm("eval", runs["ref"] / "ckpt.pth", "--data", store, "--out", alone, "--seq-len", 32, "--params",
           root / "params.yaml", "--set", "eval.batches=1", "--set", "eval.batch_size=4", "--device", "cpu",
           "--set", "data.sources.three.weight=0", "--set", "data.sources.one.weight=0", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(alone.read_text())
    assert list(one["by_source"]) == ["other"] and one["val_loss"] == by_source["other"]["val_loss"]
    assert one["bits_per_byte"] == pytest.approx(by_source["other"]["bits_per_byte"], rel=1e-12)
