"""The model card (README.md) of an exported Hugging Face directory: what the model is and how it was trained."""

from __future__ import annotations

from pipeline.model.transformer import ModelConfig


def model_card(state: dict, config: ModelConfig, doc: dict, dtype: str, tok: dict, chat_template: bool = False) -> str:
    bos, eos = tok["bos_token"], tok["eos_token"]
    rows = _rows(state, config, doc, dtype)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    sources = _sources_table(state)
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
{sources}
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


NOT_RECORDED = "not recorded"


def _fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _fmt(value, ".3g")


def _recorded_sources(state: dict) -> dict[str, dict]:
    """data["sources"] of the checkpoint ({name: {weight, train_tokens, tokens_trained}}), {} when it
    predates that record."""
    sources = (state.get("data") or {}).get("sources")
    if not isinstance(sources, dict):
        return {}
    return {str(name): entry for name, entry in sources.items() if isinstance(entry, dict)}


def _sources_table(state: dict) -> str:
    """A table of the training data, one row per source: its share of the mixture, the tokens drawn
    from it, the size of its train split, and its validation figures at the last evaluation."""
    sources = _recorded_sources(state)
    if not sources:
        return ""
    metrics = state.get("metrics") or {}
    losses, bpbs = metrics.get("val_loss_by_source") or {}, metrics.get("val_bits_per_byte_by_source") or {}
    weights = [e.get("weight") for e in sources.values()]
    total = sum(weights) if all(isinstance(w, (int, float)) for w in weights) else None
    lines = ["| source | weight | tokens trained on | train split tokens | val loss (nats/token) | val bits per byte |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in sources.items():
        share = e.get("weight") / total if total else None
        lines.append(f"| {name} | {_fmt(share, '.3f')} | {_count(e.get('tokens_trained'))} | "
                     f"{_count(e.get('train_tokens'))} | {_fmt(losses.get(name))} | {_fmt(bpbs.get(name))} |")
    data = state.get("data") or {}
    changed = ""
    if len(data.get("segments") or []) > 1:  # data.phases, or a resume with other weights
        changed = ("The weights changed during training; the weight column is the mixture at the checkpoint's\n"
                   "step, and tokens trained on are what each source gave over the whole run. By segment (from\n"
                   f"global sample): {data.get('data_mixture', 'n/a')}.\n\n")
    return ("\n## Training data\n\n"
            "Tokens trained on: the input tokens of the training windows drawn from each source, in the\n"
            "mixture's proportions, up to the checkpoint's step. Validation: the source's val split, scored\n"
            "as `mm eval` scores it. The overall figures above are the mixture's: the weight-averaged loss,\n"
            "and bits per byte from it and the weight-averaged bytes per token.\n\n"
            + changed + "\n".join(lines) + "\n")


def _rows(state: dict, config: ModelConfig, doc: dict, dtype: str) -> list[tuple[str, str]]:
    from pipeline.architecture import count_params

    counts = count_params(config)
    metrics, data = state.get("metrics") or {}, state.get("data") or {}
    sources = _recorded_sources(state)
    store = f"token store {str(data.get('store_fingerprint', 'n/a'))[:12]}"
    if sources:
        described = f"{', '.join(sources)} ({store}; tokens per source below)"
        in_store = sum(e.get("train_tokens") or 0 for e in sources.values())
    else:
        described, in_store = f"{NOT_RECORDED} ({store})", None
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
        ("training tokens in the store", _count(in_store) if in_store is not None else None),
        ("context (trained)", str(data.get("seq_len", "n/a"))),
        ("optimizer steps", str(state.get("step", "n/a"))),
        ("tokens seen", _count(metrics.get("tokens_seen"))),
        ("final train loss (nats/token)", _fmt(metrics.get("train_loss"))),
        ("final val loss (nats/token)", _fmt(metrics.get("val_loss"))),
        ("val bits per byte", _fmt(bpb) if isinstance(bpb, (int, float)) else
         f"{NOT_RECORDED} (`mm eval` on the val split reports it)"),
        ("weights dtype", dtype),
    ]
    return [(name, value) for name, value in rows if value is not None]
