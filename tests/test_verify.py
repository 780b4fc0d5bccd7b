"""`mm verify`: a good store, checkpoint and export pass; one flipped byte in any of them fails, naming the file.

The checkpoint is a random-init 64-dim model saved through the real
save_checkpoint with the shared tiny_store's tokenizer; the export is that
checkpoint through the real export_hf. Everything is copied before damage.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, mm


def error_line(r) -> str:
    return assert_user_error(r)  # the table is on stdout; stderr holds the one line


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def artifacts(tiny_store, tmp_path_factory) -> dict[str, Path]:
    from pipeline.architecture import build_config
    from pipeline.checkpoint.format import save_checkpoint
    from pipeline.data.tokenizer import TOKENIZER_FILES, load_tokenizer
    from pipeline.export.exporter import export_hf
    from pipeline.model.transformer import Transformer

    root = tmp_path_factory.mktemp("verify")
    _, info = load_tokenizer(tiny_store.tokenizer)
    config = build_config("tiny", info["vocab_size"], {"dim": 64, "n_layers": 2})
    torch.manual_seed(0)
    files = {n: (tiny_store.tokenizer / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES
             if (tiny_store.tokenizer / n).is_file()}
    state = dict(format="mm-checkpoint", version=1, step=3, model=Transformer(config).state_dict(), optimizer={},
                 scaler=None, rng={}, model_config=dataclasses.asdict(config), train_config={},
                 data={"vocab_size": info["vocab_size"]}, tokenizer=files, metrics={"train_loss": 6.0})
    ckpt = save_checkpoint(state, root / "run", keep_last=1)
    export = export_hf(state, root / "export")
    return {"store": tiny_store.store, "checkpoint": ckpt, "run": root / "run", "export": export}


def test_verify_passes_good_store_checkpoint_and_export(artifacts):
    for kind in ("store", "checkpoint", "export"):
        r = mm("verify", artifacts[kind])
        assert r.returncode == 0, (kind, r.stdout, r.stderr)
        assert "BAD" not in r.stdout
    from pipeline.verify import verify

    kind, rows = verify(artifacts["run"])  # a run directory: each checkpoint in it
    assert kind == "run directory" and len(rows) == 2 and all(row.ok for row in rows)


def test_verify_names_the_flipped_chunk_file(artifacts, tmp_path):
    store = tmp_path / "tokens.zarr"
    shutil.copytree(artifacts["store"], store)
    chunk = store / "sample/part-00000-of-00001/val/tokens/c/0"
    flip(chunk, 100)  # the low byte of token 50: still a valid id, so only the recorded sha256 can tell
    line = error_line(mm("verify", store))
    assert line.startswith(f"error: {chunk}: sha256 differs"), line


def test_verify_names_the_flipped_checkpoint(artifacts, tmp_path):
    ckpt = tmp_path / "step_00000003.pth"
    shutil.copyfile(artifacts["checkpoint"], ckpt)
    flip(ckpt, ckpt.stat().st_size // 2)  # inside the tensor data
    line = error_line(mm("verify", ckpt))
    assert line.startswith(f"error: {ckpt}: "), line


def test_verify_names_the_flipped_safetensors_file(artifacts, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(artifacts["export"], export)
    weights = export / "model.safetensors"
    flip(weights, weights.stat().st_size - 100)  # a weight byte: the header still parses
    line = error_line(mm("verify", export))
    assert line.startswith(f"error: {weights}: ") and "SHA256SUMS" in line, line


def test_verify_checks_ids_and_offsets_in_process(artifacts, tmp_path):
    """Token id == vocab_size and a decreasing doc offset, each named by its file (no CLI: faster)."""
    from pipeline.verify import verify

    store = tmp_path / "tokens.zarr"
    shutil.copytree(artifacts["store"], store)
    tokens = np.memmap(store / "sample/part-00000-of-00001/train/tokens/c/0", dtype="<u2", mode="r+")
    tokens[7] = 1024  # the vocabulary size of the tiny tokenizer
    tokens.flush()
    bad = [row for row in verify(store)[1] if not row.ok]
    assert bad[0].path == store / "sample/part-00000-of-00001/train/tokens/c/0"
    assert "token id 1024 at position 7" in bad[0].detail

    store2 = tmp_path / "tokens2.zarr"
    shutil.copytree(artifacts["store"], store2)
    offsets = np.memmap(store2 / "sample/part-00000-of-00001/val/doc_offsets/c/0", dtype="<i8", mode="r+")
    offsets[2] = offsets[3] + 1  # document 2 now starts after document 3
    offsets.flush()
    bad = [row for row in verify(store2)[1] if not row.ok]  # the recorded chunk hash catches it first
    part = store2 / "sample/part-00000-of-00001"
    assert bad[0].path == part / "val/doc_offsets/c/0" and "sha256 differs" in bad[0].detail
    from pipeline.verify import _check_offsets  # and the offsets rule alone names the document

    row = _check_offsets(part / "val/doc_offsets", np.asarray(offsets), int(offsets[-1]))
    assert not row.ok and row.path == part / "val/doc_offsets" and "below" in row.detail


def _as_format1(part: Path, root: Path) -> Path:
    """A format-1 store (train/val at the root, as mm wrote before sources and parts) holding `part`'s arrays."""
    from pipeline.data.store.layout import ATTRS_CHECKSUM, attrs_checksum

    shutil.copytree(part, root)
    meta = json.loads((root / "zarr.json").read_text())
    old = meta["attributes"]
    attrs = {"format": old["format"], "version": 1, "dtype": old["dtype"], "tokenizer": old["tokenizer"],
             "text_field": old["text_field"], "val_fraction": old["val_fraction"], "sources": ["sample.jsonl"],
             "counts": old["counts"]}
    meta["attributes"] = {**attrs, ATTRS_CHECKSUM: attrs_checksum(attrs)}
    (root / "zarr.json").write_text(json.dumps(meta))
    return root


def test_verify_reads_a_format_1_store(artifacts, tmp_path):
    """A format-1 store passes (the docs list it); a token id out of range and counts that disagree with
    the arrays are named."""
    from pipeline.verify import verify

    part = artifacts["store"] / "sample/part-00000-of-00001"
    store = _as_format1(part, tmp_path / "v1.zarr")
    r = mm("verify", store)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "format 1" in r.stdout and "BAD" not in r.stdout
    kind, rows = verify(store)
    assert kind == "token store" and all(row.ok for row in rows) and len(rows) == 8

    tokens = np.memmap(store / "train/tokens/c/0", dtype="<u2", mode="r+")
    tokens[7] = 1024
    tokens.flush()
    assert error_line(mm("verify", store)).startswith(f"error: {store / 'train/tokens/c/0'}: token id 1024")

    from pipeline.data.store.layout import ATTRS_CHECKSUM, attrs_checksum

    store2 = _as_format1(part, tmp_path / "v1b.zarr")
    meta = json.loads((store2 / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["counts"]["val"]["documents"] += 1
    attrs[ATTRS_CHECKSUM] = attrs_checksum(attrs)
    (store2 / "zarr.json").write_text(json.dumps(meta))
    bad = [row for row in verify(store2)[1] if not row.ok]
    assert bad and bad[0].path == store2 / "zarr.json" and "the arrays hold" in bad[0].detail


def test_verify_recognises_a_gguf_export_and_its_flipped_tensor_byte(artifacts, tmp_path):
    pytest.importorskip("gguf")
    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.export.exporter import export_gguf

    path = export_gguf(load_checkpoint(artifacts["checkpoint"]), tmp_path / "model.gguf", "fp16")
    r = mm("verify", path)
    assert r.returncode == 0 and "(GGUF)" in r.stdout and "BAD" not in r.stdout, (r.stdout, r.stderr)
    from pipeline.verify import verify

    kind, rows = verify(path)  # in process: the table folds long text at the terminal's width
    assert kind == "GGUF" and rows[0].ok and rows[0].detail.endswith("sha256 of the tensor data matches"), rows

    import gguf

    last = max(gguf.GGUFReader(path).tensors, key=lambda t: t.data_offset)
    flipped = tmp_path / "flipped.gguf"
    shutil.copyfile(path, flipped)
    flip(flipped, last.data_offset + last.n_bytes // 2)  # a weight byte: header and sizes still agree
    line = error_line(mm("verify", flipped))
    assert line.startswith(f"error: {flipped}: sha256 of the tensor data differs"), line

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-4096])
    assert error_line(mm("verify", cut)).startswith(f"error: {cut}: ")


def test_verify_says_not_an_mm_file_for_other_files(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    line = error_line(mm("verify", data))
    assert line == f"error: {data}: not an mm file (mm verify checks a checkpoint, a GGUF export, a token store, " \
                   "a run directory or an export directory)", line
