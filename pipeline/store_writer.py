"""Writing the token store: chunk files appended in order, then published atomically.

The layout itself (names, attributes, the zarr.json documents) is defined in
`pipeline.token_store`, next to the reader; this module only writes files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ChunkWriter:
    """Appends a 1-D array as raw little-endian chunk files `DIR/c/0`, `DIR/c/1`, ..."""

    def __init__(self, directory: Path, dtype: np.dtype, chunk_len: int):
        self.dir = directory / "c"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_len = chunk_len
        self.n = 0
        self.index = 0
        self.in_chunk = 0
        self.f = None

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        while arr.size:
            if self.f is None:
                self.f = open(self.dir / str(self.index), "wb")
                self.in_chunk = 0
            take = min(self.chunk_len - self.in_chunk, arr.size)
            self.f.write(arr[:take].tobytes())
            self.in_chunk += take
            self.n += take
            arr = arr[take:]
            if self.in_chunk == self.chunk_len:
                self.f.close()
                self.f = None
                self.index += 1

    def finish(self) -> tuple[int, int]:
        """Close; returns (length, chunk shape). Pads a partial last chunk when there are several."""
        if self.f is not None:
            self.f.close()
            self.f = None
            if self.index > 0:  # several chunks: the last is stored full size (spec)
                with open(self.dir / str(self.index), "r+b") as f:
                    f.truncate(self.chunk_len * self.dtype.itemsize)
            self.index += 1
        if self.n == 0:
            return 0, self.chunk_len
        if self.index == 1:
            return self.n, self.n  # one chunk holding exactly the data: no padding
        return self.n, self.chunk_len
