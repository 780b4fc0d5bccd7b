"""Measured peak memory of training steps vs `mm config`'s estimate (pipeline.architecture.training_memory).

Each case runs in its own process: imports, then (RSS noted: the runtime) a model and
optimizer, then a few full training steps (forward, loss, backward, clip, optimizer step)
on random tokens, through the same setup and step functions as `mm train`. The peak is
the process's high-water RSS (VmHWM) on a CPU, or torch.cuda.max_memory_allocated on a GPU.

    python bench/bench_memory.py                 # the cases in CASES
    python bench/bench_memory.py --case minimind2-small,8,512,bf16,65536,adamw
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import save_json

# preset, micro batch, seq len, dtype, vocab, optimizer[, loss full|fused[, checkpointing none|blocks]]
CASES = [
    "tiny,16,256,bf16,6400,adamw",
    "tiny,16,256,bf16,6400,muon",
    "minimind2-small,4,512,bf16,6400,adamw",
    "minimind2-small,8,512,bf16,65536,adamw",
    "minimind2-small,8,512,fp32,6400,adamw",
    "minimind2,2,1024,bf16,6400,adamw",
    "minimind2-small,8,512,bf16,65536,adamw,fused",
    "minimind2,4,1024,bf16,6400,adamw,fused,none",
    "minimind2,4,1024,bf16,6400,adamw,fused,blocks",
]


def parse(case: str) -> tuple:
    preset, batch, seq, dtype, vocab, optimizer, *rest = case.split(",")
    loss, checkpointing = (rest + ["full", "none"][len(rest):])[:2]
    return preset, int(batch), int(seq), dtype, int(vocab), optimizer, loss, checkpointing


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(case: str, steps: int) -> dict:
    import types

    import torch
    import torch.nn.functional as F

    from pipeline.architecture import build_config
    from pipeline.model.transformer import Transformer
    from pipeline.train.optim import make_optimizer

    preset, batch, seq, dtype, vocab, optimizer, loss_kind, checkpointing = parse(case)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tp = types.SimpleNamespace(optimizer=optimizer, lr=3e-3, min_lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95,
                               muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0, dtype=dtype)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)

    def train(c, batch, seq, steps):
        torch.manual_seed(0)
        model = Transformer(c).to(device)
        model.checkpoint_blocks = checkpointing == "blocks"
        opt = make_optimizer(model, tp, device)
        for _ in range(steps):
            x = torch.randint(0, c.vocab_size, (batch, seq + 1), device=device)
            targets = x[:, 1:]
            with autocast:
                if loss_kind == "fused":  # the model's chunked cross-entropy fused with the head
                    loss, aux = model(x[:, :-1], targets=targets)
                else:
                    logits, aux = model(x[:, :-1])
                    loss = F.cross_entropy(logits.float().view(-1, c.vocab_size), targets.reshape(-1), reduction="sum")
                    del logits
            (loss / targets.numel() + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, aux

    # The runtime: the RSS after the same kind of step on a minute model has paged in
    # torch's code and set up its thread pools (none of which is a training tensor).
    minute = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}
    train(build_config(preset, 256, minute), 2, 16, 2)
    runtime_kib = rss_kib("VmRSS")
    train(build_config(preset, vocab, {"max_seq_len": max(seq, 2048)}), batch, seq, steps)
    if device.type == "cuda":
        peak, runtime = torch.cuda.max_memory_allocated(device), 0
    else:
        peak, runtime = rss_kib("VmHWM") * 1024, runtime_kib * 1024
    return {"case": case, "device": str(device), "peak_bytes": peak, "runtime_bytes": runtime}


def estimate(case: str, device: str) -> dict:
    from pipeline.architecture import build_config, training_memory

    preset, batch, seq, dtype, vocab, optimizer, loss_kind, checkpointing = parse(case)
    c = build_config(preset, vocab, {"max_seq_len": max(seq, 2048)})
    return training_memory(c, batch, seq, dtype, optimizer, device.split(":")[0], checkpointing, loss_kind == "fused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="preset,batch,seq,dtype,vocab,optimizer (repeatable)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this case in this process
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return
    rows = []
    for case in args.case or CASES:
        done = subprocess.run([sys.executable, __file__, "--one", case, "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        if done.returncode:
            print(f"{case}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        est = estimate(case, r["device"])
        tensors = r["peak_bytes"] - r["runtime_bytes"]
        r.update(estimate=est, tensors_bytes=tensors, ratio=est["total"] / tensors)
        rows.append(r)
        mib = 2**20
        print(f"{case:42s} peak {r['peak_bytes'] / mib:7.0f} MiB  runtime {r['runtime_bytes'] / mib:5.0f}  "
              f"tensors {tensors / mib:7.0f}  estimate {est['total'] / mib:7.0f}  ratio {r['ratio']:.2f}", flush=True)
    save_json(rows, args.json)


if __name__ == "__main__":
    main()
