"""`dvc repro` of the real dvc.yaml, in a fresh copy of the project.

One test walks the whole story, because each `dvc repro` costs real training:
first run → up to date → a param change reruns exactly its stages → new data
reruns from the tokenizer on → metrics and plots render.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.train.progress import read_log

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = {"sample", "tokenizer", "store", "tokenize@sample", "config", "train", "export", "eval"}
GIT_ID = {"GIT_AUTHOR_NAME": "mm", "GIT_AUTHOR_EMAIL": "mm@example.com",
          "GIT_COMMITTER_NAME": "mm", "GIT_COMMITTER_EMAIL": "mm@example.com"}


def _copy_project(dest: Path) -> None:
    """The tracked files as they are in the working tree: what a fresh clone would hold."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("tests/") or not (REPO / name).is_file():
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
    # The optional bench stage (bench/dvc.yaml) is not part of a plain `dvc repro`.
    assert not (project / "out" / "bench.json").exists()
    assert "up to date" in _dvc(project, "status", "dvc.yaml")
    assert _ran(_dvc(project, "repro")) == set()

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

    # 5. A new source: its own tokenize stage runs; the tokenizer, the store root and the
    #    other source stay cached, and training is what it makes stale.
    extra = project / "data" / "extra.jsonl.gz"
    extra.write_bytes(gzip.compress("\n".join(lines[1::2]).encode() + b"\n"))
    _set_params(project, lambda p: p["data"]["sources"].update(
        extra={"path": "data/extra.jsonl.gz", "weight": 0.5, "text_field": "text"}))
    assert _ran(_dvc(project, "repro", "tokenize@extra")) == {"tokenize@extra"}
    assert (project / "data/tokens.zarr/extra/part-00000-of-00001/zarr.json").is_file()
    stale = _dvc(project, "status")
    assert "train:" in stale and "tokenize@sample" not in stale and "tokenizer:" not in stale
