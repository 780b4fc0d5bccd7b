"""The Hugging Face format of a model: weight names, config.json and tokenizer files.

Our parameter names already follow Hugging Face's Llama / Qwen3 layout (see
pipeline/model/transformer.py), so the format is a renaming table plus a config.json; no
tensor is reshaped for transformers. The table (`weight_map`) is explicit and
used in both directions: export checks that the checkpoint holds exactly the
names it lists, and reading a Hugging Face directory back (an export, or a
Llama / Qwen3 / Qwen3-MoE / MiniMind model to continue training:
pipeline/export/hf_import.py) checks that its files hold exactly the names it
produces. A missing or unexpected name is an error, never silently skipped.
Reading config.json back, and what it refuses, is pipeline/export/hf_config.py.

Which transformers class:

    plain model              LlamaForCausalLM      (model_type llama)
    QK-norm                  Qwen3ForCausalLM      (qwen3: q_norm/k_norm per head before RoPE)
    MoE                      MixtralForCausalLM    (mixtral: softmax → top-k → renormalise)
    MoE + QK-norm            Qwen3MoeForCausalLM   (qwen3_moe with norm_topk_prob = true)

MoE experts are written one tensor per expert, the layout of the published
Mixtral / Qwen3-MoE checkpoints: transformers 4.x reads it as is and 5.x fuses
the experts at load time through its own conversion mapping.
"""

from __future__ import annotations

import json

import torch

from pipeline.errors import UserError
from pipeline.model.transformer import ModelConfig

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

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
# MiniMind names its routed experts as Qwen3-MoE does (it has no shared experts here: see hf_config).
_MOE["minimind"] = _MOE["qwen3_moe"]
# Outside the blocks. The output head is tied to embed_tokens: stored once, as HF does.
_GLOBAL = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
# A tied head that a file stores anyway, or instead of the embedding (MiniMind's torch.save keeps both
# names; a save_pretrained of a model whose embedding *is* lm_head may keep only this one). Reading accepts
# it only as the same tensor as model.embed_tokens.weight (pipeline/export/hf_import.py checks it).
TIED_HEAD = "lm_head.weight"

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
    """Every parameter of our Transformer → its name in the HF checkpoint, in model order.

    The one table both directions use: export writes these names, and reading a directory back
    (pipeline/export/hf_import.py: `mm eval`, `mm generate`, train.init) requires exactly them.
    model_type: what config.json says (llama, qwen3, mixtral, qwen3_moe, minimind); by default
    the type export writes for this config."""
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
            more = ", ..." if len(missing) > 3 else ""
            parts.append(f"missing {len(missing)} weight(s) ({', '.join(missing[:3])}{more})")
        if unexpected:
            more = ", ..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {len(unexpected)} weight(s) ({', '.join(unexpected[:3])}{more})")
        raise UserError(f"{source}: weights do not match the model config: {'; '.join(parts)}")



def param_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
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
        doc.update(num_experts=config.n_experts, num_experts_per_tok=config.top_k,
                   moe_intermediate_size=config.hidden_dim,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=config.aux_loss_coef, output_router_logits=False)
    # Fields transformers has no slot for (kept so a round trip through the export is exact).
    doc["mm"] = {"format": "mm-export", "init_std": config.init_std, "aux_loss_coef": config.aux_loss_coef}
    return doc


# ---------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------


def tokenizer_files(state: dict, source: str) -> tuple[dict[str, str], dict]:
    """The checkpoint's tokenizer files, tokenizer_config.json completed for transformers
    4.x/5.x and llama.cpp, and the tokenizer's info (`tokenizer.tokenizer_from_files`:
    bos/eos/pad ids and strings, whatever tokenizer the model was trained with)."""
    from pipeline.data.tokenizer import tokenizer_from_files

    files = dict(state.get("tokenizer") or {})
    tokenizer, info = tokenizer_from_files(files, f"{source} tokenizer")
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
    if _has_chatml_tokens(tokenizer):
        tok_config["chat_template"] = CHATML_TEMPLATE
    files["tokenizer_config.json"] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
    files["special_tokens_map.json"] = json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    return files, info



# ChatML, the format MiniMind's supervised fine-tuning uses (and Qwen's): each message is
# <|im_start|>ROLE\nCONTENT<|im_end|>\n; without a system message first, the default one
# MiniMind inserts; add_generation_prompt opens the assistant's turn. For system / user /
# assistant messages the text (and so the ids) equals MiniMind's template's output. Unlike
# MiniMind's, the assistant turn after a final user message is opened only when asked
# (transformers' add_generation_prompt convention).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _has_chatml_tokens(tokenizer) -> bool:
    """Whether <|im_start|> and <|im_end|> are single special tokens of this tokenizer (mm's own
    tokenizer has them at ids 1 and 2; a GPT-2 style one does not, and gets no chat template)."""
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    return {"<|im_start|>", "<|im_end|>"} <= special
