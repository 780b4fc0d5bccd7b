"""bf16 autocast vs fp32 on the machine it runs on: the same training run twice, compared.

Trains the `tiny` preset (override with --preset/--set-model) for --steps steps in
fp32 and again in bf16, same seed and data order, through the real loop
(pipeline.train.loop.train), and reports

  * the largest relative difference of the two per-step loss curves, raw and as
    a moving average over --smooth steps, and the final val losses;
  * the bf16/fp32 speed ratio: median training tokens/s of each run (from
    train_log.tsv, which times the step itself, not evaluation or checkpoints).

With --rounds R > 1 the pair runs R times in alternating order (fp32 first, then
bf16 first, ...) and the speeds are medians over all rounds, so a machine whose
load drifts hits both alike. Data: the embedded corpus, tokenized once into
--work (vocab --vocab) unless --data/--tokenizer point at an existing store.

    python bench/bench_precision.py                   # tiny, seq 128, batch 8, 100 steps
    python bench/bench_precision.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.architecture import build_config, save_model_json
from pipeline.params import Params
from pipeline.train.loop import train
from pipeline.train.progress import read_log


def prepare_data(work: Path, vocab: int) -> tuple[Path, Path]:
    from pipeline.data.corpus import write_sample
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer_training import train_tokenizer

    corpus, tokenizer, store = work / "sample.jsonl", work / "tokenizer", work / "tokens.zarr"
    if not store.exists():
        write_sample(corpus)
        train_tokenizer([corpus], tokenizer, vocab_size=vocab)
        tokenize_files([corpus], tokenizer, store, workers=1, val_fraction=0.02, progress=False)
    return store, tokenizer


def run(dtype: str, args, store: Path, tokenizer: Path, model_json: Path, out: Path) -> dict:
    p = Params()
    tp = p.train
    tp.dtype, tp.seq_len, tp.micro_batch_size, tp.max_steps = dtype, args.seq_len, args.batch, args.steps
    tp.warmup_steps, tp.lr, tp.min_lr, tp.seed = max(args.steps // 10, 1), args.lr, args.lr / 10, args.seed
    tp.eval_interval, tp.eval_batches, tp.save_interval, tp.log_interval = args.steps, 8, args.steps, args.steps
    tp.out_dir = str(out)
    t0 = time.perf_counter()
    metrics = train(p, store, tokenizer, model_json, resume="none", device="cpu")
    rows = read_log(out / "train_log.tsv")
    return {
        "losses": [r["loss"] for r in rows],
        "tokens_per_s": [r["tokens_per_s"] for r in rows[5:]],  # the first steps warm up allocators and kernels
        "val_loss": metrics["val_loss"], "dtype": metrics["dtype"], "wall_s": time.perf_counter() - t0,
    }


def moving_average(xs: list[float], n: int) -> list[float]:
    return [sum(xs[i - n + 1 : i + 1]) / n for i in range(n - 1, len(xs))]


def max_rel_diff(a: list[float], b: list[float]) -> tuple[float, int]:
    diffs = [abs(y - x) / abs(x) for x, y in zip(a, b, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return diffs[worst], worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set-model", action="append", default=[], metavar="FIELD=VALUE",
                    help="model override, e.g. dim=256")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window for the smoothed comparison")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mm_bench_precision")
    ap.add_argument("--data", type=Path, help="existing token store (with --tokenizer)")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    store, tokenizer = (args.data, args.tokenizer) if args.data else prepare_data(args.work, args.vocab)
    from pipeline.data.tokenizer import load_tokenizer

    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set_model)}
    config = build_config(args.preset, load_tokenizer(tokenizer)[1]["vocab_size"], overrides)
    model_json = args.work / "model.json"
    save_model_json(config, model_json, args.preset)

    results: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for dtype in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            results[dtype].append(run(dtype, args, store, tokenizer, model_json, args.work / f"out_{dtype}_{r}"))
            print(f"round {r + 1}/{args.rounds} {dtype}: {results[dtype][-1]['wall_s']:.1f}s", flush=True)

    fp32, bf16 = results["fp32"][0], results["bf16"][0]
    assert bf16["dtype"] == "bfloat16", f"bf16 did not run as bf16 ({bf16['dtype']})"
    raw, raw_at = max_rel_diff(fp32["losses"], bf16["losses"])
    smooth, smooth_at = max_rel_diff(moving_average(fp32["losses"], args.smooth),
                                     moving_average(bf16["losses"], args.smooth))
    speed = {d: statistics.median(t for res in results[d] for t in res["tokens_per_s"]) for d in results}
    figures = {
        "preset": args.preset, "overrides": overrides, "seq_len": args.seq_len,
        "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "first_loss": {"fp32": fp32["losses"][0], "bf16": bf16["losses"][0]},
        "last_loss": {"fp32": fp32["losses"][-1], "bf16": bf16["losses"][-1]},
        "val_loss": {"fp32": fp32["val_loss"], "bf16": bf16["val_loss"]},
        "max_rel_diff_raw": raw, "max_rel_diff_raw_step": raw_at + 1,
        f"max_rel_diff_smoothed_{args.smooth}": smooth, "max_rel_diff_smoothed_step": smooth_at + args.smooth,
        "tokens_per_s_median": speed, "bf16_over_fp32_speed": speed["bf16"] / speed["fp32"],
    }
    print(f"{args.preset} {overrides or ''} seq {args.seq_len} batch {args.batch}, {args.steps} steps, ln(vocab) "
          f"{math.log(config.vocab_size):.3f}")
    print(f"loss  step 1: fp32 {fp32['losses'][0]:.4f} bf16 {bf16['losses'][0]:.4f}   step {args.steps}: "
          f"fp32 {fp32['losses'][-1]:.4f} bf16 {bf16['losses'][-1]:.4f}   "
          f"val: fp32 {fp32['val_loss']:.4f} bf16 {bf16['val_loss']:.4f}")
    print(f"max relative loss difference: raw {raw:.2%} (step {raw_at + 1}), "
          f"{args.smooth}-step average {smooth:.2%} (step {smooth_at + args.smooth})")
    print(f"median tokens/s: fp32 {speed['fp32']:,.0f}  bf16 {speed['bf16']:,.0f}  "
          f"→ bf16/fp32 = {speed['bf16'] / speed['fp32']:.2f}×")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
