"""mm export / generate / eval: the exported model is the trained model, everywhere it loads.

Checkpoints here are random-init models (norm gains perturbed so no weight is
trivially 1) saved through the real `save_checkpoint`, with the tokenizer of
the shared `tiny_store` fixture: what is tested is the mapping, not training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, mm

from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256}
VARIANTS = {  # name → (preset, overrides, expected transformers class)
    "plain": ("tiny", {}, "LlamaForCausalLM"),
    "qknorm": ("minimind3", {}, "Qwen3ForCausalLM"),
    "moe": ("minimind2-moe", {}, "MixtralForCausalLM"),
    "moe-qknorm": ("minimind2-moe", {"qk_norm": True}, "Qwen3MoeForCausalLM"),
}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 求和",
    "你好，世界！Hello 🌍🚀 emoji and 中文 mixed.",
    "Return the list of all\tnames, or None.",
]


def make_state(tokenizer_dir: Path, preset: str, overrides: dict, seed: int = 0) -> dict:
    from pipeline.architecture import build_config
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.transformer import Transformer

    _, info = load_tokenizer(tokenizer_dir)
    config = build_config(preset, info["vocab_size"], {**SMALL, **overrides})
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    files = {n: (tokenizer_dir / n).read_text(encoding="utf-8")
             for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    return dict(
        format="mm-checkpoint", version=1, step=7, model=model.state_dict(), optimizer={}, scaler=None, rng={},
        model_config=dataclasses.asdict(config), train_config={"seq_len": 64},
        data={"tokenizer_sha256": info["fingerprint"], "store_fingerprint": "x", "vocab_size": info["vocab_size"],
              "seq_len": 64},
        tokenizer=files, metrics={"train_loss": 6.5, "val_loss": 6.6, "tokens_seen": 4096},
    )


@pytest.fixture(scope="module")
def ckpts(tiny_store, tmp_path_factory) -> dict[str, Path]:
    from pipeline.checkpoint.format import save_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i, (name, (preset, overrides, _)) in enumerate(VARIANTS.items()):
        save_checkpoint(make_state(tiny_store.tokenizer, preset, overrides, seed=i), root / name, keep_last=1)
        out[name] = root / name / "ckpt.pth"
    return out


@pytest.fixture(scope="module")
def exports(ckpts, tmp_path_factory) -> dict[str, Path]:
    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.export.exporter import export_hf

    root = tmp_path_factory.mktemp("exports")
    out = {name: root / name for name in ckpts}
    r = mm("export", ckpts["plain"], "--out", out["plain"])  # the CLI once; the others through the API
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout
    for name in ("qknorm", "moe", "moe-qknorm"):
        export_hf(load_checkpoint(ckpts[name]), out[name], "fp32")
    return out


FRESH_PROCESS = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
dirs, prompts, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
result = {}
for name, d in dirs.items():
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(d)
    ids = [[tok.bos_token_id] + tok(p).input_ids for p in prompts]
    with torch.no_grad():
        logits = [model(torch.tensor([x])).logits[0].tolist() for x in ids]
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    result[name] = {"class": type(model).__name__, "tied": tied,
                    "loading": {k: [str(x) for x in v] for k, v in info.items()}, "ids": ids, "logits": logits,
                    "decoded": [tok.decode(x[1:]) for x in ids]}
json.dump(result, open(out, "w"))
"""


def test_export_loads_in_fresh_transformers_process_and_matches(exports, ckpts, tiny_store, tmp_path):
    """Plain / QK-norm / MoE exports load with AutoModelForCausalLM and
    AutoTokenizer in a new process (no remote code); logits match mm within 1e-4; the
    exported tokenizer encodes mixed text exactly as the training tokenizer."""
    from pipeline.checkpoint.format import load_checkpoint, model_from_checkpoint
    from pipeline.data.tokenizer import load_tokenizer

    out = tmp_path / "hf.json"
    r = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps({k: str(v) for k, v in exports.items()}),
                        json.dumps(PROMPTS), str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    hf = json.loads(out.read_text())
    train_tok, info = load_tokenizer(tiny_store.tokenizer)
    for name, ckpt in ckpts.items():
        got = hf[name]
        assert got["class"] == VARIANTS[name][2]
        assert got["tied"], name
        problems = ("missing_keys", "unexpected_keys", "mismatched_keys")
        assert not any(got["loading"].get(k) for k in problems), got["loading"]
        model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
        for prompt, ids, logits, decoded in zip(PROMPTS, got["ids"], got["logits"], got["decoded"], strict=True):
            assert ids == [info["bos_id"]] + train_tok.encode(prompt).ids  # the tokenizer round trip
            assert decoded == prompt
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0][0]
            diff = (ours - torch.tensor(logits)).abs().max().item()
            assert diff < 1e-4, (name, prompt, diff)


def test_export_dir_contents(exports):
    d = exports["plain"]
    assert sorted(p.name for p in d.iterdir()) == sorted([
        "README.md", "SHA256SUMS", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    config = json.loads((d / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 16
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e6
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"], gen["do_sample"]) == (1, 2, 0, True)
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    card = (d / "README.md").read_text()
    assert "4,096" in card and "6.6000" in card and "LlamaForCausalLM" in card
    # A checkpoint from before sources and bits per byte were recorded still exports, and says so.
    assert "| data sources | not recorded (token store x) |" in card and "## Training data" not in card
    assert "| val bits per byte | not recorded (`mm eval` on the val split reports it) |" in card
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: stored once
    moe = json.loads((exports["moe"] / "config.json").read_text())
    assert moe["num_local_experts"] == 4 and moe["num_experts_per_tok"] == 2


def test_reexport_replaces_and_bf16(ckpts, tmp_path):
    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.export.exporter import export_hf
    from pipeline.export.loading import load_model

    state = load_checkpoint(ckpts["qknorm"])
    d = export_hf(state, tmp_path / "e", "bf16")
    export_hf(state, d, "bf16")  # replacing an earlier export is fine
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(d)
    ref = state["model"]["layers.0.self_attn.q_proj.weight"]
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, ref.to(torch.bfloat16).float())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier `mm export`"):
        export_hf(state, tmp_path / "other", "fp32")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_export_out_replaces_only_what_mm_export_wrote(ckpts, exports, tmp_path):
    """`mm export --out DIR`: a DIR holding a config.json and other files (another model's directory),
    or an earlier export with a file added, is refused: exit 1, one line, every file intact. An earlier
    export as mm wrote it is replaced."""
    import shutil

    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "config.json").write_text('{"model_type": "llama"}\n')
    (theirs / "pytorch_model.bin").write_bytes(b"\0" * 100)
    (theirs / "sub" / "notes.md").write_text("keep me\n")
    before = _files(theirs)
    assert_user_error(mm("export", ckpts["plain"], "--out", theirs), str(theirs), "not an earlier `mm export`")
    assert _files(theirs) == before

    added = tmp_path / "added"
    shutil.copytree(exports["plain"], added)
    (added / "my_eval.json").write_text("{}\n")
    before = _files(added)
    assert_user_error(mm("export", ckpts["plain"], "--out", added), "my_eval.json", "not in its SHA256SUMS")
    assert _files(added) == before

    (added / "my_eval.json").unlink()
    (added / "README.md").write_text("stale\n")  # listed in SHA256SUMS: mm export's own file, replaced
    r = mm("export", ckpts["plain"], "--out", added)
    assert r.returncode == 0, r.stderr
    assert _files(added) == _files(exports["plain"])


def test_strict_mapping(ckpts, exports, tmp_path):
    """An unexpected or missing weight is an error, both exporting and loading an export back."""
    from safetensors.torch import load_file, save_file

    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.export.exporter import export_hf
    from pipeline.export.loading import load_model

    state = load_checkpoint(ckpts["plain"])
    state["model"]["layers.0.mlp.extra.weight"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"unexpected 1 weight\(s\) \(layers.0.mlp.extra.weight\)"):
        export_hf(state, tmp_path / "a", "fp32")
    state = load_checkpoint(ckpts["plain"])
    del state["model"]["layers.1.self_attn.k_proj.weight"]
    with pytest.raises(UserError, match=r"missing 1 weight\(s\) \(layers.1.self_attn.k_proj.weight\)"):
        export_hf(state, tmp_path / "b", "fp32")

    import shutil

    d = tmp_path / "c"
    shutil.copytree(exports["plain"], d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"unexpected 1 weight\(s\) \(model.layers.0.mlp.extra.weight\)"):
        load_model(d)
    # A stored lm_head.weight is read as the tied head: accepted equal to the embedding, refused otherwise.
    del tensors["model.layers.0.mlp.extra.weight"]
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(d / "model.safetensors"))
    load_model(d)
    tensors["lm_head.weight"][0, 0] += 1
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(UserError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_model(d)


def test_generate_from_export_equals_checkpoint_and_streams_utf8(ckpts, exports):
    from pipeline.evaluate.generate import generate
    from pipeline.export.loading import load_model

    a, b = load_model(ckpts["qknorm"]), load_model(exports["qknorm"])
    sa, sb = {}, {}
    text_a = "".join(generate(a, "你好 🌍", 24, temperature=0, stats=sa))
    text_b = "".join(generate(b, "你好 🌍", 24, temperature=0, stats=sb))
    assert sa["token_ids"] == sb["token_ids"] and text_a == text_b
    pieces = list(generate(a, "x", 24, temperature=1.0, top_k=0, top_p=1.0, seed=5, stats=sa))
    assert "".join(pieces) == a.tokenizer.decode(sa["token_ids"])
    assert sa["tokens_per_second"] > 0


def test_incremental_decoding_keeps_multibyte_characters_whole(tiny_store):
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluate.generate import _IncrementalDecoder

    tok, _ = load_tokenizer(tiny_store.tokenizer)
    text = "中文 🌍🚀 naïve — done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split())  # characters split over byte-level tokens
    decoder = _IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_cli_same_seed_same_text(exports, ckpts):
    """A fixed seed gives the same text twice (from an export and from a checkpoint)."""
    args = ["Once upon a time", "--max-new-tokens", "24", "--temperature", "1.0", "--top-k", "40",
            "--top-p", "0.9", "--repetition-penalty", "1.1"]
    runs = [mm("generate", model, *args, "--seed", 7) for model in (exports["plain"], exports["plain"])]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("Once upon a time") and "tokens/s" in r.stderr
    assert runs[0].stdout == runs[1].stdout

    from pipeline.evaluate.generate import generate
    from pipeline.export.loading import load_model

    def text(model, seed):
        return "".join(generate(load_model(model), "Once upon a time", 24, 1.0, 40, 0.9, 1.1, seed))

    assert runs[0].stdout == "Once upon a time" + text(ckpts["plain"], 7) + "\n"  # checkpoint = export
    assert text(exports["plain"], 8) != text(exports["plain"], 7)


def test_eval_bits_per_byte_consistent(exports, ckpts, tiny_store, tmp_path):
    """Bits/byte = loss·tokens / (ln 2 · bytes), with bytes those of the scored text;
    a checkpoint and its export score the same."""
    from pipeline.data.store.reader import open_store
    from pipeline.data.tokenizer import load_tokenizer

    out = tmp_path / "eval.json"
    r = mm("eval", exports["moe"], "--data", tiny_store.store, "--out", out, "--seq-len", 32,
           "--set", "eval.batches=3", "--set", "eval.batch_size=4")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert "bits per byte" in r.stdout
    assert m["windows"] == 12 and m["tokens"] == 12 * 32
    assert m["bits_per_byte"] == pytest.approx(m["val_loss"] * m["tokens"] / (math.log(2) * m["bytes"]), rel=1e-12)
    assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    # The scored targets are those of 12 windows spread evenly over the val split (the rule training's
    # validation uses): bytes = the UTF-8 length of their text.
    from pipeline.data.sampler import eval_windows

    tok, _ = load_tokenizer(tiny_store.tokenizer)
    val = open_store(tiny_store.store).val.tokens
    windows = eval_windows((len(val) - 1) // 32, 12)
    assert len(set(windows.tolist())) == 12 and windows[-1] > 12  # spread, not the first 12
    text_bytes = sum(len(tok.decode([int(t) for t in val[w * 32 + 1 : w * 32 + 33]]).encode("utf-8")) for w in windows)
    assert abs(m["bytes"] - text_bytes) <= 6 * 12  # ≤ one split character at each end of a window

    from pipeline.evaluate.held_out import evaluate_model

    m2 = evaluate_model(ckpts["moe"], tiny_store.store, seq_len=32, batches=3, batch_size=4, device="cpu")
    assert m2["val_loss"] == pytest.approx(m["val_loss"], abs=1e-5) and m2["bytes"] == m["bytes"]
    assert m2["train_val_loss"] == 6.6


def test_user_errors(ckpts, tmp_path):
    assert_user_error(mm("export", tmp_path / "nope.pth"), "nope.pth", "not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(mm("generate", tmp_path / "empty", "hi"), "not a model directory")
    old = tmp_path / "old.pth"
    torch.save({"format": "mm-checkpoint", "version": 99}, old)
    assert_user_error(mm("export", old), "version 99")

    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.evaluate.held_out import evaluate_model
    from pipeline.export.exporter import export_gguf, export_hf
    from pipeline.export.loading import load_model

    with pytest.raises(UserError, match="version 99"):
        load_model(old)
    with pytest.raises(UserError, match="none.zarr: token store not found"):
        evaluate_model(tmp_path / "empty", tmp_path / "none.zarr", 32, 1, 1)
    with pytest.raises(UserError, match="export.dtype"):
        export_hf(load_checkpoint(ckpts["plain"]), tmp_path / "x", "int8")
    with pytest.raises(UserError, match="MoE models is not supported yet"):
        export_gguf(load_checkpoint(ckpts["moe"]), tmp_path / "m.gguf")


def test_bad_device_is_a_user_error(ckpts, tiny_store, tmp_path):
    assert_user_error(mm("generate", ckpts["plain"], "hi", "--device", "foo"), "--device", "foo")
    assert_user_error(mm("eval", ckpts["plain"], "--data", tiny_store.store, "--out", tmp_path / "e.json",
                         "--device", "foo"), "--device", "foo")
    if not torch.cuda.is_available():
        assert_user_error(mm("generate", ckpts["plain"], "hi", "--device", "cuda"), "no CUDA")
        assert_user_error(mm("eval", ckpts["plain"], "--data", tiny_store.store, "--out", tmp_path / "e.json",
                             "--device", "cuda"), "no CUDA")
    assert not (tmp_path / "e.json").exists()


def test_gpt2_style_tokenizer_ids_come_from_the_tokenizer(tiny_store, tmp_path):
    """A tokenizer with only an eos_token (GPT-2/Qwen style): export and generate use EOS as
    BOS and pad, as `mm tokenize` packed the documents; nothing assumes MiniMind's strings."""
    from pipeline.checkpoint.format import load_checkpoint, save_checkpoint
    from pipeline.evaluate.generate import generate
    from pipeline.export.exporter import export_hf
    from pipeline.export.loading import load_model

    state = make_state(tiny_store.tokenizer, "tiny", {})
    state["tokenizer"] = {"tokenizer.json": state["tokenizer"]["tokenizer.json"],
                          "tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>"})}
    save_checkpoint(state, tmp_path / "ck", keep_last=1)
    ckpt = tmp_path / "ck" / "ckpt.pth"
    out = export_hf(load_checkpoint(ckpt), tmp_path / "exp", "fp32")
    doc = json.loads((out / "config.json").read_text())
    assert (doc["bos_token_id"], doc["eos_token_id"], doc["pad_token_id"]) == (2, 2, 2)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == tok_config["eos_token"] == tok_config["pad_token"] == "<|im_end|>"
    assert "<|im_end|>Once upon a time" in (out / "README.md").read_text()
    for path in (ckpt, out):
        loaded = load_model(path)
        assert (loaded.bos_id, loaded.eos_id) == (2, 2)
        stats: dict = {}
        list(generate(loaded, "Once", 4, temperature=0, stats=stats))
        assert stats["prompt_tokens"] == 1 + len(loaded.tokenizer.encode("Once").ids)
    # A tokenizer without any eos_token cannot delimit documents: refused, naming the checkpoint.
    state["tokenizer"]["tokenizer_config.json"] = "{}"
    with pytest.raises(UserError, match="ck2.*no eos_token"):
        export_hf(state, tmp_path / "exp2", "fp32", source=str(tmp_path / "ck2"))


@pytest.mark.parametrize("name", ["plain", "qknorm"])
def test_gguf_tensors(ckpts, tmp_path, name):
    """GGUF layout: llama arch with q/k rows permuted to interleaved RoPE; qwen3 (NeoX RoPE) as is."""
    gguf = pytest.importorskip("gguf")
    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.export.exporter import export_gguf
    from pipeline.export.gguf import permute_for_llama_cpp

    state = load_checkpoint(ckpts[name])
    path = export_gguf(state, tmp_path / "m.gguf", "fp32")
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    assert arch == ("llama" if name == "plain" else "qwen3")
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == (20 if name == "plain" else 24)
    q = state["model"]["layers.1.self_attn.q_proj.weight"]
    k = state["model"]["layers.1.self_attn.k_proj.weight"]
    if name == "plain":
        assert torch.equal(tensors["blk.1.attn_q.weight"], permute_for_llama_cpp(q, 4))
        assert torch.equal(tensors["blk.1.attn_k.weight"], permute_for_llama_cpp(k, 2))
    else:
        assert torch.equal(tensors["blk.1.attn_q.weight"], q)
        assert torch.equal(tensors["blk.1.attn_k_norm.weight"], state["model"]["layers.1.self_attn.k_norm.weight"])


def test_permutation_turns_rotate_half_into_interleaved_rope():
    """The permuted q/k under interleaved RoPE give the same attention scores as ours under rotate-half."""
    from pipeline.export.gguf import permute_for_llama_cpp
    from pipeline.model.transformer import apply_rope, rope_tables

    torch.manual_seed(0)
    hd, heads, T, dim = 8, 2, 5, 12
    wq, wk, x = torch.randn(heads * hd, dim), torch.randn(heads * hd, dim), torch.randn(T, dim)
    cos, sin = rope_tables(hd, T, 1e4)

    def ours(w):
        return apply_rope((x @ w.T).view(T, heads, hd).transpose(0, 1), cos, sin)

    def interleaved(w):
        v = (x @ w.T).view(T, heads, hd // 2, 2).transpose(0, 1)
        c, s = cos[:, : hd // 2, None], sin[:, : hd // 2, None]
        a, b = v[..., 0:1], v[..., 1:2]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1).reshape(heads, T, hd)

    ref = ours(wq) @ ours(wk).transpose(-1, -2)
    q, k = interleaved(permute_for_llama_cpp(wq, heads)), interleaved(permute_for_llama_cpp(wk, heads))
    got = q @ k.transpose(-1, -2)
    assert torch.allclose(ref, got, atol=1e-5)


def test_generate_says_why_it_stopped(ckpts):
    """At --max-new-tokens (the command's last line says so), and at end-of-text: the model's own
    greedy first token taken as EOS, so the first step meets it."""
    import dataclasses

    from pipeline.evaluate.generate import generate
    from pipeline.export.loading import load_model

    r = mm("generate", ckpts["plain"], "Once upon a time", "--max-new-tokens", 3, "--temperature", 0)
    assert r.returncode == 0 and r.stderr.strip().endswith("stopped at --max-new-tokens"), r.stderr
    loaded, stats = load_model(ckpts["plain"]), {}
    list(generate(loaded, "Once upon a time", 3, 0.0, 0, 1.0, 1.0, 0, stats))
    assert stats["stop"] == "max_new_tokens" and stats["new_tokens"] == 3
    first = stats["token_ids"][0]
    list(generate(dataclasses.replace(loaded, eos_id=first), "Once upon a time", 3, 0.0, 0, 1.0, 1.0, 0, stats))
    assert stats["stop"] == "end_of_text" and stats["new_tokens"] == 0
