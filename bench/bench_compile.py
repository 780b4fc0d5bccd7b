"""What torch.compile costs and gains for one training step: the figures behind `train.compile: auto`.

For each way of compiling (none, the whole model, each block), in a fresh
inductor cache (a cold compile, as a user's first run pays it): the time of the
first step (tracing + compiling + running), then the median step time after
warm-up. Break-even = compile time / (eager step − compiled step): the number of
steps a run needs before compiling has paid for itself.

    python bench/bench_compile.py --preset minimind2-small --seq-len 512 --batch 4
    python bench/bench_compile.py --preset tiny --seq-len 256 --batch 16      # the demo's step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import save_json, seconds_per_call

MODES = ("eager", "model", "blocks")


def measure(args) -> dict:
    """One mode in this process (each mode gets its own process and its own empty cache)."""
    import torch
    import torch.nn.functional as F

    from pipeline.architecture import build_config
    from pipeline.hardware import resolve_dtype

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    c = build_config(args.preset, args.vocab)
    torch.manual_seed(0)
    model = __import__("pipeline.model.transformer", fromlist=["Transformer"]).Transformer(c).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = model
    if args.mode == "model":
        forward = torch.compile(model)
    elif args.mode == "blocks":
        for block in model.layers:
            block.compile()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    x = torch.randint(0, c.vocab_size, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, c.vocab_size, (args.batch, args.seq_len), device=device)

    def step() -> None:
        with autocast:
            logits, _ = forward(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = seconds_per_call(step, device=device)
    step()
    times = [seconds_per_call(step, device=device) for _ in range(args.steps)]
    return {"mode": args.mode, "first_step_s": first, "step_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="minimind2-small")
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps after warm-up")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # internal: measure one mode in this process
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return

    results = {}
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:  # a cold compile: nothing cached from earlier runs
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    eager = results.get("eager")
    for mode, r in results.items():
        line = f"{mode:7s} first step {r['first_step_s']:7.2f} s   step {r['step_s'] * 1000:7.1f} ms"
        if eager and mode != "eager":
            r["compile_s"] = r["first_step_s"] - eager["step_s"]
            r["speedup"] = eager["step_s"] / r["step_s"]
            saved = eager["step_s"] - r["step_s"]
            r["break_even_steps"] = round(r["compile_s"] / saved) if saved > 0 else None
            line += (f"   compile ≈ {r['compile_s']:.1f} s   speedup {r['speedup']:.3f}×   "
                     f"break-even {r['break_even_steps']} steps")
        print(line)
    save_json({"args": vars(args), "results": results}, args.json)


if __name__ == "__main__":
    main()
