"""Training throughput and MFU of mm's model vs transformers' LlamaForCausalLM of the same shape.

Both are trained with the same batch, precision (autocast) and optimizer in the
same run, alternating, so the machine's drift hits both alike. MFU is measured
against a bf16 (or fp32) matmul peak measured in this run as well.

    python bench/bench_train.py                       # minimind2-small, seq 512, CPU
    python bench/bench_train.py --preset minimind2 --seq-len 1024 --batch 8 --compile --eager-too   # on a GPU

On a GPU that pipeline/hardware.py knows, MFU is also given against the data sheet's dense
bf16 peak (`mfu_datasheet`, the peak named in `datasheet_peak`), as `mm train` reports it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import report, seconds_per_call, sync

from pipeline.architecture import build_config, flops_per_token
from pipeline.hardware import measure_matmul_flops, peak_flops, peak_source, pick_device, resolve_dtype
from pipeline.model.transformer import Transformer


def hf_llama(c):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def step_fn(model, optimizer, x, y, autocast, is_hf: bool):
    with autocast:
        logits = model(x).logits if is_hf else model(x)[0]
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="minimind2-small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round and model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--eager-too", action="store_true", help="with --compile: time the eager models in the same run")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    device = pick_device(args.device, 0)
    dtype = resolve_dtype(args.dtype, device)
    c = build_config(args.preset, 6400)
    torch.manual_seed(0)
    if dtype != torch.float32:
        autocast = torch.autocast(device.type, dtype=dtype)
    else:
        autocast = torch.autocast(device.type, enabled=False)
    models = {"mm": Transformer(c).to(device), "transformers": hf_llama(c).to(device)}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}
    runners = {k: (torch.compile(m) if args.compile else m) for k, m in models.items()}
    if args.compile and args.eager_too:  # the same modules and optimizers, uncompiled
        runners.update({f"{k} eager": m for k, m in models.items()})
        optimizers.update({f"{k} eager": optimizers[k] for k in models})
    x = torch.randint(0, c.vocab_size, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, c.vocab_size, (args.batch, args.seq_len), device=device)

    for name in runners:  # warm-up (and compilation)
        for _ in range(2):
            step_fn(runners[name], optimizers[name], x, y, autocast, name.startswith("transformers"))
    sync(device)

    times = {name: [] for name in runners}
    peaks = []
    for _ in range(args.rounds):
        peaks.append(measure_matmul_flops(device, dtype if dtype != torch.float32 else torch.float32))
        for name in runners:
            times[name].append(seconds_per_call(step_fn, runners[name], optimizers[name], x, y, autocast,
                                                name.startswith("transformers"), calls=args.steps,
                                                device=device))

    tokens = args.batch * args.seq_len
    flops = flops_per_token(c, args.seq_len) * tokens
    peak = max(peaks)
    datasheet = peak_flops(device, dtype) if "datasheet" in peak_source(device) else None
    result = {"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "dtype": str(dtype),
              "device": str(device), "compile": args.compile, "peak_matmul_tflops": round(peak / 1e12, 2)}
    for name, ts in times.items():
        # The fastest round: on a shared machine, slower rounds measure the neighbours, not the code.
        t = min(ts)
        result[name] = {"step_s": round(t, 4), "tokens_per_s": round(tokens / t, 1), "mfu": round(flops / t / peak, 4)}
        if datasheet:
            result[name]["mfu_datasheet"] = round(flops / t / datasheet, 4)
    if datasheet:
        result["datasheet_peak"] = f"{peak_source(device)}: {datasheet / 1e12:.0f} TFLOP/s"
    result["speed_ratio_mm_over_transformers"] = round(result["transformers"]["step_s"] / result["mm"]["step_s"], 3)
    report(result, args.json)


if __name__ == "__main__":
    main()
