"""`mm generate`: stream a continuation of a prompt from a checkpoint or an exported model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def generate(
    model: Annotated[Path, typer.Argument(help="A ckpt.pth or an `mm export` directory.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k likeliest tokens; 0 = all.")] = 50,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass; 1 = off.")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(
        "--repetition-penalty", help="CTRL penalty for tokens already seen; 1 = off.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampler: same seed, same text.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
) -> None:
    """Continue PROMPT, streaming text to stdout; tokens/s goes to stderr."""
    from pipeline.evaluate.generate import check_sampling
    from pipeline.evaluate.generate import generate as run
    from pipeline.export.loading import load_model
    from pipeline.hardware import pick_device

    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)  # before anything is printed
    loaded = load_model(model, device=pick_device(device, local_rank=0))
    stats: dict = {}
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for piece in run(loaded, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    why = {"end_of_text": "stopped at end-of-text", "max_new_tokens": "stopped at --max-new-tokens",
           "context": "stopped at the model's context length"}[stats["stop"]]
    print(f"{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_second']:.1f} tokens/s; "
          f"{why}", file=sys.stderr)
