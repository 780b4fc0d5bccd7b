"""The GGUF export runs in llama.cpp and continues a prompt exactly as `mm generate` does.

    python bench/gguf_check.py [CKPT ...] [--tokens 32]

Needs `gguf` and `llama-cpp-python` (built from its source package:
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python`).
With no checkpoint it fabricates two (plain → GGUF arch llama with the q/k
permutation, QK-norm → arch qwen3) from the tiny preset, with a tokenizer
trained on a slice of the embedded corpus; pass real `out/ckpt.pth` files to
check trained models. For each: export GGUF (fp32), tokenize the prompts in
llama.cpp and in mm, run greedy decoding in both, and report the first
divergence and the largest logit difference. Exit code 0 only if every
continuation matches for at least --min-match tokens (default 20).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "The function returns",
    "def parse(path):\n    \"\"\"",
    "Return a new list of",
]


def fabricate(root: Path) -> list[Path]:
    """Random-init tiny checkpoints (init std raised so greedy choices are not near-ties)."""
    from pipeline.architecture import build_config
    from pipeline.checkpoint.format import save_checkpoint
    from pipeline.data.corpus import write_sample
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.data.tokenizer_training import train_tokenizer
    from pipeline.model.transformer import Transformer

    corpus = root / "sample.jsonl"
    write_sample(corpus)
    lines = corpus.read_text().splitlines()[:3000]
    corpus.write_text("\n".join(lines) + "\n")
    train_tokenizer([corpus], root / "tok", vocab_size=1024)
    _, info = load_tokenizer(root / "tok")
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    files = {n: (root / "tok" / n).read_text() for n in names}
    paths = []
    for name, preset in (("plain", "tiny"), ("qknorm", "minimind3")):
        config = build_config(preset, info["vocab_size"], {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                                                           "max_seq_len": 512, "init_std": 0.1})
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        state = dict(format="mm-checkpoint", version=1, step=0, model=model.state_dict(), optimizer={}, scaler=None,
                     rng={}, model_config=dataclasses.asdict(config), train_config={}, data={"seq_len": 256},
                     tokenizer=files, metrics={})
        save_checkpoint(state, root / name, keep_last=1)
        paths.append(root / name / "ckpt.pth")
    return paths


def check(ckpt: Path, work: Path, n_tokens: int) -> int:
    """Greedy-decode every prompt in mm and llama.cpp; returns the shortest matching prefix."""
    from llama_cpp import Llama

    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.evaluate.generate import generate
    from pipeline.export.exporter import export_gguf
    from pipeline.export.loading import load_model

    state = load_checkpoint(ckpt)
    gguf_path = export_gguf(state, work / f"{ckpt.parent.name}.gguf", "fp32", source=str(ckpt))
    loaded = load_model(ckpt)
    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    arch = llm.metadata.get("general.architecture")
    shortest = n_tokens
    for prompt in PROMPTS:
        stats: dict = {}
        text = "".join(generate(loaded, prompt, n_tokens, temperature=0, stats=stats))
        ours = stats["token_ids"]

        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        mm_prompt = [loaded.bos_id] + loaded.tokenizer.encode(prompt).ids
        assert ids == mm_prompt, f"tokenization differs: llama.cpp {ids} vs mm {mm_prompt}"
        # llama.cpp's greedy decoding (ours came from pipeline.evaluate.generate above), keeping its logits.
        llm.reset()
        llm.eval(ids)
        theirs, their_logits = [], []
        for _ in range(len(ours)):
            logits = np.asarray(llm.scores[llm.n_tokens - 1])
            their_logits.append(logits)
            nxt = int(logits.argmax())
            theirs.append(nxt)
            if nxt == loaded.eos_id:
                break
            llm.eval([nxt])
        # mm's logits at the same positions: one forward pass over llama.cpp's sequence.
        with torch.no_grad():
            ref = loaded.model(torch.tensor([mm_prompt + theirs[:-1]]))[0][0, len(mm_prompt) - 1 :].numpy()
        max_diff = float(np.abs(np.stack(their_logits) - ref).max()) if theirs else 0.0
        same = min(len(ours), len(theirs))
        match = next((i for i, (a, b) in enumerate(zip(ours[:same], theirs[:same], strict=True)) if a != b), same)
        shortest = min(shortest, match)
        print(f"{ckpt.parent.name:8s} arch={arch:6s} prompt={prompt[:24]!r:28s} mm={len(ours)} tokens, "
              f"llama.cpp matches {match}/{len(ours)}, max |Δlogit| {max_diff:.2e}")
        print(f"    mm        : {text[:90]!r}")
        print(f"    llama.cpp : {llm.detokenize(theirs).decode('utf-8', 'replace')[:90]!r}")
    return shortest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpts", nargs="*", type=Path)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--min-match", type=int, default=20)
    args = ap.parse_args()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpts = args.ckpts or fabricate(work)
        worst = min(check(c, work, args.tokens) for c in ckpts)
    ok = worst >= min(args.min_match, args.tokens)
    print(f"{'OK' if ok else 'FAIL'}: every greedy continuation matches for at least {worst} tokens")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
