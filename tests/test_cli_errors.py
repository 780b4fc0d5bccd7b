"""Mistakes a new user makes, tried as they would: each is one line naming what is wrong, never a traceback.

Plus the small pieces of arithmetic whose off-by-ones no message would show:
the learning-rate schedule's ends, the GPU peak table's name matching and the
progress line before the first evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_user_error, mm

REPO = Path(__file__).resolve().parents[1]


def test_unknown_preset_is_named_before_the_missing_tokenizer(tmp_path):
    assert_user_error(mm("config", "--preset", "nosuch", "--tokenizer", tmp_path / "none", cwd=tmp_path),
                      "--preset: unknown preset 'nosuch'", "minimind2")


def test_export_of_a_non_checkpoint_says_so_in_one_clause(tmp_path):
    params = REPO / "params.yaml"
    line = assert_user_error(mm("export", params, "--out", tmp_path / "export"),
                             f"{params}: not an mm checkpoint (not a zip archive")
    assert "weights_only" not in line and len(line) < 200


def test_tokenize_takes_a_tokenizer_json_file_and_names_a_bad_one(tiny_store, tmp_path):
    corpus = tmp_path / "small.jsonl"
    with open(tiny_store.corpus, encoding="utf-8") as f:
        corpus.write_text("".join(line for _, line in zip(range(50), f, strict=False)), encoding="utf-8")
    r = mm("tokenize", corpus, "--tokenizer", tiny_store.tokenizer / "tokenizer.json", "--out", tmp_path / "t.zarr",
           "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "t.zarr" / "zarr.json").is_file()

    bad = tmp_path / "some.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    assert_user_error(mm("tokenize", corpus, "--tokenizer", bad, "--out", tmp_path / "u.zarr"),
                      f"{bad}: not a readable tokenizer")


def test_gpus_0_is_the_cpu_spelling(tmp_path):
    r = mm("train", "--gpus", "0", "--dry-run")
    assert r.returncode == 0 and "(none: one process)" in r.stdout, r.stderr
    assert_user_error(mm("train", "--gpus", "0", "--device", "cuda", "--dry-run"), "--gpus 0 trains on the CPU")


def test_gpu_peak_table_matches_whole_names():
    from pipeline.hardware import datasheet_gpu

    assert datasheet_gpu("NVIDIA L40") == "L40" and datasheet_gpu("NVIDIA L40S") == "L40S"
    assert datasheet_gpu("NVIDIA L4") == "L4" and datasheet_gpu("NVIDIA A100-SXM4-80GB") == "A100"
    assert datasheet_gpu("NVIDIA A10G") is None  # not an A10: measured instead of guessed


def test_progress_line_shows_no_val_until_measured_and_names_the_peak(capsys):
    from pipeline.train.progress import Display

    display = Display(total_steps=3, start_step=0, log_interval=1, enabled=True)
    display.step(1, 5.0, 1e-3, 1.0, 1000.0, 0.5)
    display.evaluated(4.5)  # not the last step: its line was printed already
    display.step(2, 4.9, 1e-3, 1.0, 1000.0, 0.5)
    display.step(3, 4.8, 1e-3, 1.0, 1000.0, 0.5)
    display.evaluated(4.25)  # the last step: its line waits for this evaluation
    display.close()
    first, second, last = capsys.readouterr().err.strip().splitlines()
    assert "val" not in first and "nan" not in first
    assert "val 4.5000" in second
    assert last.startswith("step 3/3  loss 4.8000  val 4.2500")  # the final validation loss
    assert "MFU 50.0% vs measured matmul peak" in first

    display = Display(total_steps=1, start_step=0, log_interval=1, enabled=True)
    display.step(1, 5.0, 1e-3, 1.0, 1000.0, 0.5)
    display.close()  # no evaluation at the end: the held line is printed all the same
    assert capsys.readouterr().err.startswith("step 1/1  loss 5.0000  lr")


@pytest.mark.parametrize("warmup, total", [(2, 12), (0, 5), (5, 10), (3, 4)])
def test_lr_peaks_on_one_step_and_ends_at_min_lr(warmup, total):
    from pipeline.params import TrainParams
    from pipeline.train.optim import lr_at

    tp = TrainParams(lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    lrs = [lr_at(step, tp, total) for step in range(total)]
    assert lrs.count(max(lrs)) == 1 and max(lrs) == tp.lr
    assert lrs.index(tp.lr) == max(warmup - 1, 0)
    assert lrs[-1] == tp.min_lr  # exactly, at the last step
    peak = lrs.index(tp.lr)
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))  # decays all the way


# --------------------------------------------------------------------------- no silent success on empty input


def _renamed_field(tiny_store, path: Path, n: int, field: str = "body") -> Path:
    """The first n documents of the tiny corpus under another field name."""
    with open(tiny_store.corpus, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in rows), encoding="utf-8")
    return path


def test_tokenizer_and_tokenize_refuse_input_without_the_text_field(tiny_store, tmp_path):
    body = _renamed_field(tiny_store, tmp_path / "body.jsonl", 300)
    line = assert_user_error(mm("tokenizer", body, "--vocab-size", 300, "--out", tmp_path / "tok", cwd=tmp_path),
                             f"{body}: no usable text in field 'text'", "missing_field (300)", "--text-field")
    assert "Traceback" not in line and not (tmp_path / "tok").exists()
    store = tmp_path / "t.zarr"
    tokenize = ("tokenize", body, "--tokenizer", tiny_store.tokenizer, "--out", store, "--workers", 1)
    assert_user_error(mm(*tokenize, cwd=tmp_path), f"{body}: no usable text in field 'text'",
                      f"missing_field (300, first at {body.name}:1)")
    assert not list((store / "body").glob("part-*")) and not list((store / "body").glob(".*"))  # nothing published

    # The right field: no --force needed for either command.
    r = mm("tokenizer", body, "--vocab-size", 300, "--out", tmp_path / "tok", "--text-field", "body", cwd=tmp_path)
    assert r.returncode == 0 and "vocab 300" in r.stdout, r.stderr
    r = mm(*tokenize, "--text-field", "body", cwd=tmp_path)
    assert r.returncode == 0 and "kept 300, rejected 0" in r.stdout, r.stderr[-2000:]


def test_tokenizer_refuses_csv_json_arrays_empty_files_and_a_vocabulary_the_text_cannot_fill(tiny_store, tmp_path):
    (tmp_path / "a.csv").write_text("text,id\nhello world,1\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": "hello world"}] * 5) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    for name, needle in [("a.csv", "most often not_json (2"), ("a.json", "most often not_object (1"),
                         ("empty.jsonl", "no text at all")]:
        assert_user_error(mm("tokenizer", tmp_path / name, "--out", tmp_path / "tok", cwd=tmp_path),
                          f"{tmp_path / name}: ", needle)
    small = _renamed_field(tiny_store, tmp_path / "small.jsonl", 20, field="text")
    assert_user_error(mm("tokenizer", small, "--vocab-size", 50000, "--out", tmp_path / "tok", cwd=tmp_path),
                      f"{small}: the text ran out at a vocabulary of ", "of the 50,000 asked")
    assert not (tmp_path / "tok").exists()


def test_tokenize_refuses_a_part_whose_every_line_is_rejected(tiny_store, tmp_path):
    """Part 1 of 2 reads only the second half, where every line lacks the field; part 0 is fine."""
    good = _renamed_field(tiny_store, tmp_path / "good.jsonl", 200, field="text").read_text()
    bad = _renamed_field(tiny_store, tmp_path / "bad.jsonl", 200, field="body").read_text()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(good + bad, encoding="utf-8")
    store = tmp_path / "t.zarr"
    args = ("tokenize", mixed, "--tokenizer", tiny_store.tokenizer, "--out", store, "--workers", 1)
    assert_user_error(mm(*args, "--part", "1/2", cwd=tmp_path), f"{mixed} (part 1/2): no usable text in field 'text'",
                      "missing_field")
    assert mm(*args, "--part", "0/2", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (store / "mixed").glob("part-*")) == ["part-00000-of-00002"]


# --------------------------------------------------------------------------- small ones


@pytest.mark.parametrize("option, value, needle", [("--temperature", "-1", "--temperature -1.0: must be >= 0"),
                                                   ("--top-p", "0", "--top-p 0.0: must be in (0, 1]"),
                                                   ("--top-k", "-3", "--top-k -3: must be >= 0")])
def test_generate_names_a_bad_option_before_printing_anything(tmp_path, option, value, needle):
    r = mm("generate", tmp_path / "no-model", "Once upon a time", option, value)
    assert_user_error(r, needle)
    assert r.stdout == ""  # the prompt is not echoed before the error


def test_a_run_that_fails_at_start_up_leaves_no_empty_folder(tiny_store, tmp_path):
    out = tmp_path / "new" / "run"
    assert_user_error(mm("train", "--device", "cpu", "--data", tiny_store.store, "--tokenizer", tiny_store.tokenizer,
                         "--model", tmp_path / "missing.json", "--set", f"train.out_dir={out}", cwd=tmp_path),
                      "missing.json: model config not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither new/ nor new/run/ (nor its .lock)


def test_an_unknown_key_suggests_the_closest_known_one(tmp_path):
    from pipeline.errors import UserError
    from pipeline.params import load_params

    with pytest.raises(UserError, match=r"^--set: unknown key 'train.max_step'; did you mean 'train.max_steps'\?$"):
        load_params(REPO / "params.yaml", ["train.max_step=3"])
    with pytest.raises(UserError, match=r"unknown section 'trian'; did you mean 'train'\?"):
        load_params(REPO / "params.yaml", ["trian.max_steps=3"])
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("  max_steps:", "  max_stepz:", 1))
    with pytest.raises(UserError, match=r"unknown key 'train.max_stepz'; did you mean 'train.max_steps'\?"):
        load_params(bad)
    with pytest.raises(UserError, match=r"unknown key 'train.zzzq'$"):  # nothing close: no guess
        load_params(REPO / "params.yaml", ["train.zzzq=3"])


def test_train_checks_model_sets_as_mm_config_does_and_says_they_are_ignored():
    assert_user_error(mm("train", "--set", "model.preset=tinyy", "--dry-run"), "model.preset: unknown preset 'tinyy'")
    r = mm("train", "--set", "model.dim=64", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "note: --set model.dim: ignored by mm train, which reads the architecture from data/model.json" in r.stderr


def test_tokenize_of_every_source_publishes_none_when_one_has_no_usable_text(tiny_store, tmp_path):
    """`mm tokenize` with no inputs tokenizes every source in params: one without usable text stops it
    before any part is written, so the rerun after fixing it needs no --force for the others."""
    good = _renamed_field(tiny_store, tmp_path / "good.jsonl", 50, field="text")
    bad = _renamed_field(tiny_store, tmp_path / "bad.jsonl", 50, field="body")
    params = tmp_path / "params.yaml"
    two = f"    sample:\n      path: {good}\n    bad:\n      path: {bad}"
    params.write_text((REPO / "params.yaml").read_text().replace("    sample:\n      path: data/sample.jsonl", two, 1))
    store = tmp_path / "t.zarr"
    args = ("tokenize", "--tokenizer", tiny_store.tokenizer, "--out", store, "--workers", 1, "--params", params)
    assert_user_error(mm(*args, cwd=tmp_path), f"{bad}: no usable text in field 'text'", "missing_field (50")
    assert not store.exists()  # not even the good source's part (nor the store's root)
    r = mm(*args, "--set", "data.sources.bad.text_field=body", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.parent.name for p in store.glob("*/part-*")) == ["bad", "sample"]
