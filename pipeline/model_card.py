"""The model card (README.md) of an exported Hugging Face directory: what the model is and how it was trained."""

from __future__ import annotations

from pipeline.model import ModelConfig


def model_card(state: dict, config: ModelConfig, doc: dict, dtype: str, tok: dict, chat_template: bool = False) -> str:
    bos, eos = tok["bos_token"], tok["eos_token"]
    rows = _rows(state, config, doc, dtype)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [mm, pretraining, small-lm]
---

# {doc['architectures'][0]} pretrained with mm

A small decoder-only language model pretrained from scratch with `mm`
(RMSNorm, RoPE θ={config.rope_theta:g}, grouped-query attention, SwiGLU, tied embeddings).
It is pretrained only: a base model that continues text. It has had no
instruction tuning and no preference tuning, so it does not follow instructions.

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
{_FINE_TUNING if chat_template else ""}"""



_FINE_TUNING = """
## Fine-tuning

`tokenizer_config.json` carries a ChatML chat template (`<|im_start|>ROLE\\nTEXT<|im_end|>\\n`
per message, MiniMind's format), `eos_token` `<|im_end|>` and `pad_token` `<|endoftext|>`, so
`tokenizer.apply_chat_template` works and supervised fine-tuning tools (TRL, LLaMA-Factory,
litgpt) can take this directory as it is.
"""


def _rows(state: dict, config: ModelConfig, doc: dict, dtype: str) -> list[tuple[str, str]]:
    from pipeline.architecture import count_params

    counts = count_params(config)
    metrics, data = state.get("metrics") or {}, state.get("data") or {}

    def fmt(value, spec=".4f"):
        return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"

    def count(value):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else fmt(value, ".3g")

    sources = data.get("sources")
    if isinstance(sources, dict) and sources:  # {name: training tokens} or {name: {...}}
        described = ", ".join(f"{name} ({count(v.get('tokens') if isinstance(v, dict) else v)} tokens)"
                              for name, v in sources.items())
    else:
        described = f"one corpus (token store {str(data.get('store_fingerprint', 'n/a'))[:12]})"
    bpb = metrics.get("val_bits_per_byte")
    rows = [
        ("training", "pretrained only (next-token prediction; no instruction or preference tuning)"),
        ("architecture", f"{doc['architectures'][0]} ({'QK-norm, ' if config.qk_norm else ''}"
                         f"{f'MoE {config.top_k} of {config.n_experts} experts' if config.n_experts else 'dense'})"),
        ("parameters", f"{counts['total'] / 1e6:.2f}M (non-embedding {counts['non_embedding'] / 1e6:.2f}M"
                       + (f", active {counts['active'] / 1e6:.2f}M" if config.n_experts else "") + ")"),
        ("layers × dim", f"{config.n_layers} × {config.dim}, {config.n_heads} heads ({config.n_kv_heads} KV), "
                         f"head_dim {config.head_dim}"),
        ("vocabulary", str(config.vocab_size)),
        ("data sources", described),
        ("training tokens in the store", count(data["train_tokens"]) if "train_tokens" in data else None),
        ("context (trained)", str(data.get("seq_len", "n/a"))),
        ("optimizer steps", str(state.get("step", "n/a"))),
        ("tokens seen", count(metrics.get("tokens_seen"))),
        ("final train loss (nats/token)", fmt(metrics.get("train_loss"))),
        ("final val loss (nats/token)", fmt(metrics.get("val_loss"))),
        ("val bits per byte", fmt(bpb) if bpb is not None else "n/a (`mm eval` on the val split reports it)"),
        ("weights dtype", dtype),
    ]
    return [(name, value) for name, value in rows if value is not None]
