"""Stop a token id the model has no embedding row for, before the model indexes with it.

`open_store` checks sizes and attributes only (reading a whole store is `mm
verify`'s job), so a damaged chunk file can still hold an id >= vocab_size. On
the CPU the embedding would raise an IndexError, on a GPU a device-side assert
that kills the process; instead each batch is checked as it is built: one max
over a few thousand ids, nothing next to a forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError


def check_token_ids(x: torch.Tensor, y: torch.Tensor, vocab_size: int, store: str | Path, where: str) -> None:
    """UserError naming the store when an id in inputs `x` or targets `y` is not below vocab_size."""
    top = max(int(x.max()), int(y.max())) if x.numel() else -1
    if top >= vocab_size:
        raise UserError(f"{store}: token id {top} is not below vocab_size {vocab_size} ({where}); the store is "
                        "damaged (`mm verify` on it names the chunk file)")
