"""`data.sources` in params: named sources of raw text, each with a path and a weight.

    data:
      sources:
        web:  {path: data/web/, weight: 0.6}                  # a directory: its files in name order
        code: {path: [data/code-1.jsonl.gz, data/code-2.jsonl.gz], weight: 0.3}
        zh:   {path: data/zh.parquet, weight: 0.1, text_field: content}

A source is tokenized into its own group of the token store (`mm tokenize
--source NAME`); training draws each sample's source by weight. This module
only checks the params; reading the files is `pipeline.data.inputs`.

The path matters only to `mm tokenize`, `mm tokenizer` and DVC: training and
`mm eval` read the store, so `--set data.sources.NAME.weight=W` is enough to
use a source the store already holds (`parse_sources(..., need_paths=False)`).

Which sources a run reads (`pick_sources`): data.sources as params give them,
except while data.sources is the shipped default (the embedded `sample`
alone, untouched): then the store's sources that params do not name — what
`mm tokenize data/raw.jsonl` added from the command line — are the user's
data, read instead of `sample` at equal weights, with a line saying so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import UserError

KEYS = ("path", "weight", "text_field")
SHIPPED_SOURCES = {"sample": {"path": "data/sample.jsonl", "weight": 1.0, "text_field": "text"}}
"""data.sources as params.yaml ships it (and the default without one): the embedded corpus alone."""
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
    text_field_given: bool = False
    """The entry names its text_field (else it is data.text_field)."""


def parse_sources(sources: dict, default_text_field: str, where: str = "data.sources",
                  need_paths: bool = True) -> dict[str, Source]:
    """Check `data.sources` and return {name: Source} in params order; a UserError names the key.

    need_paths=False (training, `mm eval`, the params check): an entry without a path is a
    source the store already holds, with no paths."""
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
        if path is None and not need_paths:
            paths = []
        elif not (isinstance(paths, list) and paths and all(isinstance(p, str) and p for p in paths)):
            hint = "" if path is not None else " (reading the raw text needs it; training needs only the name)"
            raise UserError(f"{key}.path: expected a file or directory path, or a list of them{hint}")
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
        out[name] = Source(name, tuple(paths), float(weight), text_field, "text_field" in spec)
    if not any(s.weight > 0 for s in out.values()):
        raise UserError(f"{where}: every weight is 0; at least one source must have a positive weight")
    return out


class Weights(dict):
    """{name: weight} of data.sources, in params order, and what `pick_sources` needs besides:

    shipped      data.sources is SHIPPED_SOURCES: the store's other sources are the user's data
    text_fields  {name: text_field} of the entries that name one (training checks the store used it)
    """

    def __init__(self, weights=(), shipped: bool = False, text_fields: dict | None = None):
        super().__init__(weights)
        self.shipped = shipped
        self.text_fields = dict(text_fields or {})


def source_weights(sources: dict, default_text_field: str) -> Weights:
    """The weights of `data.sources` (checked, paths optional) for training and `mm eval`."""
    parsed = parse_sources(sources, default_text_field, need_paths=False)
    shipped = parse_sources(SHIPPED_SOURCES, "text")

    def spec(s: Source) -> tuple:
        return s.name, s.paths, s.weight, s.text_field

    return Weights({name: s.weight for name, s in parsed.items()},
                   shipped=[spec(s) for s in parsed.values()] == [spec(s) for s in shipped.values()],
                   text_fields={name: s.text_field for name, s in parsed.items() if s.text_field_given})


def pick_sources(weights: dict, in_store: list[str]) -> tuple[dict[str, float], str]:
    """The sources to read with a positive weight, and a line saying why when params alone do not
    decide it: while data.sources is the shipped default, the store's sources it does not name."""
    own = [name for name in in_store if name not in weights]
    if getattr(weights, "shipped", False) and own:
        many = len(own) > 1
        return {name: 1.0 for name in own}, (
            f"data: using the store's source{'s' if many else ''} {', '.join(own)} "
            f"({'at equal weights, ' if many else ''}tokenized outside params), not the embedded "
            f"sample: data.sources is the shipped default; name sources there (or --set "
            f"data.sources.NAME.weight=W) to choose")
    return {name: w for name, w in weights.items() if w > 0}, ""


def unread_note(store, ignored: list[str], weights: dict) -> str:
    """The line naming the store's sources a run leaves unread, and why ("" when none): params name
    others, or give them weight 0."""
    zero = [name for name in ignored if name in weights]
    other = [name for name in ignored if name not in weights]
    why = ([f"{', '.join(other)} (not in data.sources)"] if other else []) + (
        [f"{', '.join(zero)} (weight 0)"] if zero else [])
    return f"note: {store} also holds {'; '.join(why)}: not read" if why else ""
