"""`train.compile`: whether to torch.compile the model, and how.

`true`/`false` do what they say. `auto` (the default) compiles where compiling pays
for itself within the run:

- on CUDA, always: a compile takes about a minute, and the kernels it fuses save that
  within the first few hundred steps of any run worth running on a GPU;
- on a CPU, when the run's training FLOPs (model FLOPs per token × tokens of the whole
  schedule) exceed CPU_COMPILE_MIN_FLOPS: a cold compile there costs tens of seconds
  and the compiled step is only ~5-15 % faster, so only long runs win. The threshold is
  break-even measured with bench/bench_compile.py (figures in docs/training.md).

The decision depends on the params, the model and the device type only, never on a
timing, so a resumed run decides as the uninterrupted run did (compiled and eager
kernels round differently; mixing them would break bit-exact resume).
"""

from __future__ import annotations

import torch

from pipeline.architecture import flops_per_token
from pipeline.model.transformer import ModelConfig

# Break-even on a CPU, in training FLOPs of the whole run: (cold compile time) × (eager FLOP/s) /
# (1 − 1/speedup). Measured on a 2-core Intel Xeon (AVX512-BF16/AMX), minimind2-small, bf16:
# see docs/training.md "compile: auto".
CPU_COMPILE_MIN_FLOPS = 5e14


def decide(setting: bool | str, device: torch.device, config: ModelConfig, seq_len: int, tokens_per_step: int,
           total_steps: int) -> tuple[bool, str]:
    """(compile?, why): the why goes into the run's summary and metrics.json."""
    if setting is True or setting is False:
        return setting, f"train.compile={str(setting).lower()}"
    if device.type == "cuda":
        return True, "auto: on CUDA compiling always pays back"
    run_flops = flops_per_token(config, seq_len) * tokens_per_step * total_steps
    if device.type == "cpu" and run_flops >= CPU_COMPILE_MIN_FLOPS:
        return True, (f"auto: a long CPU run ({run_flops:.2g} training FLOPs ≥ {CPU_COMPILE_MIN_FLOPS:.0e}), "
                      "where the faster steps repay the compile time")
    return False, (f"auto: a short {device.type.upper()} run ({run_flops:.2g} training FLOPs "
                   f"< {CPU_COMPILE_MIN_FLOPS:.0e}), where compiling would cost more time than it saves")


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile each transformer block in place (before DDP/FSDP wrap it).

    Regional compilation: the blocks share one code path, so the first block's
    compiled graph serves all of them and the cold compile takes about one block's
    time instead of the whole model's; parameter names stay unchanged (no
    `_orig_mod.` prefix), so checkpoints are the same as uncompiled runs'.
    """
    for block in model.layers:
        block.compile()
