"""`data.sources` in params: named sources of raw text, each with a path and a weight.

    data:
      sources:
        web:  {path: data/web/, weight: 0.6}                  # a directory: its files in name order
        code: {path: [data/code-1.jsonl.gz, data/code-2.jsonl.gz], weight: 0.3}
        zh:   {path: data/zh.parquet, weight: 0.1, text_field: content}

A source is tokenized into its own group of the token store (`mm tokenize
--source NAME`); training draws each sample's source by weight. This module
only checks the params; reading the files is `pipeline.data.inputs`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import UserError

KEYS = ("path", "weight", "text_field")
SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""A source name is a directory name in the token store: letters, digits, _ . - (no leading dot)."""


@dataclass(frozen=True)
class Source:
    name: str
    paths: tuple[str, ...]
    """Files or directories, in the order their documents are read."""
    weight: float
    """Share of training samples drawn from this source, before normalising over all sources."""
    text_field: str
    """JSON field (JSONL) or column (Parquet, `datasets`) holding the text."""


def parse_sources(sources: dict, default_text_field: str, where: str = "data.sources") -> dict[str, Source]:
    """Check `data.sources` and return {name: Source} in params order; a UserError names the key."""
    if not isinstance(sources, dict) or not sources:
        raise UserError(f"{where}: expected a mapping of at least one source name to {{path, weight}}")
    out = {}
    for name, spec in sources.items():
        key = f"{where}.{name}"
        if not isinstance(name, str) or not SOURCE_NAME.fullmatch(name):
            raise UserError(f"{key}: a source name is letters, digits, '_', '.', '-' (not starting with '.')")
        if isinstance(spec, (str, list)):
            spec = {"path": spec}  # NAME: path  is shorthand for weight 1
        if not isinstance(spec, dict):
            raise UserError(f"{key}: expected a mapping with path, weight, text_field")
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise UserError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
        path = spec.get("path")
        paths = [path] if isinstance(path, str) else path
        if not (isinstance(paths, list) and paths and all(isinstance(p, str) and p for p in paths)):
            raise UserError(f"{key}.path: expected a file or directory path, or a list of them")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, str):
            try:
                weight = float(weight)
            except ValueError:
                pass
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise UserError(f"{key}.weight: must be a number >= 0, got {weight!r}")
        text_field = spec.get("text_field", default_text_field)
        if not isinstance(text_field, str) or not text_field:
            raise UserError(f"{key}.text_field: must be a non-empty string, got {text_field!r}")
        out[name] = Source(name, tuple(paths), float(weight), text_field)
    if not any(s.weight > 0 for s in out.values()):
        raise UserError(f"{where}: every weight is 0; at least one source must have a positive weight")
    return out
