"""GGUF (llama.cpp) writer: the plain or QK-norm model and its byte-level BPE tokenizer.

The file records the sha256 of its tensor data (every tensor's bytes in file
order, the alignment padding excluded) under the key `mm.tensor_data.sha256`:
a GGUF file is one file, with no SHA256SUMS beside it, so `mm verify`
(`check_gguf`) finds a flipped byte in the weights from the file alone.

The plain model goes out as arch `llama`, whose RoPE rotates adjacent pairs
(2i, 2i+1) while ours (like HF) rotates (i, i + head_dim/2); so the rows of
q_proj and k_proj are permuted inside each head exactly as llama.cpp's
convert_hf_to_gguf.py (LlamaModel.permute) does. The QK-norm model goes out
as arch `qwen3`, which uses the NeoX (rotate-half) RoPE: no permutation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.errors import UserError
from pipeline.model.transformer import ModelConfig

TENSOR_SHA256 = "mm.tensor_data.sha256"  # llama.cpp ignores keys it does not know


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order → interleaved pairs, per head (llama.cpp convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Our per-block names → llama.cpp tensor names (after "blk.N.").
_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}

# Pre-tokenizer regexes llama.cpp knows, by its name for them.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def gguf_pre_tokenizer(tok: dict, source: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (it has no way to read the regex itself)."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            return "gpt-2"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            if regex == _GPT2_REGEX:
                return "gpt-2"
    raise UserError(f"{source}: the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent "
                    "mm knows; GGUF export needs a GPT-2 style byte-level BPE")


def write_gguf(path: Path, weights: dict, config: ModelConfig, tok: dict, ids: dict, dtype: str, source: str) -> Path:
    """Write a GGUF file llama.cpp runs: arch llama (plain) or qwen3 (QK-norm), with the tokenizer.

    `weights` are our parameters (names already checked against the config), `tok` the parsed
    tokenizer.json, `ids` its bos/eos/pad ids; written to a temp file and renamed into place."""
    import gguf

    pre = gguf_pre_tokenizer(tok, source)
    arch = "qwen3" if config.qk_norm else "llama"
    matrix_type = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    file_type = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    try:
        with atomic.staged_file(path) as tmp:  # fsynced and renamed into place only when complete
            writer = gguf.GGUFWriter(str(tmp), arch)
            _add_hyperparameters(writer, config, arch, file_type)
            _add_vocabulary(writer, config, tok, ids, pre)
            sha = hashlib.sha256()
            _add_weights(writer, weights, config, arch, matrix_type, sha)
            writer.add_string(TENSOR_SHA256, sha.hexdigest())  # the header is written after all adds
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as e:
        raise UserError(f"{path}: writing the GGUF file failed ({e.strerror or e})") from None
    return path


def _add_hyperparameters(writer, config: ModelConfig, arch: str, file_type) -> None:
    writer.add_name(f"mm {arch} {config.n_layers}x{config.dim}")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _add_vocabulary(writer, config: ModelConfig, tok: dict, ids: dict, pre: str) -> None:
    """GPT-2 style byte-level BPE, as convert_hf_to_gguf's _set_vocab_gpt2 writes it."""
    import gguf

    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    by_id = {i: s for s, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # model vocabulary padded beyond the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos_id"])
    writer.add_eos_token_id(ids["eos_id"])
    writer.add_pad_token_id(ids["pad_id"])
    # Documents were trained as BOS + text + EOS: llama.cpp prepends BOS as `mm generate` does.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_weights(writer, weights: dict, config: ModelConfig, arch: str, matrix_type, sha) -> None:
    for ours, theirs in _GGUF_GLOBAL.items():
        _add_tensor(writer, theirs, weights[ours], matrix_type, sha)
    for i in range(config.n_layers):
        for name, gguf_name in _GGUF_BLOCK.items():
            key = f"layers.{i}.{name}"
            if key not in weights:
                continue  # q_norm/k_norm only with QK-norm; the key set was checked by the caller
            w = weights[key].detach().float().cpu()
            if arch == "llama" and name == "self_attn.q_proj.weight":
                w = permute_for_llama_cpp(w, config.n_heads)
            elif arch == "llama" and name == "self_attn.k_proj.weight":
                w = permute_for_llama_cpp(w, config.n_kv_heads)
            _add_tensor(writer, f"blk.{i}.{gguf_name}", w, matrix_type, sha)
    # No output.weight: llama.cpp ties the output head to token_embd when it is absent.


def _add_tensor(writer, name: str, t: torch.Tensor, matrix_type, sha) -> None:
    """Add one tensor, and its bytes as they will be written to `sha`."""
    import gguf
    import numpy as np

    t = t.detach().float().cpu()
    raw = None
    if t.dim() == 1 or matrix_type == gguf.GGMLQuantizationType.F32:
        data = t.numpy().astype(np.float32)  # norms stay fp32, as llama.cpp's converter keeps them
    elif matrix_type == gguf.GGMLQuantizationType.F16:
        data = t.numpy().astype(np.float16)
    else:  # bf16: quantize to the raw 16-bit pattern the gguf package expects
        data, raw = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    data = np.ascontiguousarray(data)
    sha.update(data.tobytes())  # little-endian, as tofile writes it
    writer.add_tensor(name, data, raw_dtype=raw)


def check_gguf(path: Path) -> tuple[bool, str]:
    """(ok, what was found): the header parses, the tensors tile the data section and fill the file,
    and the sha256 of the tensor data matches `mm.tensor_data.sha256` (when the file records it)."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path}: checking a GGUF file needs the gguf package: pip install 'mm[gguf]'") from None
    try:
        reader = gguf.GGUFReader(path)
        tensors = sorted(reader.tensors, key=lambda t: t.data_offset)
        field = reader.fields.get(TENSOR_SHA256)
        recorded = bytes(field.parts[field.data[0]]).decode("ascii") if field is not None else None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        return False, f"not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})"
    size, align, at = path.stat().st_size, reader.alignment, reader.data_offset
    for t in tensors:  # each tensor starts where the previous one (padded to the alignment) ends
        if t.data_offset != at:
            return False, f"tensor {t.name} starts at byte {t.data_offset}, expected {at}"
        at = -(-(t.data_offset + t.n_bytes) // align) * align
    if size not in (at, tensors[-1].data_offset + tensors[-1].n_bytes if tensors else at):
        return False, f"file is {size:,} bytes, its tensors describe {at:,} (truncated or extended?)"
    found = f"{len(tensors)} tensors, sizes consistent"
    if recorded is None:
        return True, f"{found}; no {TENSOR_SHA256} (not written by mm): tensor data not hashed"
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(reader.data[t.data_offset:t.data_offset + t.n_bytes])
    if sha.hexdigest() != recorded:
        return False, f"sha256 of the tensor data differs from the one recorded at export ({TENSOR_SHA256})"
    return True, f"{found}; sha256 of the tensor data matches"

