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
                tokens/NAME in train_log.tsv equal to the samples the run was handed (recorded by the
                sampler, MM_RECORD_WINDOWS) and within a sample of the weights at every step, the same
                figures in metrics.json, val_loss per source and overall (their weighted mean), the
                summary table; two processes give the same per-step losses (1e-5, fp32) and a run
                stopped halfway and resumed gives the identical log rows
  model card    the checkpoint records each source's weight and tokens trained on (= train_log.tsv's)
                and val bits per byte, per source (= the scorer of `mm eval` on the saved weights) and
                overall; the exported README.md shows those figures
  properties    (Hypothesis) any weights, source sizes, segments and resume points: exact shares at
                every prefix, every window once per pass across segment boundaries, a resume equal to
                a straight run, changed weights continuing each source, phases exact within each
  phases        data.phases 0.9/0.1 then 0.3/0.7 for the last 20%: per-phase tokens exactly the weights
                (counted from the record), a kill -9 inside the save at the boundary resumed to the
                identical curve; weights changed at a resume (--allow-data-change, refused without):
                tokens/NAME, metrics.json and the checkpoint equal the recorded windows, no window twice
                in a pass; `mm eval` scores a document-attention checkpoint as its validation did
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.mixture import Schedule, Segment, phase_segments, resumed
from pipeline.data.sampler import Mixture, MixtureSampler, SourceSplit
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
    recording = mm_env(OMP_NUM_THREADS="1", MM_RECORD_WINDOWS=str(root / "ref.windows"))  # what ref trained on
    procs = {
        "ref": train("ref", "--set", "train.accumulation_steps=2"),
        "procs2": train("procs2", "--procs", "2", "--master-port", str(_free_port())),
        "resumed": train("resumed", "--set", "train.accumulation_steps=2", "--set", "train.stop_after=12"),
    }
    started = {k: subprocess.Popen(c, cwd=root, env=recording if k == "ref" else env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
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
    records = _recorded(runs["root"] / "ref.windows")  # the samples training was handed, counted apart
    assert [g for _, g, _, _ in records] == list(range(STEPS * 8))
    for row in rows:  # every step: each source within ½ + K·w/2 samples of its share
        step = int(row[0])
        samples = [int(row[c]) // 32 for c in cols]
        trained = _tally(records, step)
        assert samples == [trained.get(n, 0) for n in WEIGHTS] and [int(row[c]) % 32 for c in cols] == [0, 0, 0]
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
                              doc_offsets=opened.sources[n].val.doc_offsets) for n in WEIGHTS}
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
# The mixture sampler's properties (Hypothesis): any weights, source sizes, segments, resume points
# ---------------------------------------------------------------------------

PROPERTY = settings(max_examples=50, deadline=None)
weight_lists = st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda ws: sum(ws) > 0)


def _sampler(sizes: list[int], names: list[str] | None = None) -> MixtureSampler:
    """Stream windows of seq_len 2 over sources of `sizes` windows (ids are positions: no storage)."""
    names = names or [f"s{k}" for k in range(len(sizes))]
    return MixtureSampler([SourceSplit(n, 1.0, np.arange(2 * size + 1), None) for n, size in zip(names, sizes,
                                                                                                 strict=True)],
                          seq_len=2, seed=7)


@st.composite
def schedules(draw, max_sources: int = 3) -> tuple[Schedule, list[int]]:
    """A schedule of 1-3 segments over up to `max_sources` sources, and the sources' window counts."""
    k = draw(st.integers(1, max_sources))
    names = [f"s{i}" for i in range(k)]
    starts = [0, *sorted(set(draw(st.lists(st.integers(1, 80), max_size=2))))]
    segments = []
    for start in starts:
        ws = draw(st.lists(st.integers(0, 5), min_size=k, max_size=k).filter(lambda w: sum(w) > 0))
        segments.append(Segment(start, tuple(zip(names, map(float, ws), strict=True))))
    sizes = draw(st.lists(st.integers(1, 12), min_size=k, max_size=k))
    return Schedule(segments), sizes


@PROPERTY
@given(weight_lists, st.integers(0, 400))
def test_property_shares_are_exact_at_every_prefix(weights, n):
    """One segment: after any n samples each source holds n·w within ½ + K·w/2, and counts == the order."""
    schedule = Schedule([Segment(0, tuple((f"s{k}", float(w)) for k, w in enumerate(weights)))])
    counts = schedule.counts(n)
    total = sum(weights)
    for k, w in enumerate(weights):
        assert abs(counts.get(f"s{k}", 0) - n * w / total) <= 0.5 + len(weights) * (w / total) / 2 + 1e-9
    source, _ = schedule.locate(np.arange(n))
    assert {name: int((source == i).sum()) for i, name in enumerate(schedule.names)} == counts


@PROPERTY
@given(schedules(), st.integers(1, 200))
def test_property_every_window_once_per_pass_across_segments(drawn, n):
    """Within-source indices run 0, 1, 2, ... with no gap or repeat across segment boundaries, so each
    pass over a source visits each of its windows exactly once."""
    schedule, sizes = drawn
    sampler = _sampler(sizes)
    sampler.set_schedule(schedule)
    named, within = schedule.locate(np.arange(n))
    sources, windows = sampler.window_ids(0, n)
    counts = schedule.counts(n)
    for k, name in enumerate(sampler.names):
        if name not in schedule.names:
            continue
        assert within[named == schedule.names.index(name)].tolist() == list(range(counts[name]))
        seen = windows[sources == k].tolist()
        for p in range(0, len(seen), sizes[k]):
            visit = seen[p : p + sizes[k]]
            assert len(set(visit)) == len(visit)  # a full pass is a permutation, a partial one has no repeat
            if len(visit) == sizes[k]:
                assert sorted(visit) == list(range(sizes[k]))


@PROPERTY
@given(schedules(), st.integers(0, 150), st.integers(1, 4))
def test_property_resume_at_any_step_equals_a_straight_run(drawn, step, batch):
    """A fresh sampler whose schedule is the checkpoint's segments + the same plan (mixture.resumed)
    reads exactly what the straight run reads from that step on, and counts the same."""
    schedule, sizes = drawn
    straight = _sampler(sizes)
    straight.set_schedule(schedule)
    fresh = _sampler(sizes)
    fresh.set_schedule(Schedule(resumed(schedule.segments, schedule.segments, step * batch)))
    assert fresh.schedule.segments == schedule.segments
    for s in (step, step + 1, step + 7):
        a, b = straight.window_ids(s * batch, batch), fresh.window_ids(s * batch, batch)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert fresh.samples_per_source(step * batch) == straight.samples_per_source(step * batch)


@PROPERTY
@given(schedules(max_sources=2), st.integers(1, 120), weight_lists.filter(lambda ws: len(ws) == 2))
def test_property_changed_weights_continue_each_source(drawn, at, new):
    """Resume at `at` with other weights: the samples before `at` are the checkpoint's, each source then
    continues from its consumed position (no window repeated or skipped), and the counts after `at`
    follow the new weights from `at` on."""
    schedule, sizes = drawn
    names = [f"s{i}" for i in range(len(sizes))]
    plan = [Segment(0, tuple(zip(names, map(float, new[: len(names)]), strict=False)))]
    if sum(new[: len(names)]) == 0:
        return
    after = Schedule(resumed(schedule.segments, plan, at))
    before_counts = schedule.counts(at)
    assert after.counts(at) == {n: before_counts.get(n, 0) for n in after.names}
    named_a, within_a = schedule.locate(np.arange(at))
    named_b, within_b = after.locate(np.arange(at))
    assert [schedule.names[i] for i in named_a] == [after.names[i] for i in named_b]
    assert np.array_equal(within_a, within_b)
    named, within = after.locate(np.arange(at + 60))
    for i in range(len(after.names)):
        assert within[named == i].tolist() == list(range(int((named == i).sum())))
    fresh = Schedule(plan).counts(60)
    if after.segments[-1].start == at:  # the new weights start their own exact order at `at`
        assert {n: after.counts(at + 60).get(n, 0) - after.counts(at).get(n, 0) for n in fresh} == fresh


@PROPERTY
@given(st.integers(5, 60), st.sampled_from([0.5, 0.8, 0.25]), st.integers(1, 6))
def test_property_phases_have_exact_shares_within_each_phase(total, until, batch):
    """data.phases: the boundary is the nearest step to until · total; each phase's counts are its own
    mixture's from its own start (exact: 9:1 of every 10 samples, 3:7 of every 10)."""
    phases = [{"until": until, "weights": {"a": 0.9, "b": 0.1}}, {"until": 1.0, "weights": {"a": 0.3, "b": 0.7}}]
    schedule = Schedule(phase_segments(phases, ["a", "b"], total, batch))
    boundary = int(until * total + 0.5) * batch
    assert [s.start for s in schedule.segments] == [0, boundary]
    first, end = schedule.counts(boundary), schedule.counts(total * batch)
    second = {n: end[n] - first[n] for n in end}
    n2 = total * batch - boundary
    assert first == dict(zip("ab", Mixture([0.9, 0.1]).counts(boundary), strict=True))
    assert second == dict(zip("ab", Mixture([0.3, 0.7]).counts(n2), strict=True))
    if boundary % 10 == 0 and n2 % 10 == 0:
        assert first == {"a": boundary * 9 // 10, "b": boundary // 10}
        assert second == {"a": n2 * 3 // 10, "b": n2 * 7 // 10}


# ---------------------------------------------------------------------------
# Phases, a kill across their boundary, and weights changed at a resume (real runs)
# ---------------------------------------------------------------------------

PHASES = [{"until": 0.8, "weights": {"three": 0.9, "other": 0.1}},
          {"until": 1.0, "weights": {"three": 0.3, "other": 0.7}}]
PHASE_STEPS, BATCH = 20, 10  # the boundary at step 16 = global sample 160; 10 samples a step


@pytest.fixture(scope="module")
def phased(store, tiny_store, tmp_path_factory) -> dict:
    """Runs of 20 steps over sources `three` and `other` with document attention, every one recording
    the windows it trained on (MM_RECORD_WINDOWS):
      straight  data.phases 0.9/0.1 then 0.3/0.7 for the last 20%
      killed    the same, SIGKILLed inside the save of step 16 (so it resumes from 12, across the boundary)
      changed   weights 0.6/0.4 for 10 steps (train.stop_after), then resumed with 0.1/0.9; a resume
                without --allow-data-change is refused first"""
    import subprocess
    import sys

    from conftest import mm, mm_env

    root = tmp_path_factory.mktemp("phases")
    sources = {n: {"path": "unused.jsonl", "weight": 1.0} for n in ("three", "other")}
    (root / "phases.yaml").write_text(json.dumps({"data": {"sources": sources, "phases": PHASES}}))
    for name, w in (("before", {"three": 0.6, "other": 0.4}), ("after", {"three": 0.1, "other": 0.9})):
        changed = {n: {"path": "unused.jsonl", "weight": w[n]} for n in sources}
        (root / f"{name}.yaml").write_text(json.dumps({"data": {"sources": changed}}))
    done = mm("config", "--tokenizer", tiny_store.tokenizer, "--out", root / "model.json", "--set", "model.dim=32",
              "--set", "model.n_layers=1", cwd=root)
    assert done.returncode == 0, done.stderr

    def train(name: str, params: str, *extra: str) -> list[str]:
        sets = ["seq_len=32", "micro_batch_size=5", "accumulation_steps=2", f"max_steps={PHASE_STEPS}", "dtype=fp32",
                "eval_interval=10", "eval_batches=1", "save_interval=4", "log_interval=4", "warmup_steps=2",
                "seed=3", "attention=document", f"out_dir={root / name}"]
        cmd = [sys.executable, "-m", "stages.cli", "train", "--data", str(store), "--tokenizer",
               str(tiny_store.tokenizer), "--model", str(root / "model.json"), "--device", "cpu",
               "--params", str(root / f"{params}.yaml")]
        return cmd + [a for s in sets for a in ("--set", f"train.{s}")] + list(extra)

    def env(name: str, **extra: str) -> dict:
        return mm_env(OMP_NUM_THREADS="1", MM_RECORD_WINDOWS=str(root / f"{name}.windows"), **extra)

    first = {"straight": (train("straight", "phases"), env("straight")),
             "killed": (train("killed", "phases"), env("killed", MM_INJECT_SAVE_FAULT="16:kill")),
             "changed": (train("changed", "before", "--set", "train.stop_after=10"), env("changed"))}
    started = {k: subprocess.Popen(c, cwd=root, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k, (c, e) in first.items()}
    results = {k: p.communicate(timeout=600) for k, p in started.items()}
    assert started["straight"].returncode == 0, results["straight"][1][-3000:]
    assert started["changed"].returncode == 0, results["changed"][1][-3000:]
    assert started["killed"].returncode == -9, results["killed"][1][-3000:]

    def again(name: str, params: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(train(name, params, *extra), cwd=root, env=env(name), capture_output=True, text=True,
                              timeout=600)

    out = {"root": root, "straight_stderr": results["straight"][1], "killed": again("killed", "phases"),
           "refused": again("changed", "after"), "changed": again("changed", "after", "--allow-data-change")}
    return out


def _recorded(path: Path) -> list[tuple[int, int, str, int]]:
    """(step, global sample, source, window) of every sample handed to training, in sample order."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return sorted((int(s), int(g), n, int(w)) for s, g, n, w in rows)


def _tally(records, until_step: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step, _, name, _ in records:
        if step < until_step:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_phases_give_exact_shares_in_each_phase(phased):
    root = phased["root"]
    records = _recorded(root / "straight.windows")
    assert [g for _, g, _, _ in records] == list(range(PHASE_STEPS * BATCH))  # each sample once, in order
    first, total = _tally(records, 16), _tally(records, PHASE_STEPS)
    assert first == {"three": 144, "other": 16}  # 160 samples at 0.9/0.1
    assert {n: total[n] - first[n] for n in total} == {"three": 12, "other": 28}  # 40 samples at 0.3/0.7
    header, rows = _rows(root / "straight" / "train_log.tsv")
    for row in rows:  # tokens/NAME at every step = 32 × the samples the run was handed
        trained = _tally(records, int(row[0]))
        assert {n: int(row[header.index(f"tokens/{n}")]) for n in total} == {n: 32 * trained.get(n, 0) for n in total}
    metrics = json.loads((root / "straight" / "metrics.json").read_text())
    assert metrics["tokens_by_source"] == {n: 32 * c for n, c in total.items()}
    from pipeline.checkpoint.format import load_checkpoint

    data = load_checkpoint(root / "straight" / "ckpt.pth")["data"]
    assert [s["start"] for s in data["segments"]] == [0, 160]
    assert {n: e["tokens_trained"] for n, e in data["sources"].items()} == metrics["tokens_by_source"]
    assert "mixture by segment: three=0.9 other=0.1; from sample 160: three=0.3 other=0.7" in phased["straight_stderr"]


def test_kill9_across_the_phase_boundary_resumes_identically(phased):
    root = phased["root"]
    r = phased["killed"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {root / 'killed' / 'step_00000012.pth'} at step 12" in r.stderr, r.stderr[-3000:]
    header, straight = _rows(root / "straight" / "train_log.tsv")
    _, killed = _rows(root / "killed" / "train_log.tsv")
    keep = [i for i, c in enumerate(header) if c != "tokens_per_s"]
    assert [[x[i] for i in keep] for x in killed] == [[x[i] for i in keep] for x in straight]
    # The samples trained after the resume are the straight run's (the killed steps 13-16 were redone).
    redone = {(g, n, w) for s, g, n, w in _recorded(root / "killed.windows") if s >= 12}
    assert redone == {(g, n, w) for s, g, n, w in _recorded(root / "straight.windows") if s >= 12}


def test_changed_weights_continue_each_source_and_count_what_was_trained(phased, store):
    from conftest import assert_user_error

    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.data.sampler import Windows

    assert_user_error(phased["refused"], "data_mixture", "--allow-data-change", alone=False)
    r = phased["changed"]
    assert r.returncode == 0, r.stderr[-3000:]
    root = phased["root"]
    records = _recorded(root / "changed.windows")
    # The record holds steps 0-9 (first invocation), nothing from the refused one, then 10-19.
    assert [g for _, g, _, _ in records] == list(range(PHASE_STEPS * BATCH))
    before, total = _tally(records, 10), _tally(records, PHASE_STEPS)
    assert before == {"three": 60, "other": 40}
    assert {n: total[n] - before[n] for n in total} == {"three": 10, "other": 90}  # the new weights, exactly
    header, rows = _rows(root / "changed" / "train_log.tsv")
    assert {n: int(rows[-1][header.index(f"tokens/{n}")]) for n in total} == {n: 32 * c for n, c in total.items()}
    metrics = json.loads((root / "changed" / "metrics.json").read_text())
    assert metrics["tokens_by_source"] == {n: 32 * c for n, c in total.items()}
    state = load_checkpoint(root / "changed" / "ckpt.pth")
    assert {n: e["tokens_trained"] for n, e in state["data"]["sources"].items()} == metrics["tokens_by_source"]
    assert [s["start"] for s in state["data"]["segments"]] == [0, 100]
    from pipeline.export.exporter import export_hf

    card = (export_hf(state, root / "changed-export") / "README.md").read_text()
    assert "The weights changed during training" in card and "from sample 100: three=0.1 other=0.9" in card
    for n, c in total.items():
        assert f"| {n} | {state['data']['sources'][n]['weight']:.3f} | {32 * c:,} |" in card, card
    # No window twice within a pass: each source's windows, in the order trained, repeat only after
    # all of that source's windows were visited.
    opened = open_store(store, sources=["three", "other"])
    for name in total:
        split = opened.sources[name].train
        n = Windows(split.tokens, split.doc_offsets, 32).n_windows
        seen = [w for _, _, src, w in records if src == name]
        for p in range(0, len(seen), n):
            assert len(set(seen[p : p + n])) == len(seen[p : p + n]), name


def test_mm_eval_scores_a_document_attention_model_as_validation_does(phased, store):
    from conftest import mm

    root = phased["root"]
    out = root / "eval.json"
    r = mm("eval", root / "straight" / "ckpt.pth", "--data", store, "--out", out, "--seq-len", 32, "--params",
           root / "phases.yaml", "--set", "eval.batches=1", "--set", "eval.batch_size=5", "--device", "cpu", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    by_source = json.loads(out.read_text())["by_source"]
    metrics = json.loads((root / "straight" / "metrics.json").read_text())
    for name, loss in metrics["val_loss_by_source"].items():  # training's validation at step 20 (fp32)
        assert by_source[name]["val_loss"] == pytest.approx(loss, rel=1e-5), name


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
    assert notes == [f"note: {store} also holds one, three (not in data.sources): not read"]
    notes.clear()
    open_train_data(store, source_weights(load_params(None, ["data.sources.other.weight=1", "data.sources.one.weight=0",
                                                             "data.sources.sample.weight=0"])), tp, notes.append)
    assert notes == [f"note: {store} also holds three (not in data.sources); one (weight 0): not read"]
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
