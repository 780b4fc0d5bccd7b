"""`mm export` entry points: a checkpoint as a Hugging Face model directory or a GGUF file.

The formats live in their own modules: pipeline/export/hf_format.py (weight names,
config.json and tokenizer files, both ways), pipeline/export/gguf.py (llama.cpp)
and pipeline/export/model_card.py (the directory's README.md). This module checks the
checkpoint against its config and writes the files atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.checkpoint.format import model_config
from pipeline.errors import UserError
from pipeline.export.hf_format import check_keys, hf_config, param_shape, tokenizer_files, weight_map
from pipeline.export.manifest import MANIFEST, read_manifest, write_manifest
from pipeline.export.model_card import model_card
from pipeline.hardware import DTYPES

# Sampling defaults written to generation_config.json (the same values as `mm generate`'s option defaults).
GENERATION_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"export.dtype: must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---------------------------------------------------------------------------
# Hugging Face directory
# ---------------------------------------------------------------------------


def export_hf(state: dict, out_dir: str | Path, dtype: str = "fp32", source: str = "checkpoint") -> Path:
    """Write a transformers-loadable directory; written to a temp dir and renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    torch_dtype = _dtype(dtype)
    config = model_config(state, source)
    table = weight_map(config)
    check_keys(state["model"].keys(), table.keys(), source)
    files, tok = tokenizer_files(state, source)

    tensors = {}
    for ours, theirs in table.items():
        t = state["model"][ours]
        expected = param_shape(config, ours)
        if tuple(t.shape) != expected:
            raise UserError(f"{source}: weight {ours} has shape {tuple(t.shape)}, the config says {expected}")
        tensors[theirs] = t.detach().to("cpu", torch_dtype).contiguous()

    doc = hf_config(config, torch_dtype, tok["bos_id"], tok["eos_id"], tok["pad_id"])
    generation = {
        "bos_token_id": tok["bos_id"], "eos_token_id": tok["eos_id"], "pad_token_id": tok["pad_id"],
        "do_sample": True, **GENERATION_DEFAULTS, "max_new_tokens": 256,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        chat = "chat_template" in json.loads(files["tokenizer_config.json"])
        (tmp / "README.md").write_text(model_card(state, config, doc, dtype, tok, chat_template=chat), encoding="utf-8")
        write_manifest(tmp)  # last: hashes of every file above, for `mm verify` and `sha256sum -c`

    _write_dir_atomically(out_dir, write)
    return out_dir


def _write_dir_atomically(out_dir: Path, write) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    _check_replaceable(out_dir)
    try:
        with atomic.staged_dir(out_dir) as tmp:  # every file fsynced, then one rename
            write(tmp)
    except OSError as e:
        raise UserError(f"{out_dir}: writing the export failed ({e.strerror or e})") from None


def _check_replaceable(out_dir: Path) -> None:
    """A non-empty `out_dir` is replaced (all of it) only when it is exactly what `mm export` wrote: its
    SHA256SUMS lists every other file, and nothing else is there. A config.json alone proves nothing (a
    model directory of someone else's, a checkout), so anything else is refused and left as it is."""
    if not out_dir.is_dir():
        return
    present = sorted(p.name for p in out_dir.iterdir())
    if not present:
        return
    refuse = f"{out_dir}: exists and is not an earlier `mm export`"
    if MANIFEST not in present:
        raise UserError(f"{refuse} (no {MANIFEST}); refusing to replace it: remove it or pick another --out")
    try:
        listed = set(read_manifest(out_dir / MANIFEST))
    except (ValueError, OSError, UnicodeDecodeError):
        raise UserError(f"{refuse} ({MANIFEST} unreadable); refusing to replace it: remove it or pick "
                        "another --out") from None
    extra = [name for name in present if name != MANIFEST and (name not in listed or not (out_dir / name).is_file())]
    if extra:
        raise UserError(f"{refuse}: it also holds {', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''} "
                        f"(not in its {MANIFEST}); refusing to replace it: move those out or pick another --out")



# ---------------------------------------------------------------------------
# GGUF (llama.cpp)
# ---------------------------------------------------------------------------


def export_gguf(state: dict, path: str | Path, dtype: str = "fp32", source: str = "checkpoint") -> Path:
    """Write a GGUF file llama.cpp runs (pipeline/export/gguf.py); MoE is refused."""
    path = Path(path)
    _dtype(dtype)
    config = model_config(state, source)
    if config.n_experts:
        raise UserError(f"{source}: GGUF export of MoE models is not supported yet; export --format hf and convert "
                        "with llama.cpp's convert_hf_to_gguf.py")
    try:
        import gguf  # noqa: F401  (optional extra: checked here so the error is a one-liner)
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf (or pip install 'mm[gguf]')") from None
    from pipeline.export.gguf import write_gguf

    check_keys(state["model"].keys(), weight_map(config).keys(), source)
    files, ids = tokenizer_files(state, source)
    return write_gguf(path, state["model"], config, json.loads(files["tokenizer.json"]), ids, dtype, source)
