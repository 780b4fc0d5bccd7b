"""Loading tokenizers: any Hugging Face tokenizer directory (or tokenizer.json file).

Training mm's own byte-level BPE is `pipeline.data.tokenizer_training`; its special
tokens are defined here, since loading reads them back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import UserError

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2 in this order


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
