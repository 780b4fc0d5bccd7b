"""The data side of `params.yaml`: the `data` section (sources of raw text, the val split) and the
`tokenizer` section (its size, and which sources train it).

`pipeline.params` loads and checks them with the other sections; what a source
entry may hold is checked by `pipeline.data.sources`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from pipeline.errors import ParamError


def _shipped_sources() -> dict:
    from pipeline.data.sources import SHIPPED_SOURCES

    return copy.deepcopy(SHIPPED_SOURCES)


@dataclass
class DataParams:
    sources: dict = field(default_factory=_shipped_sources)
    """Named sources of raw text: NAME → {path, weight, text_field}. path: a file, a list of
    files or a directory (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, a `datasets` directory),
    needed by `mm tokenize` and DVC only (training reads the store); weight: share of training
    samples (normalised; 0 leaves the source out); text_field: defaults to data.text_field.
    Checked by `pipeline.data.sources`. While it is the shipped default (`sample` alone),
    training and `mm eval` read the store's other sources instead (`pick_sources`)."""
    val_fraction: float = 0.02
    """Fraction of documents (chosen by a hash of their text) held out for validation."""
    text_field: str = "text"
    """The JSON field that holds each document's text."""
    phases: list = field(default_factory=list)
    """Training phases, each with its own source weights: [{until, weights: {NAME: weight}}, ...].
    A phase runs from the previous one's end to `until`: a fraction of the run (a number ≤ 1) or a
    step (an integer > 1); the last phase's weights also cover any steps after its `until`. Empty:
    data.sources' weights for the whole run. Sources a phase does not name have weight 0 in it."""
    cache_dir: str = ""
    """Local directory for the chunk files of a token store in object storage (s3://, gs://, az://);
    empty: $XDG_CACHE_HOME/mm/chunks (~/.cache/mm/chunks). Shared by runs and processes."""
    cache_gb: float = 50.0
    """Bound of that cache in GB: least recently used chunk files are deleted beyond it."""

    def check(self) -> None:
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ParamError("data.val_fraction", f"must be in [0, 1], got {self.val_fraction}")
        if not self.cache_gb > 0:
            raise ParamError("data.cache_gb", f"must be positive, got {self.cache_gb}")
        from pipeline.data.sources import parse_sources

        # A UserError naming data.sources.NAME.KEY; the path is checked where raw text is read.
        parse_sources(self.sources, self.text_field, need_paths=False)
        check_phases(self.phases, self.sources)


@dataclass
class TokenizerParams:
    vocab_size: int = 6400
    """Vocabulary size of the byte-level BPE tokenizer, special tokens included."""
    sources: list = field(default_factory=lambda: ["sample"])
    """Names of data.sources the tokenizer is trained on; a params file without the key means
    every source. Naming them keeps a new source from retraining the tokenizer, which would
    invalidate every token store."""


def check_tokenizer_sources(tokenizer: TokenizerParams, data: DataParams) -> None:
    """Every source the tokenizer is trained on is one of data.sources."""
    for name in tokenizer.sources:
        if name not in data.sources:
            raise ParamError("tokenizer.sources", f"names '{name}', which is not in data.sources")


def check_phases(phases, sources: dict) -> None:
    """Each phase is {until, weights}: until a fraction in (0, 1] or a step > 1, increasing within each
    kind (fractions against steps are compared once the run's length is known); weights name sources
    of data.sources, are finite and non-negative, and not all 0."""
    import math

    if not isinstance(phases, list):
        raise ParamError("data.phases", f"must be a list of {{until, weights}}, got {phases!r}")
    last = {False: 0.0, True: 0}
    for i, phase in enumerate(phases):
        key = f"data.phases[{i}]"
        if not isinstance(phase, dict) or set(phase) != {"until", "weights"}:
            raise ParamError(key, f"must be a mapping with exactly the keys until and weights, got {phase!r}")
        until, weights = phase["until"], phase["weights"]
        number = isinstance(until, (int, float)) and not isinstance(until, bool)
        is_step = number and isinstance(until, int) and until > 1
        if not (is_step or (number and 0 < until <= 1)):
            raise ParamError(f"{key}.until", f"must be a fraction of the run in (0, 1] or a step count "
                                             f"(an integer > 1), got {until!r}")
        if until <= last[is_step]:
            raise ParamError(f"{key}.until", f"must come after the previous phase's until ({last[is_step]}), "
                                             f"got {until}")
        last[is_step] = until
        if not isinstance(weights, dict) or not weights:
            raise ParamError(f"{key}.weights", f"must map source names to weights, got {weights!r}")
        for name, w in weights.items():
            if name not in sources:
                raise ParamError(f"{key}.weights.{name}", "is not a source of data.sources")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ParamError(f"{key}.weights.{name}", f"must be a finite number >= 0, got {w!r}")
        if not any(w > 0 for w in weights.values()):
            raise ParamError(f"{key}.weights", "are all 0: a phase must draw from some source")
