"""Peak memory of train.init from a sharded bf16 Hugging Face checkpoint of minimind2 size, against a
random start: each measured in a fresh process (peak RSS), building the fp32 model the trainer builds.

    .venv/bin/python bench/bench_init_memory.py [--shards 4]

Loading copies one tensor at a time into the model (pipeline/export/hf_import.py), with one shard
open at a time, so the peak should stay near the random start's: the model plus one shard's pages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# VmHWM, not ru_maxrss: the latter survives exec, so a child would report its parent's peak.
CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from pipeline.architecture import build_config
from pipeline.export.hf_import import initial_model
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = peak()
model = initial_model(build_config("minimind2", 6400), {init!r}, "")
n = sum(p.numel() for p in model.parameters())
print(before, peak(), n)
"""


def write_checkpoint(directory: Path, shards: int) -> int:
    """A minimind2-size model as HF writes it: bf16 safetensors shards, an index, config.json."""
    import torch
    from safetensors.torch import save_file

    from pipeline.architecture import build_config
    from pipeline.export.hf_format import hf_config, weight_map
    from pipeline.model.transformer import Transformer

    config = build_config("minimind2", 6400)
    state = Transformer(config).state_dict()
    table = weight_map(config)
    names = list(table)
    per = -(-len(names) // shards)
    index, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {table[n]: state[n].to(torch.bfloat16).contiguous() for n in names[s * per:(s + 1) * per]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(part, file))
        total += sum(t.numel() * 2 for t in part.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": index}))
    (directory / "config.json").write_text(json.dumps(hf_config(config, torch.bfloat16, 1, 2, 0)))
    return total


def measure(init: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), init=init)], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]) * 1024, int(out[1]) * 1024, int(out[2])  # VmHWM is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        size = write_checkpoint(Path(tmp), args.shards)
        imports, random_peak, n = measure("")
        _, init_peak, _ = measure(tmp)
    mib = 2**20
    print(f"model: minimind2, {n / 1e6:.1f}M parameters; fp32 weights {4 * n / mib:.0f} MiB; "
          f"checkpoint {size / mib:.0f} MiB bf16 in {args.shards} shards")
    print(f"peak RSS after imports: {imports / mib:.0f} MiB")
    print(f"peak RSS, random start: {random_peak / mib:.0f} MiB")
    print(f"peak RSS, train.init:   {init_peak / mib:.0f} MiB")
    print(f"ratio init / random: {init_peak / random_peak:.2f} (above imports: "
          f"{(init_peak - imports) / max(1, random_peak - imports):.2f})")


if __name__ == "__main__":
    main()
