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

    display = Display(total_steps=2, start_step=0, log_interval=1, enabled=True)
    display.step(1, 5.0, 1e-3, 1.0, 1000.0, 0.5)
    display.val_loss = 4.5
    display.step(2, 4.9, 1e-3, 1.0, 1000.0, 0.5)
    first, second = capsys.readouterr().err.strip().splitlines()
    assert "val" not in first and "nan" not in first
    assert "val 4.5000" in second
    assert "MFU 50.0% vs measured matmul peak" in first


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
