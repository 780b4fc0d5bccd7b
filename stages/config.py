"""`mm config`: the model architecture as model.json, with its size and cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOption, SetOption, load


def config(
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (default: params model.preset).")] = None,
    from_dir: Annotated[Optional[Path], typer.Option(
        "--from", help="A Hugging Face model directory (Llama, Qwen3, Qwen3-MoE, MiniMind, an mm export): its "
                       "architecture, to continue training it with train.init (instead of a preset) [default: "
                       "train.init when it names a directory and no --preset is given].")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Tokenizer dir; its vocabulary size sets the model's [default: data/tokenizer, or the --from dir].")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the model config.")] = Path("data/model.json"),
    seq_len: Annotated[Optional[int], typer.Option(
        help="Sequence length for the FLOPs figure (default: params train.seq_len).")] = None,
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
        newton_schulz_flops,
        save_model_json,
    )
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.errors import UserError

    p = load(params, sets)
    if from_dir is None and not preset and p.train.init and Path(p.train.init).is_dir():
        from_dir = Path(p.train.init)  # training starts from that model: its architecture, not a preset
    if from_dir is not None:
        if preset:
            raise UserError("--preset and --from: give one (--from takes the architecture from the directory)")
        name, model_config = f"from {from_dir}", config_from_dir(from_dir, tokenizer or from_dir)
    else:
        name = preset or p.model.preset
        if name not in PRESETS:  # arguments before files: an unknown preset is named before a missing tokenizer
            where = "--preset" if preset else "model.preset"
            raise UserError(f"{where}: unknown preset '{name}' (known: {', '.join(PRESETS)})")
        _, info = load_tokenizer(tokenizer or Path("data/tokenizer"))
        model_config = build_config(name, info["vocab_size"], p.model.overrides)
    save_model_json(model_config, out, name)

    counts = count_params(model_config)
    T = seq_len or p.train.seq_len
    table = Table(title=f"{name} → {out}", show_header=False)
    table.add_row("layers × dim", f"{model_config.n_layers} × {model_config.dim}")
    table.add_row("heads (KV)", f"{model_config.n_heads} ({model_config.n_kv_heads}), head_dim {model_config.head_dim}")
    table.add_row("vocabulary", f"{model_config.vocab_size}")
    table.add_row("parameters", f"{counts['total'] / 1e6:.2f}M (non-embedding {counts['non_embedding'] / 1e6:.2f}M)")
    if model_config.n_experts:
        table.add_row("active per token",
                      f"{counts['active'] / 1e6:.2f}M ({model_config.top_k} of {model_config.n_experts} experts)")
    table.add_row(f"train FLOPs/token @ {T}", f"{flops_per_token(model_config, T) / 1e6:.1f} MFLOP")
    if p.train.optimizer == "muon":
        step_flops = flops_per_token(model_config, T) * p.train.micro_batch_size * p.train.accumulation_steps * T
        ns = newton_schulz_flops(model_config)
        table.add_row("Muon Newton–Schulz", f"{ns / 1e9:,.1f} GFLOP per optimizer step, {ns / step_flops:.0%} of one "
                                            "process's model FLOPs per step (not counted in MFU)")
    for label, text in memory_rows(model_config, p.train, T):
        table.add_row(label, text)
    Console().print(table)


def config_from_dir(directory: Path, tokenizer: Path):
    """The architecture of a Hugging Face model directory, checked against the tokenizer's vocabulary."""
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.errors import UserError
    from pipeline.export.hf_import import open_hf_dir

    model_config = open_hf_dir(directory).config
    _, info = load_tokenizer(tokenizer)
    if info["vocab_size"] != model_config.vocab_size:
        raise UserError(f"{directory}: the embedding has {model_config.vocab_size} rows but the tokenizer {tokenizer} "
                        f"has {info['vocab_size']} tokens; mm needs them equal (the token store's ids index the "
                        "embedding)")
    return model_config


def memory_rows(model_config, tp, seq_len: int) -> list[tuple[str, str]]:
    """The estimated peak training memory of one process, for train.* as set (docs/training.md: how)."""
    import torch

    from pipeline.architecture import CPU_RUNTIME_BYTES, training_memory
    from pipeline.hardware import pick_device, resolve_dtype

    device = pick_device("auto", 0)
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype(tp.dtype, device)]
    checkpointing = getattr(tp, "activation_checkpointing", "none")
    # fused_loss: training always computes its loss with the model's chunked LinearCrossEntropy.
    m = training_memory(model_config, tp.micro_batch_size, seq_len, dtype, tp.optimizer, device.type, checkpointing,
                        fused_loss=True, spike_copy=getattr(tp, "spike_action", "none") == "rollback")
    mib = {k: f"{v / 2**20:,.0f}" for k, v in m.items()}
    optimizer = {"adamw": "AdamW", "muon": "Muon + AdamW"}.get(tp.optimizer, tp.optimizer)
    shape = f"micro-batch {tp.micro_batch_size} × {seq_len}, {dtype}, {optimizer}, checkpointing {checkpointing}"
    rows = [(f"peak train memory ({device.type})", f"{mib['total']} MiB for {shape}"),
            ("  of which", f"weights {mib['weights']}, optimizer {mib['optimizer']}, grads {mib['grads']}, "
                           f"activations {mib['activations']}, loss {mib['loss']}"
                           + (f", spike-guard copy {mib['spike_copy']}" if m["spike_copy"] else "") + " MiB")]
    if device.type == "cpu":
        rows.append(("  + runtime", f"~{CPU_RUNTIME_BYTES / 2**20:.0f} MiB (torch, Python) → RSS ≈ "
                                     f"{(m['total'] + CPU_RUNTIME_BYTES) / 2**20:,.0f} MiB"))
    return rows
