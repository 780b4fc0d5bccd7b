"""Document attention vs causal attention: which kernel wins, and what a training step costs.

Windows are packed from the real document lengths of a corpus (JSONL, tokenized
with the run's tokenizer: BOS + ids + EOS per document, as `mm tokenize` packs
them), so the mask has the shape training sees. Two measurements, both in one
run, the variants alternating round by round so the machine's drift hits all
alike; the fastest round counts (on a shared machine slower rounds measure the
neighbours, not the code):

  kernels   attention alone (forward + backward) at minimind2-small's head shape:
            causal (the model's path), and document attention as one masked SDPA
            call, one masked matmul call, and tiles of 128/256/512 queries
            (pipeline.model.doc_attention.document_attention; the kernel inside a tile by
            pipeline.model.cpu_attention.use_matmul_attention)
  steps     whole training steps of minimind2-small (forward, backward, AdamW),
            causal vs document attention with document positions, tokens/s

    python bench/bench_attention.py --corpus data/sample.jsonl --tokenizer data/tokenizer
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import numpy as np
import torch
from common import cpu_name, report, seconds_per_call

import pipeline.model.cpu_attention as C
import pipeline.model.doc_attention as D
import pipeline.model.transformer as M
from pipeline.architecture import build_config
from pipeline.hardware import pick_device, resolve_dtype


def document_lengths(corpus: str, tokenizer_dir: str, text_field: str = "text") -> np.ndarray:
    """Tokens per document as packed in a store: BOS + the text's ids + EOS."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    with open(corpus) as f:
        texts = [json.loads(line)[text_field] for line in f if line.strip()]
    return np.array([len(e.ids) + 2 for e in tokenizer.encode_batch(texts, add_special_tokens=False)])


def packed_doc_ids(lengths: np.ndarray, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(batch, seq_len) document numbers of stream windows at random places of the packed corpus."""
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(seed)
    rows = []
    for start in rng.integers(0, bounds[-1] - seq_len, batch):
        t = np.arange(start, start + seq_len)
        rows.append(np.searchsorted(bounds, t, side="right") - np.searchsorted(bounds, start, side="right"))
    return torch.from_numpy(np.stack(rows)).long()


@contextmanager
def patched(**values):
    """Set the constants of one variant: doc_attention's tile size, cpu_attention's matmul-vs-SDPA threshold."""
    holder = {name: next(m for m in (C, D) if hasattr(m, name)) for name in values}
    old = {k: getattr(holder[k], k) for k in values}
    for k, v in values.items():
        setattr(holder[k], k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(holder[k], k, v)


def kernel_variants(T: int, device: torch.device) -> dict:
    """name → (use doc mask, constants): every way the model can compute attention on a CPU; on a
    GPU, causal SDPA vs FlexAttention's document block mask."""
    if device.type == "cuda":
        return {"causal": (False, {}), "document, FlexAttention": (True, {})}
    never, always = 0, 2**62
    variants = {
        "causal": (False, {}),
        "document, one SDPA call": (True, {"DOCUMENT_TILE": T, "CPU_MATMUL_ATTENTION_MAX_SCORES": never}),
        "document, one matmul call": (True, {"DOCUMENT_TILE": T, "CPU_MATMUL_ATTENTION_MAX_SCORES": always}),
        "document, tiles of 256, SDPA": (True, {"DOCUMENT_TILE": 256, "CPU_MATMUL_ATTENTION_MAX_SCORES": never}),
        "document, tiles of 256, matmul": (True, {"DOCUMENT_TILE": 256, "CPU_MATMUL_ATTENTION_MAX_SCORES": always}),
        "document, tiles of 512, SDPA": (True, {"DOCUMENT_TILE": 512, "CPU_MATMUL_ATTENTION_MAX_SCORES": never}),
    }
    if T <= 256:  # one tile: the tiled variants are the single calls
        variants = {k: v for k, v in variants.items() if "tiles" not in k}
    if T > 1024:  # a (B·H, T, T) score tensor per layer: the memory the threshold exists to avoid
        del variants["document, one matmul call"]
    return variants


def time_kernels(c, doc_ids, dtype, rounds: int) -> dict:
    B, T = doc_ids.shape
    device = doc_ids.device
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, c.n_heads, T, c.head_dim, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, c.n_kv_heads, T, c.head_dim, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, c.n_kv_heads, T, c.head_dim, generator=g).to(device, dtype).requires_grad_()

    def run(use_mask):
        if use_mask:
            y = D.document_attention(q, k, v, D.document_mask(doc_ids))
        elif C.use_matmul_attention(q):
            y = C.causal_attention_cpu(q, k, v)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y.sum().backward()

    variants = kernel_variants(T, device)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (use_mask, constants) in variants.items():
            with patched(**constants):
                run(use_mask)  # warm-up
                times[name].append(seconds_per_call(run, use_mask, device=device))
    return {name: round(min(ts) * 1000, 1) for name, ts in times.items()}


def time_steps(c, doc_ids, dtype, rounds: int, steps: int) -> dict:
    B, T = doc_ids.shape
    device = doc_ids.device
    torch.manual_seed(0)
    model = M.Transformer(c).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(3, c.vocab_size, (B, T)).to(device)
    targets = torch.randint(3, c.vocab_size, (B, T)).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    modes = {"causal": False, "document": True}
    losses = {m: [] for m in modes}

    def step(documents: bool):
        model.document_attention = model.document_positions = documents
        with autocast:
            loss, _ = model(idx, targets=targets, doc_ids=doc_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses["document" if documents else "causal"].append(loss.detach())

    times = {m: [] for m in modes}
    for m in modes:
        step(modes[m])  # warm-up
    for _ in range(rounds):
        for m, documents in modes.items():
            times[m].append(seconds_per_call(step, documents, calls=steps, device=device))
    out = {m: {"step_s": round(min(ts), 3), "tokens_per_s": round(B * T / min(ts)),
               "losses_finite": bool(torch.stack(losses[m]).isfinite().all())} for m, ts in times.items()}
    out["document_over_causal"] = round(out["document"]["tokens_per_s"] / out["causal"]["tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/sample.jsonl")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--preset", default="minimind2-small")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens / seq_len)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per round and mode")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-steps", action="store_true", help="kernels only")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    device = pick_device(args.device, 0)
    dtype = resolve_dtype(args.dtype, device)
    lengths = document_lengths(args.corpus, args.tokenizer)
    c = build_config(args.preset, 6400, {"max_seq_len": max(args.seq_lens)})
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
              "dtype": str(dtype).removeprefix("torch."), "preset": args.preset, "tokens_per_step": args.tokens,
              "document_tokens_median": int(np.median(lengths)),
              "document_tokens_mean": round(float(lengths.mean()), 1),
              "by_seq_len": {}}
    for T in args.seq_lens:
        doc_ids = packed_doc_ids(lengths, max(1, args.tokens // T), T, seed=T).to(device)
        per_window = (doc_ids[:, -1] - doc_ids[:, 0] + 1).float().mean()
        entry = {"batch": doc_ids.size(0), "documents_per_window": round(float(per_window), 1),
                 "kernel_ms": time_kernels(c, doc_ids, dtype, args.rounds)}
        if not args.skip_steps:
            entry["steps"] = time_steps(c, doc_ids, dtype, args.rounds, args.steps)
        result["by_seq_len"][T] = entry
        print(json.dumps({T: entry}), flush=True)
    report(result, args.json)


if __name__ == "__main__":
    main()
