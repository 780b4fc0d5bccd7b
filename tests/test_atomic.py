"""pipeline/atomic.py: a failed write leaves the old file (or directory) as it was, and no debris."""

from __future__ import annotations

import pytest

from pipeline import atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    atomic.write_bytes(path, b"new\r\n")  # bytes exactly as given, no newline translation
    assert path.read_bytes() == b"new\r\n"


def test_write_creates_missing_parent_directories(tmp_path):
    atomic.write_text(tmp_path / "a" / "b" / "model.json", "{}\n")
    assert (tmp_path / "a" / "b" / "model.json").read_text() == "{}\n"


def test_publish_dir_replaces_a_directory_whole(tmp_path):
    target, staged = tmp_path / "export", tmp_path / ".export.tmp"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (staged / "sub").mkdir(parents=True)
    (staged / "sub" / "new.txt").write_text("new")
    atomic.publish_dir(staged, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staged or old copy left


def test_staged_file_and_dir_publish_only_on_success(tmp_path):
    with atomic.staged_file(tmp_path / "model.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    assert (tmp_path / "model.gguf").read_bytes() == b"GGUF"
    with pytest.raises(OSError):
        with atomic.staged_dir(tmp_path / "export") as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # nothing half-written, no debris
    with atomic.staged_dir(tmp_path / "export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "export" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model.gguf"]
