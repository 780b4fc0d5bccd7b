"""`mm config`: the model architecture as model.json, with its size and cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def config(
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (default: params model.preset).")] = None,
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer dir; its vocabulary size sets the model's.")] = Path("data/tokenizer"),
    out: Annotated[Path, typer.Option(help="Where to write the model config.")] = Path("data/model.json"),
    seq_len: Annotated[Optional[int], typer.Option(help="Sequence length for the FLOPs figure (default: params train.seq_len).")] = None,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.architecture import (
        PRESETS,
        build_config,
        count_params,
        flops_per_token,
        memory_bytes,
        save_model_json,
    )
    from pipeline.errors import UserError
    from pipeline.tokenizer import load_tokenizer

    p = load(params, sets)
    name = preset or p.model.preset
    if name not in PRESETS:  # arguments before files: an unknown preset is named before a missing tokenizer
        where = "--preset" if preset else "model.preset"
        raise UserError(f"{where}: unknown preset '{name}' (known: {', '.join(PRESETS)})")
    _, info = load_tokenizer(tokenizer)
    model_config = build_config(name, info["vocab_size"], p.model.overrides)
    save_model_json(model_config, out, name)

    counts, memory = count_params(model_config), memory_bytes(model_config)
    T = seq_len or p.train.seq_len
    table = Table(title=f"{name} → {out}", show_header=False)
    table.add_row("layers × dim", f"{model_config.n_layers} × {model_config.dim}")
    table.add_row("heads (KV)", f"{model_config.n_heads} ({model_config.n_kv_heads}), head_dim {model_config.head_dim}")
    table.add_row("vocabulary", f"{model_config.vocab_size}")
    table.add_row("parameters", f"{counts['total'] / 1e6:.2f}M (non-embedding {counts['non_embedding'] / 1e6:.2f}M)")
    if model_config.n_experts:
        table.add_row("active per token", f"{counts['active'] / 1e6:.2f}M ({model_config.top_k} of {model_config.n_experts} experts)")
    table.add_row(f"train FLOPs/token @ {T}", f"{flops_per_token(model_config, T) / 1e6:.1f} MFLOP")
    table.add_row("training state", f"{memory['total'] / 2**20:.0f} MiB (weights {memory['weights'] / 2**20:.0f}, grads {memory['grads'] / 2**20:.0f}, AdamW {memory['optimizer'] / 2**20:.0f})")
    Console().print(table)
