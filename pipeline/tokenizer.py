"""Tokenizers: loading any Hugging Face tokenizer dir, and training mm's byte-level BPE.

The trained tokenizer follows MiniMind: byte-level pre-tokenization without a
prefix space, special tokens at fixed ids `<|endoftext|>`=0 (pad),
`<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos). No post-processor: the token
store adds BOS/EOS itself, so `encode` returns the text's ids only. The saved
directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
loads with `transformers.AutoTokenizer.from_pretrained(DIR)` offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.readers import check_inputs, iter_texts

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2 in this order


def train_tokenizer(
    inputs: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 6400,
    text_field: str = "text",
    min_frequency: int = 2,
    model_max_length: int = 32768,
) -> dict:
    """Train byte-level BPE on JSONL files (streamed) and save a HF tokenizer dir.

    Returns {"path", "vocab_size", "fingerprint"}.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("no input files given")
    check_inputs(inputs)
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
    tok.train_from_iterator(iter_texts(inputs, text_field), trainer=trainer)
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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _token_str(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files of a tokenizer directory that mm reads (and checkpoints embed)."""


def load_tokenizer(directory: str | Path):
    """Load any Hugging Face tokenizer dir (one with tokenizer.json); see `tokenizer_from_files`."""
    d = Path(directory)
    if not d.exists():
        raise UserError(f"{d}: tokenizer directory not found (run `mm tokenizer` first, or pass --tokenizer DIR)")
    path = d / "tokenizer.json" if d.is_dir() else d
    if not path.is_file():
        raise UserError(f"{d}: no tokenizer.json (not a Hugging Face tokenizer directory)")
    files = {"tokenizer.json": path.read_bytes()}
    for name in TOKENIZER_FILES[1:]:
        if (path.parent / name).is_file():
            files[name] = (path.parent / name).read_bytes()
    return tokenizer_from_files(files, path.parent, json_path=path)


def tokenizer_from_files(files: dict, source: str | Path, json_path: Path | None = None):
    """A tokenizer from its files' contents, {filename: str or bytes} (a directory's, or
    the ones a checkpoint embeds); `source` names where they came from in errors, `json_path`
    the tokenizer.json file read when it has another name (`--tokenizer my.json`).

    Returns (tokenizers.Tokenizer, info) with info = {fingerprint (sha256 of
    tokenizer.json), vocab_size (added tokens included), bos_id, eos_id, pad_id,
    bos_token, eos_token, pad_token, path}. bos/eos/pad come from tokenizer_config.json,
    then special_tokens_map.json. A tokenizer without an EOS token is refused;
    one without BOS (GPT-2, Qwen) uses EOS as the document separator on both
    sides; pad falls back to EOS.
    """
    from tokenizers import Tokenizer

    src = Path(source)
    if files.get("tokenizer.json") is None:
        raise UserError(f"{src}: no tokenizer.json")

    def as_bytes(v) -> bytes:
        return v.encode("utf-8") if isinstance(v, str) else bytes(v)

    raw = as_bytes(files["tokenizer.json"])
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise UserError(f"{json_path or src / 'tokenizer.json'}: not a readable tokenizer ({first})") from None

    names: dict[str, str | None] = {"bos": None, "eos": None, "pad": None}
    for meta in TOKENIZER_FILES[1:]:
        if files.get(meta) is None:
            continue
        try:
            cfg = json.loads(as_bytes(files[meta]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{src / meta}: not valid JSON") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{src / meta}: expected a JSON object")
        for k in names:
            if names[k] is None:
                names[k] = _token_str(cfg.get(f"{k}_token"))
    ids: dict[str, int | None] = {}
    for k, name in names.items():
        ids[k] = tok.token_to_id(name) if name is not None else None
        if name is not None and ids[k] is None:
            raise UserError(f"{src}: {k}_token {name!r} is not in the vocabulary")
    if ids["eos"] is None:
        raise UserError(f"{src}: tokenizer has no eos_token (set it in tokenizer_config.json)")
    if ids["bos"] is None:
        ids["bos"], names["bos"] = ids["eos"], names["eos"]
    if ids["pad"] is None:
        ids["pad"], names["pad"] = ids["eos"], names["eos"]
    info = {
        "path": str(src),
        "fingerprint": hashlib.sha256(raw).hexdigest(),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "bos_id": ids["bos"],
        "eos_id": ids["eos"],
        "pad_id": ids["pad"],
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "pad_token": names["pad"],
    }
    return tok, info
