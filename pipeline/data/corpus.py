"""The embedded default corpus: docstrings of Python's standard library.

Every machine that runs `mm` already holds this text, so the whole chain runs
with no download. The source files are parsed with `ast` (never imported: no
side effects, no GUI toolkits, no platform-specific modules), and every
module, class and function docstring of reasonable length becomes one
document. The sections of the language reference that pydoc ships
(`pydoc_data/topics.py`) are added too: long English prose. Exact duplicates
are dropped; the order is the sorted file walk, so the output is deterministic
for a given Python version.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
from pathlib import Path

from pipeline.atomic import atomic_file

# Packages that are test suites, GUI demos, vendored data or otherwise not prose.
SKIP_DIRS = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
    "site-packages", "dist-packages", "__pycache__", "pydoc_data", "venv",
    "config-3", "lib-dynload", "__phello__",
}
MIN_CHARS = 40
"""Shorter docstrings ("Return self.", "Deprecated.") are noise, not prose."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def _docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _parse(path: Path) -> ast.AST | None:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old modules
            return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return None


def _topics(root: Path):
    """The language-reference sections pydoc ships: the string values of `topics = {...}`."""
    tree = _parse(root / "pydoc_data" / "topics.py")
    if tree is None:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield value.value


def iter_docs(root: Path | None = None, min_chars: int = MIN_CHARS):
    """Yield the de-duplicated documents of the stdlib under `root`, in a fixed order."""
    root = root or stdlib_dir()
    seen: set[str] = set()

    def docs():
        for path in _source_files(root):
            tree = _parse(path)
            if tree is not None:
                yield from _docstrings(tree)
        yield from _topics(root)

    for doc in docs():
        doc = doc.strip()
        if len(doc) < min_chars or doc in seen:
            continue
        seen.add(doc)
        yield doc


def write_sample(out: str | Path, root: Path | None = None) -> dict:
    """Write the corpus as JSONL (one {"text": ...} per line); returns counts.

    Written atomically (pipeline/atomic.py), so an interrupted run never leaves
    a half corpus behind.
    """
    out = Path(out)
    docs = n_bytes = 0
    with atomic_file(out, "w") as f:
        for doc in iter_docs(root):
            line = json.dumps({"text": doc}, ensure_ascii=False)
            f.write(line + "\n")
            docs += 1
            n_bytes += len(line.encode("utf-8")) + 1
    return {"path": str(out), "documents": docs, "bytes": n_bytes}
