"""The model card (README.md) of an exported Hugging Face directory: what the model is and how it was trained."""

from __future__ import annotations

from pipeline.model import ModelConfig


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

