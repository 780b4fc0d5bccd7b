"""What the machine can do: device, precision, peak FLOP/s (for MFU)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from pipeline.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested != "cpu":
        raise UserError(f"--device: expected auto, cpu or cuda, got '{requested}'")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU runs bf16 matmuls natively (several times fp32's speed)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype → the autocast dtype (fp32 means no autocast)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"train.dtype: expected auto, bf16, fp16 or fp32, got '{name}'")
    if name == "fp16" and device.type == "cpu":
        raise UserError("train.dtype: fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return DTYPES[name]


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak matmul FLOP/s: the data sheet on a known GPU, else measured with a large matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.3) -> float:
    # A private generator: drawing from the global one would move the RNG state that
    # checkpoints save, so a resumed run would not continue the same random stream.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
