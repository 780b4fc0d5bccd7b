"""A Hugging Face config.json → mm's ModelConfig, refusing whatever mm's model cannot represent.

Every field of config.json is one of three kinds:

- read: it becomes a ModelConfig field (hidden_size → dim, moe_intermediate_size → hidden_dim, ...);
- checked: it must hold the one value under which the model computes what mm's does
  (no attention or MLP bias, SiLU, plain RoPE, no sliding window, tied embeddings, no dropout,
  a router that renormalises its top-k weights); any other value is refused;
- housekeeping: it says nothing about the function the weights compute (transformers_version,
  token ids, dtype, generation defaults).

A field of none of these kinds is refused too, naming it and its value: nothing is dropped
silently. Every refusal is one line naming the field, its value and what mm lacks.

Read: LlamaForCausalLM, Qwen3ForCausalLM (QK-norm), Qwen3MoeForCausalLM with norm_topk_prob true,
MixtralForCausalLM (what mm exports for MoE without QK-norm) and MiniMind's MiniMindForCausalLM
(MiniMind2's configs, and the newer one with QK-norm; QK-norm is then read from the weight names).
"""

from __future__ import annotations

import math

from pipeline.errors import UserError
from pipeline.model.transformer import ModelConfig

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "minimind": "MiniMindForCausalLM",
}

# Model types that are refused whole, and why (the rest get the generic reason).
_REFUSED_TYPES = {
    "qwen2": "its q/k/v projections always carry biases (Qwen2's attention), mm's attention has none",
    "qwen2_moe": "q/k/v biases and a shared expert with its own gate, which mm's MoE lacks",
    "gpt2": "a GPT-2 block (learned absolute positions, LayerNorm, GELU, fused c_attn with biases), not a "
            "Llama/Qwen-style one",
    "mistral": "sliding-window attention, which mm's attention lacks",
}

_HOUSEKEEPING = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "_name_or_path",
    "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "max_length",
    "min_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
    "early_stopping", "length_penalty", "no_repeat_ngram_size", "num_return_sequences", "chunk_size_feed_forward",
    "pretraining_tp",  # Llama's tensor-parallel slicing of the same matmuls: the same function
    "output_router_logits", "flash_attn", "flash_attention",  # what the forward returns, which kernel runs
    "mm",  # mm's own extras in its exports (init_std, aux_loss_coef), read below
})

_COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "rope_parameters", "partial_rotary_factor", "attention_bias", "attention_dropout",
           "tie_word_embeddings", "initializer_range"}
_WINDOW = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
_QWEN_MOE = {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"}
_FIELDS = {
    "llama": _COMMON | {"mlp_bias"},
    "qwen3": _COMMON | _WINDOW,
    "qwen3_moe": _COMMON | _WINDOW | _QWEN_MOE,
    "mixtral": _COMMON | _WINDOW | {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                                    "router_jitter_noise"},
    "minimind": _COMMON | _QWEN_MOE | {"dropout", "use_moe", "inference_rope_scaling", "n_routed_experts",
                                       "n_shared_experts", "scoring_func", "aux_loss_alpha", "seq_aux"},
}


def config_from_hf(doc: dict, source: str, weight_names=None) -> tuple[ModelConfig, str]:
    """(ModelConfig, model_type) of a config.json document; weight_names (the tensors the directory
    holds, when known) tell MiniMind's QK-norm generation from MiniMind2's."""
    from pipeline.architecture import config_from_dict

    model_type = doc.get("model_type")
    arch = (doc.get("architectures") or [None])[0]
    if model_type not in SUPPORTED:
        why = _REFUSED_TYPES.get(model_type, "not a Llama/Qwen-style decoder mm can represent")
        raise UserError(f"{source}: model_type {model_type!r} ({arch or 'no architectures'}) is not supported: "
                        f"{why} (mm reads {', '.join(SUPPORTED.values())})")
    if arch is not None and arch != SUPPORTED[model_type]:
        raise UserError(f"{source}: architectures {arch!r} is not supported: mm reads {SUPPORTED[model_type]} "
                        f"(a causal language model) for model_type {model_type!r}")
    unknown = sorted(set(doc) - _FIELDS[model_type] - _HOUSEKEEPING)
    if unknown:
        more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
        raise UserError(f"{source}: field {unknown[0]!r} = {_show(doc[unknown[0]])} has no counterpart in mm's "
                        f"model{more}")
    _check_values(doc, model_type, source)
    return config_from_dict(_values(doc, model_type, source, weight_names), source=source), model_type


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(source: str, field: str, value, why: str):
    raise UserError(f"{source}: {field} = {_show(value)} is not supported: {why}")


# ---------------------------------------------------------------------------
# Checked fields
# ---------------------------------------------------------------------------


def _check_values(doc: dict, model_type: str, source: str) -> None:
    """The first checked field whose value mm's model cannot represent, refused."""
    get = doc.get
    if get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", get("hidden_act"), "mm's MLP is SwiGLU with SiLU")
    for field in ("attention_bias", "mlp_bias"):
        if get(field):
            _refuse(source, field, get(field), "mm's projections have no bias")
    for field in ("attention_dropout", "dropout"):
        if get(field):
            _refuse(source, field, get(field), "mm trains without dropout")
    tied_default = model_type == "minimind"  # transformers' Llama/Qwen configs default to untied
    if get("tie_word_embeddings", tied_default) is not True:
        _refuse(source, "tie_word_embeddings", get("tie_word_embeddings", tied_default),
                "mm's output head is the embedding (tied), a separate lm_head cannot be represented")
    _check_rope(doc, source)
    if get("use_sliding_window"):
        _refuse(source, "use_sliding_window", True, "mm's attention has no sliding window")
    if model_type == "mixtral" and get("sliding_window") is not None:
        _refuse(source, "sliding_window", get("sliding_window"), "mm's attention has no sliding window")
    other_layers = sorted({t for t in get("layer_types") or [] if t != "full_attention"})
    if other_layers:
        _refuse(source, "layer_types", other_layers[0], "every mm layer is full causal attention")
    if model_type == "qwen3_moe" or (model_type == "minimind" and get("use_moe")):
        _check_moe(doc, model_type, source)
    if model_type == "mixtral" and get("router_jitter_noise"):
        _refuse(source, "router_jitter_noise", get("router_jitter_noise"), "mm's router adds no noise")


def _check_rope(doc: dict, source: str) -> None:
    for field in ("rope_scaling", "rope_parameters"):
        rope = doc.get(field) or {}
        if not isinstance(rope, dict):
            _refuse(source, field, rope, "expected an object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            key = "rope_type" if "rope_type" in rope else "type"
            _refuse(source, f"{field}.{key}", kind, "mm's RoPE is unscaled (rope_type default)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse(source, f"{field}.partial_rotary_factor", rope["partial_rotary_factor"],
                    "mm rotates the whole head")
    if doc.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(source, "partial_rotary_factor", doc["partial_rotary_factor"], "mm rotates the whole head")
    if doc.get("inference_rope_scaling"):
        _refuse(source, "inference_rope_scaling", True, "MiniMind's YaRN scaling; mm's RoPE is unscaled")


def _check_moe(doc: dict, model_type: str, source: str) -> None:
    get = doc.get
    minimind2 = model_type == "minimind" and "n_routed_experts" in doc
    if get("norm_topk_prob") is not True:
        _refuse(source, "norm_topk_prob", get("norm_topk_prob"),
                "mm's router renormalises the top-k weights to sum to 1")
    if get("decoder_sparse_step", 1) != 1:
        _refuse(source, "decoder_sparse_step", get("decoder_sparse_step"), "every mm layer is an MoE layer")
    if get("mlp_only_layers"):
        _refuse(source, "mlp_only_layers", get("mlp_only_layers"), "every mm layer is an MoE layer")
    if get("n_shared_experts"):
        _refuse(source, "n_shared_experts", get("n_shared_experts"), "mm's MoE has no shared experts")
    if get("scoring_func", "softmax") != "softmax":
        _refuse(source, "scoring_func", get("scoring_func"), "mm's router is a softmax")
    if minimind2 and get("num_experts_per_tok", 2) == 1:
        # MiniMind2 renormalises only when top_k > 1: its single expert is scaled by its softmax weight.
        _refuse(source, "num_experts_per_tok", 1, "MiniMind2 scales a single expert by its router probability, "
                "mm's top-1 routing weights it 1")


# ---------------------------------------------------------------------------
# Read fields
# ---------------------------------------------------------------------------


def _values(doc: dict, model_type: str, source: str, weight_names) -> dict:
    """The ModelConfig fields (checked afterwards by architecture.config_from_dict)."""
    try:
        dim, n_heads = doc["hidden_size"], doc["num_attention_heads"]
        values = dict(
            vocab_size=doc["vocab_size"], dim=dim, n_layers=doc["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=doc.get("num_key_value_heads") or n_heads,
            head_dim=doc.get("head_dim") or (dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int)
                                             and n_heads > 0 else 0),
            max_seq_len=doc["max_position_embeddings"], norm_eps=float(doc["rms_norm_eps"]),
            rope_theta=float((doc.get("rope_parameters") or {}).get("rope_theta")
                             or doc.get("rope_theta") or (1e6 if model_type == "minimind" else 1e4)),
            hidden_dim=_hidden_dim(doc, model_type),
            qk_norm=_qk_norm(doc, model_type, weight_names),
        )
    except KeyError as e:
        raise UserError(f"{source}: config.json lacks field {e.args[0]!r}") from None
    except (TypeError, ValueError):
        raise UserError(f"{source}: a size or epsilon field is not a number") from None
    if "initializer_range" in doc:
        values["init_std"] = doc["initializer_range"]
    experts = _experts(doc, model_type)
    if experts:
        values.update(experts)
    extra = doc.get("mm") or {}  # mm's own exports carry what transformers has no slot for
    for key in ("init_std", "aux_loss_coef"):
        if key in extra:
            values[key] = extra[key]
    return values


def _hidden_dim(doc: dict, model_type: str) -> int:
    moe = model_type == "qwen3_moe" or (model_type == "minimind" and doc.get("use_moe")
                                        and "n_routed_experts" not in doc)
    if moe:
        return doc.get("moe_intermediate_size") or doc["intermediate_size"]
    if model_type == "minimind" and doc.get("intermediate_size") is None:
        # MiniMind2 leaves it null and derives it: 8/3·hidden, truncated, rounded up to a multiple of 64.
        return 64 * math.ceil(int(doc["hidden_size"] * 8 / 3) / 64)
    return doc["intermediate_size"]


def _qk_norm(doc: dict, model_type: str, weight_names) -> bool:
    if model_type in ("qwen3", "qwen3_moe"):
        return True
    if model_type != "minimind":
        return False
    if weight_names is not None:  # MiniMind's newer generation has q_norm/k_norm, MiniMind2 does not
        return any(name.endswith("self_attn.q_norm.weight") for name in weight_names)
    return "n_routed_experts" not in doc


def _experts(doc: dict, model_type: str) -> dict:
    get = doc.get
    if model_type == "qwen3_moe":
        n, aux = get("num_experts") or get("num_local_experts") or 0, get("router_aux_loss_coef")
    elif model_type == "mixtral":
        n, aux = get("num_local_experts") or 0, get("router_aux_loss_coef")
    elif model_type == "minimind" and get("use_moe"):
        minimind2 = "n_routed_experts" in doc
        n = get("n_routed_experts", 4) if minimind2 else get("num_experts", 4)
        aux = get("aux_loss_alpha") if minimind2 else get("router_aux_loss_coef")
    else:
        return {}
    values = {"n_experts": n, "top_k": get("num_experts_per_tok", 2)}
    if aux is not None:
        values["aux_loss_coef"] = aux
    return values
