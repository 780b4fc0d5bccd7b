"""Shared fixtures.

`tiny_store` (session scope) builds the real data chain once, in a temporary
directory, through the pipeline API:

    corpus     data/sample.jsonl equivalent: Python stdlib docstrings (~2 MB)
    tokenizer  byte-level BPE dir, vocab 1024, special ids pad 0 / bos 1 / eos 2
    store      tokens.zarr of the corpus (val_fraction 0.05, one worker)

It returns a `TinyData` with those three paths plus `root`. Treat them as
read-only: copy before altering.

Helpers for running the CLI (import them: `from conftest import mm, ...`):

    mm(*args)                  the `mm` CLI of this checkout in a subprocess
    mm_env(**extra)            its environment: this checkout importable, no MM_INJECT_* left over
    assert_user_error(r, ...)  exit 1 with one `error:` line naming every needle, no traceback
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mm_env(**extra: str) -> dict:
    """Environment for an `mm` subprocess: this checkout first on the path, no fault injection inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MM_INJECT_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def mm(*args, cwd=None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `mm` CLI (the console script's entry point) from this checkout."""
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env or mm_env(), timeout=timeout)


def assert_user_error(r: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> str:
    """Exit 1, one `error: ` line holding every needle, no traceback; returns that line.

    alone=False allows other lines on stderr (warnings printed before the error)."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and (len(lines) == 1 or not alone), r.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@dataclass(frozen=True)
class TinyData:
    root: Path
    corpus: Path
    tokenizer: Path
    store: Path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> TinyData:
    from pipeline.data.corpus import write_sample
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "sample.jsonl"
    write_sample(corpus)
    train_tokenizer([corpus], root / "tokenizer", vocab_size=1024)
    tokenize_files([corpus], root / "tokenizer", root / "tokens.zarr", workers=1,
                   val_fraction=0.05, progress=False)
    return TinyData(root=root, corpus=corpus, tokenizer=root / "tokenizer", store=root / "tokens.zarr")
