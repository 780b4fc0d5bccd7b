"""What the machine can do: device, precision, peak FLOP/s (for MFU)."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (without sparsity).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10": 125e12,
                 "L4": 121e12, "4090": 165e12, "3090": 71e12}


def datasheet_gpu(name: str) -> str | None:
    """The GPU_PEAK_BF16 key naming this device as a whole word: "L4" is not found in "NVIDIA L40"."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return key
    return None


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
    # fp16 runs on the CPU too (autocast and the GradScaler support it), slowly: it is there to run the
    # GPU's fp16 path (loss scaling, skipped overflows) where no GPU is; bf16 is the CPU's fast dtype.
    return DTYPES[name]


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak matmul FLOP/s: the data sheet on a known GPU, else measured (see cpu_matmul_peak)."""
    if device.type == "cuda":
        key = datasheet_gpu(torch.cuda.get_device_name(device))
        if key:
            return GPU_PEAK_BF16[key] if dtype != torch.float32 else GPU_PEAK_BF16[key] / 2
        return measure_matmul_flops(device, dtype, seconds=2.0)
    return cpu_matmul_peak(device, dtype)


def peak_source(device: torch.device) -> str:
    """What MFU is measured against, for the bar, the logs and metrics.json: "vs <this>"."""
    if device.type == "cuda":
        key = datasheet_gpu(torch.cuda.get_device_name(device))
        if key:
            return f"{key} datasheet peak"
    return "measured matmul peak"


def cpu_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best matmul FLOP/s ever measured on this CPU with these threads and dtype, cached per machine.

    One short probe under load reads low (and MFU high: 85-93% where the benchmark
    measures 67%). So the first measurement runs 2 s, and every later run adds a
    0.3 s probe and keeps the maximum: the figure only rises towards the real peak.
    The cache is $XDG_CACHE_HOME/mm/matmul_peak.json (~/.cache/mm/ by default)."""
    key = f"{cpu_model_name()} | {torch.get_num_threads()} threads | {dtype} | torch {torch.__version__.split('+')[0]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mm" / "matmul_peak.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    cached = known.get(key) if isinstance(known, dict) and isinstance(known.get(key), (int, float)) else 0.0
    measured = measure_matmul_flops(device, dtype, seconds=0.3 if cached else 2.0)
    if measured > cached:
        try:  # best effort: a read-only home only costs the longer probe next time
            updated = {**(known if isinstance(known, dict) else {}), key: measured}
            atomic.write_text(cache, json.dumps(updated, indent=1))
        except OSError:
            pass
    return max(measured, cached)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
