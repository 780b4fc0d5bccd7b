"""`dvc repro` of the real dvc.yaml, in a fresh copy of the project.

One test walks the whole story, because each `dvc repro` costs real training:
first run → up to date (plain `dvc status`, every pipeline file) → the user's
own data tokenized from the command line is what `mm train` and `mm eval` read
→ a param change reruns exactly its stages → new data reruns from the
tokenizer on → metrics and plots render → a source added without text_field
runs to the end and `mm eval` scores it, the other and the mix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import mm

from pipeline.train.progress import read_log

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = {"sample", "tokenizer", "store", "tokenize@sample", "config", "train", "export", "eval"}
GIT_ID = {"GIT_AUTHOR_NAME": "mm", "GIT_AUTHOR_EMAIL": "mm@example.com",
          "GIT_COMMITTER_NAME": "mm", "GIT_COMMITTER_EMAIL": "mm@example.com"}


def _copy_project(dest: Path) -> None:
    """The project's files as they are in the working tree (tracked, and new ones git does not ignore:
    the code `mm` runs is this checkout's): what a fresh clone would hold. Never a dvc.lock."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("tests/") or name.endswith("dvc.lock") or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)


def _shrink_params(path: Path, **train) -> None:
    """The repo's params.yaml with a model and run small enough for a test."""
    p = yaml.safe_load(path.read_text())
    p["tokenizer"]["vocab_size"] = 512
    p["model"].update(dim=64, n_layers=2)
    p["train"].update(max_steps=8, seq_len=64, micro_batch_size=8, warmup_steps=2,
                      eval_interval=4, save_interval=8, log_interval=4, **train)
    p["eval"].update(batches=2, batch_size=4)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def _set_params(project: Path, change) -> None:
    p = yaml.safe_load((project / "params.yaml").read_text())
    change(p)
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _dvc(project: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ID, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_repro_reruns_exactly_what_changed(tmp_path):
    project = tmp_path / "project"
    _copy_project(project)
    _shrink_params(project / "params.yaml")
    env = {**os.environ, **GIT_ID}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "fresh"], cwd=project, check=True, env=env)

    # 1. The whole chain runs; then everything is up to date and a second repro does nothing.
    assert _ran(_dvc(project, "repro")) == ALL_STAGES
    for out in ["data/sample.jsonl", "data/tokenizer/tokenizer.json", "data/tokens.zarr/zarr.json",
                "data/tokens.zarr/sample/part-00000-of-00001/zarr.json", "data/model.json",
                "out/ckpt.pth", "out/loss.png", "export/model.safetensors", "out/eval.json"]:
        assert (project / out).exists(), out
    # The optional bench stage (bench/dvc.yaml) is not part of a plain `dvc repro`, and while
    # params.yaml's bench.stages is empty it does not exist: plain `dvc status`, which reads every
    # pipeline file, is clean, and `dvc metrics show` has no out/bench.json to fail on.
    assert not (project / "out" / "bench.json").exists()
    assert "Data and pipelines are up to date." in _dvc(project, "status")
    shown = _dvc(project, "metrics", "show")
    assert "out/eval.json" in shown and "bench" not in shown and "failed" not in shown.lower(), shown
    assert _ran(_dvc(project, "repro")) == set()
    _own_data_from_the_command_line(project)

    # A train key that once lived only as a code default (params.yaml now lists every key):
    # editing it makes training stale, and nothing upstream. `dvc status` runs nothing.
    before = (project / "params.yaml").read_text()
    _set_params(project, lambda p: p["train"].update(max_skips=3))
    stale = _dvc(project, "status", "dvc.yaml")
    stale_stages = {line[:-1] for line in stale.splitlines() if line[:1].strip() and line.endswith(":")}
    assert stale_stages == {"train"} and "params.yaml" in stale, stale  # DVC says: modified `train` section
    (project / "params.yaml").write_text(before)
    assert "up to date" in _dvc(project, "status", "dvc.yaml")

    # 2. Only train keys changed (lr, and the document attention and checkpointing modes, which
    #    train with them): train, export and eval rerun; nothing upstream does. The same for a
    #    source's weight: it is read by training alone.
    _shrink_params(project / "params.yaml", lr=0.002, attention="document", activation_checkpointing="blocks")
    assert _ran(_dvc(project, "repro")) == {"train", "export", "eval"}
    _set_params(project, lambda p: p["data"]["sources"]["sample"].update(weight=0.5))
    ran = _ran(_dvc(project, "repro"))  # one source: its normalised share is 1 whatever the weight, so an
    assert "train" in ran and ran <= {"train", "export", "eval"}  # identical checkpoint stops the chain there

    # 3. New raw data: everything from the tokenizer on reruns, the embedded corpus does not.
    other = project / "data" / "other.jsonl"
    lines = (project / "data" / "sample.jsonl").read_text().splitlines()
    other.write_text("\n".join(lines[::2]) + "\n")
    _set_params(project, lambda p: p["data"]["sources"]["sample"].update(path="data/other.jsonl"))
    assert _ran(_dvc(project, "repro")) == ALL_STAGES - {"sample"}

    # 4. Metrics and plots: the figures are there, and the loss fell.
    metrics = json.loads(_dvc(project, "metrics", "show", "--json", "out/metrics.json", "out/eval.json"))
    figures = next(iter(metrics.values()))["data"]
    train_metrics, eval_metrics = figures["out/metrics.json"]["data"], figures["out/eval.json"]["data"]
    for key in ("train_loss", "val_loss", "val_perplexity", "tokens_seen", "tokens_per_s"):
        assert train_metrics[key] is not None, key
    for key in ("val_loss", "perplexity", "bits_per_byte"):
        assert eval_metrics[key] > 0, key
    _dvc(project, "plots", "show")
    assert (project / "dvc_plots" / "index.html").stat().st_size > 0
    losses = [row["loss"] for row in read_log(project / "out" / "train_log.tsv")]
    assert losses[-1] < losses[0] - 0.2

    # 5. A new source, given as the README's shortest form (no text_field: data.text_field): its
    #    own tokenize stage runs; the tokenizer, the store root and the other source stay cached,
    #    and training is what it makes stale. The chain then runs to the end, and `mm eval` scores
    #    each source and the mix (the weighted mean, as training's validation).
    (project / "data" / "zh.jsonl").write_text("\n".join(lines[1::2]) + "\n")
    _set_params(project, lambda p: p["data"]["sources"].update(zh={"path": "data/zh.jsonl", "weight": 0.5}))
    assert _ran(_dvc(project, "repro", "tokenize@zh")) == {"tokenize@zh"}
    assert (project / "data/tokens.zarr/zh/part-00000-of-00001/zarr.json").is_file()
    stale = _dvc(project, "status")
    assert "train:" in stale and "tokenize@sample" not in stale and "tokenizer:" not in stale
    assert _ran(_dvc(project, "repro")) == {"train", "export", "eval"}
    assert "Data and pipelines are up to date." in _dvc(project, "status")
    assert set(json.loads((project / "out" / "metrics.json").read_text())["tokens_by_source"]) == {"sample", "zh"}
    scored = json.loads((project / "out" / "eval.json").read_text())
    by_source = scored["by_source"]
    assert list(by_source) == ["sample", "zh"] and [s["weight"] for s in by_source.values()] == [0.5, 0.5]
    assert scored["val_loss"] == pytest.approx((by_source["sample"]["val_loss"] + by_source["zh"]["val_loss"]) / 2)


def _own_data_from_the_command_line(project: Path) -> None:
    """With params.yaml's data.sources as shipped, `mm tokenize data/raw.jsonl` then `mm train` train on
    raw alone and say so; `mm export` and `mm eval` follow on it; naming sources on the command line
    (no path: the store holds them) decides instead. The store and out/ are put back afterwards."""
    shutil.copytree(project / "out", project / "out.dvc")  # DVC's run, put back at the end
    lines = (project / "data" / "sample.jsonl").read_text().splitlines()
    (project / "data" / "raw.jsonl").write_text("\n".join(lines[1::3]) + "\n")
    done = mm("tokenize", "data/raw.jsonl", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    # out/ holds the demo's run on sample: the run on the user's data starts fresh and moves it aside.
    done = mm("train", "--set", "train.max_steps=3", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starts fresh: moved it to" in done.stderr and list((project / "out" / "superseded").iterdir())
    assert "data: using the store's source raw" in done.stderr
    assert "(chosen by the shipped-default rule" in done.stderr and re.search(r"\n\s+raw\s+[\d,]+", done.stderr)
    assert set(json.loads((project / "out" / "metrics.json").read_text())["tokens_by_source"]) == {"raw"}
    for args in (["export", "ckpt.pth", "--out", "export-raw"],  # as typed: the run's ckpt.pth in out/
                 ["eval", "export-raw", "--out", "out/eval-raw.json", "--set", "eval.batches=1"]):
        done = mm(*args, cwd=project)
        assert done.returncode == 0, done.stderr[-3000:]
    assert list(json.loads((project / "out" / "eval-raw.json").read_text())["by_source"]) == ["raw"]
    # Sources named with --set, no path: params decide (sample left out by weight 0).
    done = mm("train", "--set", "train.max_steps=2", "--set", "train.out_dir=out-named", "--set",
              "data.sources.raw.weight=1", "--set", "data.sources.sample.weight=0", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(chosen by data.sources)" in done.stderr
    assert set(json.loads((project / "out-named" / "metrics.json").read_text())["tokens_by_source"]) == {"raw"}
    for path in ("data/tokens.zarr/raw", "export-raw", "out-named", "out"):
        shutil.rmtree(project / path)
    (project / "data" / "raw.jsonl").unlink()
    (project / "out.dvc").rename(project / "out")
    assert "Data and pipelines are up to date." in _dvc(project, "status")
