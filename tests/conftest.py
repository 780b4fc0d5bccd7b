"""Shared fixtures.

`tiny_store` (session scope) builds the real data chain once, in a temporary
directory, through the pipeline API:

    corpus     data/sample.jsonl equivalent: Python stdlib docstrings (~2 MB)
    tokenizer  byte-level BPE dir, vocab 1024, special ids pad 0 / bos 1 / eos 2
    store      tokens.zarr of the corpus (val_fraction 0.05, one worker)

It returns a `TinyData` with those three paths plus `root`. Treat them as
read-only: copy before altering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyData:
    root: Path
    corpus: Path
    tokenizer: Path
    store: Path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> TinyData:
    from pipeline.corpus import write_sample
    from pipeline.tokenize import tokenize_files
    from pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "sample.jsonl"
    write_sample(corpus)
    train_tokenizer([corpus], root / "tokenizer", vocab_size=1024)
    tokenize_files([corpus], root / "tokenizer", root / "tokens.zarr", workers=1,
                   val_fraction=0.05, progress=False)
    return TinyData(root=root, corpus=corpus, tokenizer=root / "tokenizer", store=root / "tokens.zarr")
