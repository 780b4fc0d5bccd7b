"""Training mm's byte-level BPE tokenizer on raw text, streamed from any input format.

The trained tokenizer follows MiniMind: byte-level pre-tokenization without a
prefix space, special tokens at fixed ids `<|endoftext|>`=0 (pad),
`<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos). No post-processor: the token
store adds BOS/EOS itself, so `encode` returns the text's ids only. The saved
directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
loads with `transformers.AutoTokenizer.from_pretrained(DIR)` offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import atomic
from pipeline.data.inputs import expand_inputs, iter_texts
from pipeline.data.readers import no_text_error
from pipeline.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, load_tokenizer
from pipeline.errors import UserError


def train_tokenizer(
    inputs: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 6400,
    text_field: str = "text",
    min_frequency: int = 2,
    model_max_length: int = 32768,
) -> dict:
    """Train byte-level BPE on input files (streamed) and save a HF tokenizer dir.

    Returns {"path", "vocab_size", "fingerprint"}.
    """
    return train_tokenizer_on([(inputs, text_field)], out_dir, vocab_size, min_frequency, model_max_length)


def train_tokenizer_on(
    groups: list[tuple[list[str | Path], str]],
    out_dir: str | Path,
    vocab_size: int = 6400,
    min_frequency: int = 2,
    model_max_length: int = 32768,
) -> dict:
    """`train_tokenizer` over several sources: groups of (paths, text_field), read in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    for paths, _ in groups:
        expand_inputs(paths)  # a missing file is an error before training starts
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"tokenizer.vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                        f"(256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(groups), trainer=trainer)
    # Too little text is a mistake to report, not a smaller tokenizer to write: its vocabulary
    # would silently differ from params (and from model.json's vocab_size).
    if tok.get_vocab_size() < vocab_size:
        where = ", ".join(str(p) for paths, _ in groups for p in paths)
        raise UserError(f"{where}: the text ran out at a vocabulary of {tok.get_vocab_size():,} of the "
                        f"{vocab_size:,} asked (tokenizer.vocab_size, --vocab-size): give more text or ask for "
                        f"at most {tok.get_vocab_size():,}; nothing written")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # not an assert: it must hold under `python -O` too, and never be a traceback
            raise UserError(f"{out_dir}: special token {t} got id {tok.token_to_id(t)} instead of {i}; "
                            "nothing was written")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json",
                {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD})
    _, info = load_tokenizer(out)
    return {"path": str(out), "vocab_size": info["vocab_size"], "fingerprint": info["fingerprint"]}


def _texts(groups: list[tuple[list[str | Path], str]]):
    """The texts of each group in order; a group that yields none (a wrong text field, not JSON Lines,
    an empty file) stops training with one line naming it, before the next group is read."""
    for paths, text_field in groups:
        rejects: dict[str, int] = {}
        kept = 0
        for text in iter_texts(paths, text_field, rejects):
            kept += 1
            yield text
        if not kept:
            raise no_text_error(", ".join(map(str, paths)), text_field, rejects)


def _write_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
