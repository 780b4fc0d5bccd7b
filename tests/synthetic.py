"""Token stores of any size without storage: views whose tokens and document offsets are computed on read.

Documents of DOC tokens, a BOS (id 1) at every multiple of DOC; the rest of the ids are 3 + i % 997.
Shared by tests/test_sampler.py and bench/bench_sampler.py.
"""

from __future__ import annotations

import numpy as np

BOS = 1
DOC = 1000  # tokens per synthetic document


class SyntheticTokens:
    """n tokens without storage; a BOS every DOC tokens."""

    dtype = np.dtype("uint16")

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        idx = np.arange(key.start, key.stop, dtype=np.int64)
        return np.where(idx % DOC == 0, BOS, 3 + idx % 997).astype(np.uint16)


class SyntheticOffsets:
    """The document offsets of SyntheticTokens(n_tokens): 0, DOC, 2·DOC, ..., n_tokens."""

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens

    def __len__(self) -> int:
        return -(-self.n_tokens // DOC) + 1

    def __getitem__(self, i: int) -> np.int64:
        return np.int64(min(int(i) * DOC, self.n_tokens))
