"""`mm train` on a store of billions of tokens: time to open it and run 2 steps, peak memory.

Writes a synthetic format-2 store: source `big` of --tokens tokens as sparse chunk
files (no disk used: the tokens read back as 0) with a document every --doc-len
tokens (real offsets), and a small real source `sample` (the embedded corpus).
Then, for each size in --sizes, it runs `mm train` for 2 steps of a tiny model
with weights big 0.9 / sample 0.1, in both window modes, and reports the wall time
of the whole command, the time until its first step is logged (process start,
imports, opening the store, building the model and the sampler, one step), the
time to open the store in-process, and the command's peak RSS (getrusage of the
child). A tiny store (the sample source alone) is the
baseline: flat memory means the same peak RSS whatever the size.

    python bench/bench_big_store.py --out /tmp/bigstore                # 5·10^9 tokens
    python bench/bench_big_store.py --sizes 5.5e8 5e9 --out /tmp/bigstore
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.data.store.layout import ATTRS_CHECKSUM, FORMAT_NAME, FORMAT_VERSION, attrs_checksum, part_dir
from pipeline.data.store.reader import open_store
from pipeline.data.store.writer import CHUNK_TOKENS, OFFSET_CHUNK, group_document, write_metadata
from pipeline.params import TrainParams
from pipeline.train.run_data import open_train_data


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def sparse_chunks(array_dir: Path, n: int, chunk: int, itemsize: int) -> None:
    (array_dir / "c").mkdir(parents=True, exist_ok=True)
    for i in range(-(-n // chunk)):
        with open(array_dir / "c" / str(i), "wb") as f:
            f.truncate(chunk * itemsize)  # a hole: no blocks on disk


def offset_chunks(array_dir: Path, n_tokens: int, doc_len: int) -> int:
    """doc_offsets 0, doc_len, 2·doc_len, ..., n_tokens written for real; returns their count."""
    (array_dir / "c").mkdir(parents=True, exist_ok=True)
    n = -(-n_tokens // doc_len) + 1
    chunk = OFFSET_CHUNK if n > OFFSET_CHUNK else n  # one chunk holds exactly the data; several are full size
    for i, start in enumerate(range(0, n, chunk)):
        values = np.minimum(np.arange(start, start + chunk, dtype=np.int64) * doc_len, n_tokens)
        values.astype("<i8").tofile(array_dir / "c" / str(i))
    return n


def add_big_source(store: Path, root_attrs: dict, n_tokens: int, doc_len: int) -> None:
    """Source `big`, one part: train of n_tokens (sparse), a val split of one small document."""
    part = part_dir(store, "big", 0, 1)
    shutil.rmtree(store / "big", ignore_errors=True)
    write_json(store / "big" / "zarr.json", group_document({"source": "big"}))
    dtype = root_attrs["dtype"]
    itemsize = np.dtype(dtype).itemsize
    sparse_chunks(part / "train" / "tokens", n_tokens, CHUNK_TOKENS, itemsize)
    n_off = offset_chunks(part / "train" / "doc_offsets", n_tokens, doc_len)
    val_tokens = 4096
    sparse_chunks(part / "val" / "tokens", val_tokens, val_tokens, itemsize)
    offset_chunks(part / "val" / "doc_offsets", val_tokens, val_tokens)
    attrs = {k: root_attrs[k] for k in ("format", "version", "dtype", "tokenizer")}
    attrs.update(source="big", part={"index": 0, "count": 1}, text_field="text", val_fraction=0.0,
                 inputs=[{"name": "synthetic (sparse)", "size": 0}],
                 counts={"train": {"documents": n_off - 1, "tokens": n_tokens, "bytes": 0},
                         "val": {"documents": 1, "tokens": val_tokens, "bytes": 0}})
    attrs[ATTRS_CHECKSUM] = attrs_checksum(attrs)
    # write_metadata writes the part group and the zarr.json of its four arrays.
    chunk = lambda n, c: (n, c if n > c else n)  # noqa: E731  (one chunk holding exactly the data)
    write_metadata(part, attrs, dtype, {
        "train": {"tokens": chunk(n_tokens, CHUNK_TOKENS), "doc_offsets": chunk(n_off, OFFSET_CHUNK)},
        "val": {"tokens": (val_tokens, val_tokens), "doc_offsets": (2, 2)},
    })


def run_train(root: Path, store: Path, sources: dict, window_start: str, name: str) -> dict:
    params = {"data": {"sources": {n: {"path": "unused", "weight": w} for n, w in sources.items()}}}
    (root / f"{name}.yaml").write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "stages.cli", "train", "--data", str(store), "--tokenizer", str(root / "tokenizer"),
           "--model", str(root / "model.json"), "--device", "cpu", "--resume", "none",
           "--params", str(root / f"{name}.yaml")]
    for s in ("train.max_steps=2", "train.seq_len=256", "train.micro_batch_size=8", "train.eval_interval=0",
              f"train.window_start={window_start}", f"train.out_dir={root / name}", "train.save_interval=100"):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = root / name / "train_log.tsv"
    shutil.rmtree(root / name, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    first = None
    while proc.poll() is None:  # the first step is logged when its row appears
        if first is None and log.exists() and len(log.read_text().splitlines()) > 1:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(err[-3000:])
    peak_kib = int(err.strip().splitlines()[-1])
    return {"first_step_s": round(first or wall, 2), "wall_s": round(wall, 2), "peak_rss_mib": round(peak_kib / 1024),
            "load": round(os.getloadavg()[0], 1)}


# Runs the command and prints its peak RSS (KiB) last on stderr: a fresh parent per
# command, because RUSAGE_CHILDREN keeps the largest child ever waited for.
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/mm_bigstore"))
    ap.add_argument("--sizes", type=float, nargs="+", default=[5e9])
    ap.add_argument("--doc-len", type=int, default=2048)
    args = ap.parse_args()
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    from pipeline.data.corpus import write_sample
    from pipeline.data.tokenize import tokenize_files
    from pipeline.data.tokenizer_training import train_tokenizer

    store = root / "tokens.zarr"
    if not (root / "tokenizer").exists():
        write_sample(root / "sample.jsonl")
        train_tokenizer([root / "sample.jsonl"], root / "tokenizer", vocab_size=1024)
    if not store.exists():
        tokenize_files([root / "sample.jsonl"], root / "tokenizer", store, source="sample", val_fraction=0.02,
                       progress=False)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "stages.cli", "config", "--tokenizer", str(root / "tokenizer"), "--out",
                    str(root / "model.json"), "--set", "model.dim=64", "--set", "model.n_layers=2"],
                   check=True, capture_output=True, env=env, cwd=root)
    root_attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    assert root_attrs["format"] == FORMAT_NAME and root_attrs["version"] == FORMAT_VERSION

    rows = []
    for ws in ("stream", "document"):
        base = run_train(root, store, {"sample": 1.0}, ws, f"tiny_{ws}")
        rows.append({"tokens": "sample only", "window_start": ws, **base})
    for size in args.sizes:
        n = int(size)
        add_big_source(store, root_attrs, n, args.doc_len)
        t0 = time.perf_counter()
        opened = open_store(store, sources=["big", "sample"])
        open_s = time.perf_counter() - t0
        assert opened.sources["big"].train.n_tokens == n
        for ws in ("stream", "document"):  # in process: the data side alone, no torch import or model
            tp = TrainParams(seq_len=256, micro_batch_size=8, window_start=ws)
            t0 = time.perf_counter()
            data = open_train_data(store, {"big": 0.9, "sample": 0.1}, tp, note=lambda _: None)
            first = next(data.sampler.micro_batches(0, 0, 1, 8, 1))
            far = next(data.sampler.micro_batches(10**8, 0, 1, 8, 1))
            print(json.dumps({"tokens": n, "window_start": ws, "data_ready_and_2_batches_s":
                              round(time.perf_counter() - t0, 3), "windows_big": data.sampler.windows[0].n_windows,
                              "batch": list(first.inputs.shape), "far_batch": list(far.inputs.shape)}), flush=True)
        for ws in ("stream", "document"):
            r = run_train(root, store, {"big": 0.9, "sample": 0.1}, ws, f"big_{ws}")
            rows.append({"tokens": f"{n:.3g}", "window_start": ws, "open_store_s": round(open_s, 3), **r})
        print(json.dumps(rows[-2:]), flush=True)
    (root / "report.json").write_text(json.dumps(rows, indent=1))
    print("| store (big source) | window_start | open_store | first step logged | 2 steps, wall | peak RSS | load |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['window_start']} | {r.get('open_store_s', '')} | {r['first_step_s']} s | "
              f"{r['wall_s']} s | {r['peak_rss_mib']} MiB | {r['load']} |")


if __name__ == "__main__":
    main()
