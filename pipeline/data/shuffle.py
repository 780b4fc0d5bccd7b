"""Seeded permutations of [0, n) that are never materialised: O(1) memory per lookup.

A 4-round Feistel network over the smallest even-bit domain 2^(2h) >= n is a
bijection of that domain; cycle walking (apply it again while the value is
>= n) turns it into a bijection of [0, n). The domain is less than 4n, so a
lookup takes under 4 Feistel evaluations on average. Everything is uint64
arithmetic on numpy arrays (wrapping multiplication is defined), so the
permutation is the same on every machine and numpy version, and a batch of
positions is permuted in one vectorised pass.

    perm = SeededPermutation(seed_key("1337", "web"))
    perm(np.array([0, 1, 2]), n=10**12, round_=np.array([0, 0, 0]))

`round_` (a pass over the data, a block of the mixture) selects an
independent permutation per element, so positions of two passes can be
permuted in one call.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def seed_key(*parts: object) -> int:
    """A 64-bit key from text parts (seed, source name, purpose): stable across runs and machines."""
    text = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit hash with full avalanche."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


class SeededPermutation:
    """A family of bijections of [0, n), one per (key, round_); see the module docstring."""

    def __init__(self, key: int):
        self.key = np.uint64(key & 0xFFFF_FFFF_FFFF_FFFF)

    def __call__(self, positions: np.ndarray, n: int, round_: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if n < 1 or (positions.size and (positions.min() < 0 or positions.max() >= n)):
            raise ValueError(f"positions must lie in [0, {n})")
        half = max(1, (int(n - 1).bit_length() + 1) // 2)  # domain 2^(2·half) >= n
        with np.errstate(over="ignore"):
            keys = self._round_keys(np.broadcast_to(np.asarray(round_, dtype=np.uint64), positions.shape))
            x = positions.astype(np.uint64)
            todo = np.ones(x.shape, dtype=bool)
            while todo.any():  # cycle walking: at most a few passes for almost every element
                idx = np.flatnonzero(todo)
                x[idx] = self._feistel(x[idx], keys[:, idx], half)
                todo[idx] = x[idx] >= np.uint64(n)
        return x.astype(np.int64)

    def _round_keys(self, round_: np.ndarray) -> np.ndarray:
        """(ROUNDS, *shape) uint64: one key per Feistel round, per element's round_."""
        base = mix64(self.key ^ mix64(round_ * _GOLDEN + np.uint64(1)))
        return np.stack([mix64(base + np.uint64(r + 1) * _GOLDEN) for r in range(ROUNDS)])

    @staticmethod
    def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
        mask = np.uint64((1 << half) - 1)
        left, right = x >> np.uint64(half), x & mask
        for r in range(ROUNDS):
            left, right = right, left ^ (mix64(right ^ keys[r]) & mask)
        return (left << np.uint64(half)) | right
