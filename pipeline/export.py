"""Export a checkpoint to a Hugging Face model directory or a GGUF file.

Our parameter names already follow Hugging Face's Llama / Qwen3 layout (see
pipeline/model.py), so export is a renaming table plus a config.json; no
tensor is reshaped for transformers. The table (`weight_map`) is explicit and
used in both directions: export checks that the checkpoint holds exactly the
names it lists, and loading an exported directory back (pipeline/generate.py)
checks that the safetensors file holds exactly the names it produces. A
missing or unexpected name is an error, never silently skipped.

Which transformers class:

    plain model              LlamaForCausalLM      (model_type llama)
    QK-norm                  Qwen3ForCausalLM      (qwen3: q_norm/k_norm per head before RoPE)
    MoE                      MixtralForCausalLM    (mixtral: softmax → top-k → renormalise)
    MoE + QK-norm            Qwen3MoeForCausalLM   (qwen3_moe with norm_topk_prob = true)

MoE experts are written one tensor per expert, the layout of the published
Mixtral / Qwen3-MoE checkpoints: transformers 4.x reads it as is and 5.x fuses
the experts at load time through its own conversion mapping.

GGUF (llama.cpp): the plain model as arch `llama`, whose RoPE rotates adjacent
pairs (2i, 2i+1) while ours (like HF) rotates (i, i + head_dim/2); so the rows
of q_proj and k_proj are permuted inside each head exactly as llama.cpp's
convert_hf_to_gguf.py (LlamaModel.permute) does. The QK-norm model goes out as
arch `qwen3`, which uses the NeoX (rotate-half) RoPE: no permutation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from pipeline.checkpoint import model_config
from pipeline.errors import UserError
from pipeline.hardware import DTYPES
from pipeline.manifest import write_manifest
from pipeline.model import ModelConfig

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Sampling defaults written to generation_config.json (the same values as `mm generate`'s option defaults).
GENERATION_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0}


# ---------------------------------------------------------------------------
# The mapping table: ours → Hugging Face
# ---------------------------------------------------------------------------

# Per block, names after "layers.N." (ours) and "model.layers.N." (HF).
_ATTENTION = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}
_QK_NORM = {
    "self_attn.q_norm.weight": "self_attn.q_norm.weight",
    "self_attn.k_norm.weight": "self_attn.k_norm.weight",
}
_DENSE_MLP = {
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
# MoE: the router, then each expert's three matrices ("{j}" = expert index).
_MOE = {
    "mixtral": {
        "mlp.gate.weight": "block_sparse_moe.gate.weight",
        "mlp.experts.{j}.gate_proj.weight": "block_sparse_moe.experts.{j}.w1.weight",
        "mlp.experts.{j}.down_proj.weight": "block_sparse_moe.experts.{j}.w2.weight",
        "mlp.experts.{j}.up_proj.weight": "block_sparse_moe.experts.{j}.w3.weight",
    },
    "qwen3_moe": {
        "mlp.gate.weight": "mlp.gate.weight",
        "mlp.experts.{j}.gate_proj.weight": "mlp.experts.{j}.gate_proj.weight",
        "mlp.experts.{j}.up_proj.weight": "mlp.experts.{j}.up_proj.weight",
        "mlp.experts.{j}.down_proj.weight": "mlp.experts.{j}.down_proj.weight",
    },
}
# Outside the blocks. The output head is tied to embed_tokens: stored once, as HF does.
_GLOBAL = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def hf_model_type(config: ModelConfig) -> str:
    if config.n_experts:
        return "qwen3_moe" if config.qk_norm else "mixtral"
    return "qwen3" if config.qk_norm else "llama"


def weight_map(config: ModelConfig, model_type: str | None = None) -> dict[str, str]:
    """Every parameter of our Transformer → its name in the HF checkpoint, in model order."""
    model_type = model_type or hf_model_type(config)
    block = dict(_ATTENTION)
    if config.qk_norm:
        block.update(_QK_NORM)
    if config.n_experts:
        for ours, theirs in _MOE[model_type].items():
            if "{j}" in ours:
                block.update({ours.format(j=j): theirs.format(j=j) for j in range(config.n_experts)})
            else:
                block[ours] = theirs
    else:
        block.update(_DENSE_MLP)
    table = {"embed_tokens.weight": _GLOBAL["embed_tokens.weight"]}
    for i in range(config.n_layers):
        table.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in block.items()})
    table["norm.weight"] = _GLOBAL["norm.weight"]
    return table


def check_keys(found, expected, source: str) -> None:
    """Strict loading: the names present must be exactly the names expected."""
    found, expected = set(found), set(expected)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weight(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} weight(s) ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise UserError(f"{source}: weights do not match the model config: {'; '.join(parts)}")


# ---------------------------------------------------------------------------
# config.json and back
# ---------------------------------------------------------------------------


def hf_config(config: ModelConfig, torch_dtype: torch.dtype, bos_id: int, eos_id: int, pad_id: int) -> dict:
    model_type = hf_model_type(config)
    doc = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 4.x reads rope_theta (rope_scaling null = plain RoPE); 5.x reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "initializer_range": config.init_std,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": TORCH_DTYPE_NAMES[torch_dtype],
    }
    if model_type == "llama":
        doc["mlp_bias"] = False
    if model_type in ("qwen3", "qwen3_moe", "mixtral"):
        doc.update(use_sliding_window=False, sliding_window=None)
    if model_type == "qwen3":
        doc["max_window_layers"] = config.n_layers
    if model_type == "mixtral":
        doc.update(num_local_experts=config.n_experts, num_experts_per_tok=config.top_k,
                   router_aux_loss_coef=config.aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False)
    if model_type == "qwen3_moe":
        doc.update(num_experts=config.n_experts, num_experts_per_tok=config.top_k, moe_intermediate_size=config.hidden_dim,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=config.aux_loss_coef, output_router_logits=False)
    # Fields transformers has no slot for (kept so a round trip through the export is exact).
    doc["mm"] = {"format": "mm-export", "init_std": config.init_std, "aux_loss_coef": config.aux_loss_coef}
    return doc


def config_from_hf(doc: dict, source: str) -> ModelConfig:
    """The ModelConfig an exported config.json describes; refuses what our model cannot represent."""
    from pipeline.architecture import config_from_dict

    model_type = doc.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{source}: model_type {model_type!r} is not one mm exports (known: {', '.join(ARCHITECTURES)})")
    if doc.get("tie_word_embeddings") is not True:
        raise UserError(f"{source}: only tied embeddings are supported (tie_word_embeddings is not true)")
    if doc.get("hidden_act", "silu") != "silu" or doc.get("attention_bias") or doc.get("mlp_bias"):
        raise UserError(f"{source}: hidden_act, attention_bias or mlp_bias differ from what mm exports")
    rope = doc.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or doc.get("rope_scaling"):
        raise UserError(f"{source}: only plain RoPE is supported (rope_type {rope.get('rope_type')!r})")
    try:
        values = dict(
            vocab_size=doc["vocab_size"],
            dim=doc["hidden_size"],
            n_layers=doc["num_hidden_layers"],
            n_heads=doc["num_attention_heads"],
            n_kv_heads=doc.get("num_key_value_heads", doc["num_attention_heads"]),
            head_dim=doc.get("head_dim") or doc["hidden_size"] // doc["num_attention_heads"],
            hidden_dim=doc["moe_intermediate_size"] if model_type == "qwen3_moe" else doc["intermediate_size"],
            max_seq_len=doc["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", doc.get("rope_theta", 10000.0))),
            norm_eps=float(doc["rms_norm_eps"]),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
        )
    except KeyError as e:
        raise UserError(f"{source}: config.json lacks field {e.args[0]!r}") from None
    if model_type == "mixtral":
        values.update(n_experts=doc.get("num_local_experts", 0), top_k=doc.get("num_experts_per_tok", 2))
    if model_type == "qwen3_moe":
        values.update(n_experts=doc.get("num_experts", 0), top_k=doc.get("num_experts_per_tok", 2))
        if not doc.get("norm_topk_prob") or doc.get("mlp_only_layers") or doc.get("decoder_sparse_step", 1) != 1:
            raise UserError(f"{source}: Qwen3-MoE variant (norm_topk_prob / mlp_only_layers / decoder_sparse_step) differs from mm's MoE")
    extra = doc.get("mm") or {}
    for key in ("init_std", "aux_loss_coef"):
        if key in extra:
            values[key] = float(extra[key])
    return config_from_dict(values, source=source)


# ---------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------


def tokenizer_files(state: dict, source: str) -> tuple[dict[str, str], dict]:
    """The checkpoint's tokenizer files, tokenizer_config.json completed for transformers
    4.x/5.x and llama.cpp, and the tokenizer's info (`tokenizer.tokenizer_from_files`:
    bos/eos/pad ids and strings, whatever tokenizer the model was trained with)."""
    from pipeline.tokenizer import tokenizer_from_files

    files = dict(state.get("tokenizer") or {})
    _, info = tokenizer_from_files(files, f"{source} tokenizer")
    try:
        tok_config = json.loads(files.get("tokenizer_config.json") or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: tokenizer_config.json in the checkpoint is not valid JSON ({e.msg})") from None
    special = {f"{k}_token": info[f"{k}_token"] for k in ("bos", "eos", "pad")}
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        **special,
        model_max_length=int(state["model_config"].get("max_seq_len", 32768)),
        clean_up_tokenization_spaces=False,
    )
    files["tokenizer_config.json"] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
    files["special_tokens_map.json"] = json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    return files, info


# ---------------------------------------------------------------------------
# Hugging Face directory
# ---------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"export.dtype: must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def export_hf(state: dict, out_dir: str | Path, dtype: str = "fp32", source: str = "checkpoint") -> Path:
    """Write a transformers-loadable directory; written to a temp dir and renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    torch_dtype = _dtype(dtype)
    config = model_config(state, source)
    table = weight_map(config)
    check_keys(state["model"].keys(), table.keys(), source)
    files, tok = tokenizer_files(state, source)

    tensors = {}
    for ours, theirs in table.items():
        t = state["model"][ours]
        expected = _shape(config, ours)
        if tuple(t.shape) != expected:
            raise UserError(f"{source}: weight {ours} has shape {tuple(t.shape)}, the config says {expected}")
        tensors[theirs] = t.detach().to("cpu", torch_dtype).contiguous()

    doc = hf_config(config, torch_dtype, tok["bos_id"], tok["eos_id"], tok["pad_id"])
    generation = {
        "bos_token_id": tok["bos_id"], "eos_token_id": tok["eos_id"], "pad_token_id": tok["pad_id"],
        "do_sample": True, **GENERATION_DEFAULTS, "max_new_tokens": 256,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(model_card(state, config, doc, dtype, tok), encoding="utf-8")
        write_manifest(tmp)  # last: hashes of every file above, for `mm verify` and `sha256sum -c`

    _write_dir_atomically(out_dir, write)
    return out_dir


def _shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """Expected shape of one of our parameters (catches a checkpoint whose config lies)."""
    c, leaf = config, name.split(".")
    if name == "embed_tokens.weight":
        return (c.vocab_size, c.dim)
    if name.endswith(("layernorm.weight",)) or name == "norm.weight":
        return (c.dim,)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (c.head_dim,)
    proj = leaf[-2]
    return {
        "q_proj": (c.n_heads * c.head_dim, c.dim), "k_proj": (c.n_kv_heads * c.head_dim, c.dim),
        "v_proj": (c.n_kv_heads * c.head_dim, c.dim), "o_proj": (c.dim, c.n_heads * c.head_dim),
        "gate_proj": (c.hidden_dim, c.dim), "up_proj": (c.hidden_dim, c.dim), "down_proj": (c.dim, c.hidden_dim),
        "gate": (c.n_experts, c.dim),
    }[proj]


def _write_dir_atomically(out_dir: Path, write) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise UserError(f"{out_dir}: exists, is not empty and is not a model export; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        raise UserError(f"{out_dir}: writing the export failed ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def model_card(state: dict, config: ModelConfig, doc: dict, dtype: str, tok: dict) -> str:
    from pipeline.architecture import count_params

    counts = count_params(config)
    metrics, data = state.get("metrics") or {}, state.get("data") or {}
    bos, eos = tok["bos_token"], tok["eos_token"]

    def fmt(value, spec=".4f"):
        return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"

    tokens = metrics.get("tokens_seen")
    rows = [
        ("architecture", f"{doc['architectures'][0]} ({'QK-norm, ' if config.qk_norm else ''}"
                         f"{f'MoE {config.top_k} of {config.n_experts} experts' if config.n_experts else 'dense'})"),
        ("parameters", f"{counts['total'] / 1e6:.2f}M (non-embedding {counts['non_embedding'] / 1e6:.2f}M"
                       + (f", active {counts['active'] / 1e6:.2f}M" if config.n_experts else "") + ")"),
        ("layers × dim", f"{config.n_layers} × {config.dim}, {config.n_heads} heads ({config.n_kv_heads} KV), head_dim {config.head_dim}"),
        ("vocabulary", str(config.vocab_size)),
        ("context (trained)", str(data.get("seq_len", "n/a"))),
        ("optimizer steps", str(state.get("step", "n/a"))),
        ("tokens seen", f"{tokens:,}" if isinstance(tokens, int) else fmt(tokens, ".3g")),
        ("final train loss", fmt(metrics.get("train_loss"))),
        ("final val loss", fmt(metrics.get("val_loss"))),
        ("weights dtype", dtype),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [mm, pretraining, small-lm]
---

# {doc['architectures'][0]} pretrained with mm

A small decoder-only language model pretrained from scratch with `mm`
(RMSNorm, RoPE θ={config.rope_theta:g}, grouped-query attention, SwiGLU, tied embeddings).
It is a base model: it continues text, it does not follow instructions.

| | |
| --- | --- |
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/this/dir")
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
ids = tok("{bos}Once upon a time", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=50)[0]))
```

Training documents were packed as `{bos}` text `{eos}`; start prompts with
`{bos}` to match. The tokenizer does not add it by itself.
"""


# ---------------------------------------------------------------------------
# GGUF (llama.cpp)
# ---------------------------------------------------------------------------


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order → interleaved pairs, per head (llama.cpp convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Our per-block names → llama.cpp tensor names (after "blk.N.").
_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}

# Pre-tokenizer regexes llama.cpp knows, by its name for them.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def gguf_pre_tokenizer(tok: dict, source: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (it has no way to read the regex itself)."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            return "gpt-2"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            if regex == _GPT2_REGEX:
                return "gpt-2"
    raise UserError(f"{source}: the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent mm knows; GGUF export needs a GPT-2 style byte-level BPE")


def export_gguf(state: dict, path: str | Path, dtype: str = "fp32", source: str = "checkpoint") -> Path:
    """Write a GGUF file llama.cpp runs: arch llama (plain) or qwen3 (QK-norm), with the tokenizer."""
    path = Path(path)
    _dtype(dtype)
    config = model_config(state, source)
    if config.n_experts:
        raise UserError(f"{source}: GGUF export of MoE models is not supported yet; export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf (or pip install 'mm[gguf]')") from None
    check_keys(state["model"].keys(), weight_map(config).keys(), source)
    files, ids = tokenizer_files(state, source)
    tok = json.loads(files["tokenizer.json"])
    pre = gguf_pre_tokenizer(tok, source)

    arch = "qwen3" if config.qk_norm else "llama"
    matrix_type = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    file_type = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(f"mm {arch} {config.n_layers}x{config.dim}")
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.hidden_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)

        # Tokenizer: GPT-2 style byte-level BPE, as convert_hf_to_gguf's _set_vocab_gpt2 writes it.
        vocab = tok["model"]["vocab"]
        added = {t["id"]: t for t in tok.get("added_tokens", [])}
        by_id = {i: s for s, i in vocab.items()}
        by_id.update({i: t["content"] for i, t in added.items()})
        tokens, types = [], []
        for i in range(config.vocab_size):
            if i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
            else:  # model vocabulary padded beyond the tokenizer's
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(ids["bos_id"])
        writer.add_eos_token_id(ids["eos_id"])
        writer.add_pad_token_id(ids["pad_id"])
        # Documents were trained as BOS + text + EOS: llama.cpp prepends BOS as `mm generate` does.
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)

        weights = state["model"]
        for ours, theirs in _GGUF_GLOBAL.items():
            _add_tensor(writer, theirs, weights[ours], matrix_type)
        for i in range(config.n_layers):
            for name, gguf_name in _GGUF_BLOCK.items():
                key = f"layers.{i}.{name}"
                if key not in weights:
                    continue  # q_norm/k_norm only with QK-norm; the key set was checked above
                w = weights[key].detach().float().cpu()
                if arch == "llama" and name == "self_attn.q_proj.weight":
                    w = permute_for_llama_cpp(w, config.n_heads)
                elif arch == "llama" and name == "self_attn.k_proj.weight":
                    w = permute_for_llama_cpp(w, config.n_kv_heads)
                _add_tensor(writer, f"blk.{i}.{gguf_name}", w, matrix_type)
        # No output.weight: llama.cpp ties the output head to token_embd when it is absent.

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: writing the GGUF file failed ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _add_tensor(writer, name: str, t: torch.Tensor, matrix_type) -> None:
    import gguf
    import numpy as np

    t = t.detach().float().cpu()
    if t.dim() == 1 or matrix_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, t.numpy().astype(np.float32))  # norms stay fp32, as llama.cpp's converter keeps them
    elif matrix_type == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, t.numpy().astype(np.float16))
    else:  # bf16: quantize to the raw 16-bit pattern the gguf package expects
        data = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)

