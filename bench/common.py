"""What the benchmark scripts share: timing calls, naming the CPU, printing and saving the result.

The scripts run as `python bench/NAME.py`, which puts bench/ on sys.path, so they import this as `common`.
It imports only the standard library (torch only to wait for a GPU), so a script's parent process that
only launches and collects its measuring children stays light.
"""

from __future__ import annotations

import json
import platform
import time


def sync(device) -> None:
    """Wait for the work queued on a GPU (CUDA runs asynchronously); nothing to wait for on a CPU."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def seconds_per_call(fn, *args, calls: int = 1, device=None) -> float:
    """Mean wall time of `calls` calls of fn(*args), the device's queued work included at both ends."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    sync(device)
    return (time.perf_counter() - t0) / calls


def cpu_name() -> str:
    return platform.processor() or platform.machine()


def save_json(result, path) -> None:
    """Write the result to path (a script's --json), if one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def report(result, path) -> None:
    """Print the result as indented JSON, and save it to path as well if one is given."""
    print(json.dumps(result, indent=2))
    save_json(result, path)
