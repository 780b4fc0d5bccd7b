"""Sample from a loaded model (pipeline/export/loading.py) with a KV cache.

Sampling, in the order applied to each step's logits: repetition penalty
(CTRL: divide a positive logit of an already-seen token by the penalty,
multiply a negative one), temperature (0 = greedy argmax), top-k, top-p
(nucleus: the smallest set of tokens whose probability reaches p). Draws come
from a torch.Generator seeded with `seed`, so the same seed on the same device
gives the same text.

The prompt is fed as BOS + its tokens, the way training documents start.
Text is decoded incrementally: a piece is emitted only once its bytes form
complete UTF-8 characters, so a character split over several byte-level
tokens (Chinese, emoji) comes out whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from pipeline.errors import UserError
from pipeline.export.loading import LoadedModel

# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, generator: torch.Generator | None) -> int:
    """One token from the last position's logits (vocab,); `seen` holds the ids so far."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and seen.numel():
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   repetition_penalty: float) -> None:
    """UserError naming the first option out of range, as `mm generate` spells it (NaN fails every rule)."""
    rules = [("--max-new-tokens", max_new_tokens, max_new_tokens >= 0, ">= 0"),
             ("--temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
             ("--top-k", top_k, top_k >= 0, ">= 0 (0 = all tokens)"),
             ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1] (1 = off)"),
             ("--repetition-penalty", repetition_penalty, repetition_penalty > 0, "> 0 (1 = off)")]
    for option, value, ok, want in rules:
        if not ok:
            raise UserError(f"{option} {value}: must be {want}")


def generate(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stats: dict | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are produced. `stats` (if given) receives
    new_tokens, token_ids, seconds, tokens_per_second and `stop` (end_of_text, max_new_tokens
    or context: why it ended) at the end."""
    from pipeline.model.transformer import KVCache

    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    model, tok = loaded.model, loaded.tokenizer
    config = model.config
    device = next(model.parameters()).device
    prompt_ids = [loaded.bos_id] + tok.encode(prompt).ids
    if len(prompt_ids) >= config.max_seq_len:
        raise UserError(f"prompt: {len(prompt_ids)} tokens, the model's context is {config.max_seq_len}")
    stop = "max_new_tokens" if max_new_tokens <= config.max_seq_len - len(prompt_ids) else "context"
    max_new_tokens = min(max_new_tokens, config.max_seq_len - len(prompt_ids))

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    cache = KVCache(config, 1, len(prompt_ids) + max_new_tokens, device, torch.float32)
    seen = torch.tensor(prompt_ids, device=device)
    out_ids: list[int] = []
    decoder = _IncrementalDecoder(tok)

    start = time.perf_counter()
    with torch.inference_mode():
        logits = model.generate_next(seen[None], cache)[0]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
            if nxt == loaded.eos_id:
                stop = "end_of_text"
                break
            out_ids.append(nxt)
            seen = torch.cat([seen, torch.tensor([nxt], device=device)])
            piece = decoder.push(nxt)
            if piece:
                yield piece
            if len(out_ids) == max_new_tokens:
                break
            logits = model.generate_next(torch.tensor([[nxt]], device=device), cache)[0]
    tail = decoder.flush()
    if tail:
        yield tail
    seconds = time.perf_counter() - start
    if stats is not None:
        stats.update(new_tokens=len(out_ids), token_ids=out_ids, prompt_tokens=len(prompt_ids),
                     seconds=seconds, tokens_per_second=len(out_ids) / seconds if seconds > 0 else 0.0, stop=stop)


class _IncrementalDecoder:
    """Decode a growing id list, emitting only text whose UTF-8 bytes are complete.

    The decoded tail is re-decoded from `prefix` (a few tokens back) each step,
    so the cost per token stays constant.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(done) :]
        return ""

    def flush(self) -> str:
        done = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return full[len(done) :]
