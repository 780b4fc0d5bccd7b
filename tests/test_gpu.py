"""The CUDA paths, run only where a GPU is (`pytest -m gpu`); on a CPU-only machine every test here skips.

The code under test is the same code the CPU tests run: `mm train --device cuda`
differs from `--device cpu` only where torch does (autocast device, fused AdamW,
FlexAttention for document masks, NCCL under a launcher, pinned batches).

What the tests show:
  one step           a CUDA bf16 step's loss equals the CPU fp32 step's within bf16 tolerance
  flex == dense      FlexAttention's document mask equals SDPA with the dense boolean mask, forward and backward
  compiled == eager  torch.compile of the model gives the eager forward and gradients
  fp16 scaler        `train.dtype=fp16` with an injected non-finite loss skips that step and finishes
  across devices     a checkpoint written on CUDA resumes on the CPU and the reverse, continuing the curve
  export             an export of a CUDA-trained checkpoint loads in transformers and matches mm's logits
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import mm, mm_env

from pipeline.train.progress import read_log

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)")]

STEPS = 6
BASE = ["seq_len=64", "micro_batch_size=4", "lr=3e-3", "warmup_steps=2", "eval_interval=3", "eval_batches=2",
        "save_interval=100", "log_interval=1", "seed=1234", "compile=false"]


@pytest.fixture(scope="module")
def work(tiny_store, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gpu")
    model = root / "model.json"
    done = mm("config", "--tokenizer", tiny_store.tokenizer, "--out", model,
              "--set", "model.dim=64", "--set", "model.n_layers=2")
    assert done.returncode == 0, done.stderr
    return {"root": root, "model": model, "data": tiny_store}


def train(work, out: Path, device: str, *sets: str, resume: str = "auto", env: dict | None = None):
    args = ["train", "--data", work["data"].store, "--tokenizer", work["data"].tokenizer, "--model", work["model"],
            "--device", device, "--resume", resume, "--set", f"train.out_dir={out}"]
    for s in [*BASE, f"max_steps={STEPS}", *sets]:
        args += ["--set", f"train.{s}"]
    done = mm(*args, env=env or mm_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return [r["loss"] for r in read_log(out / "train_log.tsv")]


def test_cuda_bf16_step_equals_cpu_fp32_step(work):
    cpu = train(work, work["root"] / "cpu_fp32", "cpu", "dtype=fp32")
    cuda = train(work, work["root"] / "cuda_bf16", "cuda", "dtype=bf16")
    # The first loss is before any update; later ones after a few steps of bf16 rounding.
    assert cuda[0] == pytest.approx(cpu[0], rel=1e-2)
    assert cuda == pytest.approx(cpu, rel=3e-2)


def test_cuda_fp32_curve_equals_cpu_fp32(work):
    cpu = train(work, work["root"] / "cpu_fp32_b", "cpu", "dtype=fp32")
    cuda = train(work, work["root"] / "cuda_fp32", "cuda", "dtype=fp32")
    assert cuda == pytest.approx(cpu, rel=1e-3)  # TF32 off in fp32; only summation order differs


def test_flex_document_mask_equals_dense_mask_forward_and_backward():
    from pipeline.model.doc_attention import document_attention, document_mask

    torch.manual_seed(0)
    B, H, KV, T, hd = 2, 4, 2, 256, 64
    doc_ids = torch.cumsum(torch.rand(B, T, device="cuda") < 0.02, dim=1)
    q = torch.randn(B, H, T, hd, device="cuda", requires_grad=True)
    k = torch.randn(B, KV, T, hd, device="cuda", requires_grad=True)
    v = torch.randn(B, KV, T, hd, device="cuda", requires_grad=True)
    flex = document_attention(q, k, v, document_mask(doc_ids))
    grads_flex = torch.autograd.grad(flex.square().sum(), (q, k, v))

    t = torch.arange(T, device="cuda")
    dense = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (t[None, :, None] >= t[None, None, :])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=True)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(flex, ref, atol=2e-3, rtol=2e-3)
    for a, b in zip(grads_flex, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)


def test_compiled_model_equals_eager():
    from pipeline.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2)).cuda()
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    targets = torch.randint(0, 512, (2, 128), device="cuda")

    def loss_and_grads(m):
        model.zero_grad(set_to_none=True)
        loss, _ = m(idx, targets=targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-3)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fp16_scaler_skips_an_injected_nonfinite_step_and_finishes(work):
    out = work["root"] / "fp16"
    losses = train(work, out, "cuda", "dtype=fp16", env=mm_env(MM_INJECT_NAN_STEPS="3"))
    assert len(losses) == STEPS
    assert not math.isfinite(losses[2])  # logged as nan, the update skipped
    assert all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)


@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_resumes_on_the_other_device(work, first, second):
    straight = train(work, work["root"] / f"straight_{first}", first, "dtype=fp32")
    out = work["root"] / f"{first}_then_{second}"
    train(work, out, first, "dtype=fp32", "stop_after=3")
    resumed = train(work, out, second, "dtype=fp32")
    assert resumed[:3] == straight[:3]  # the same rows: written by the first device
    assert resumed[3:] == pytest.approx(straight[3:], rel=1e-3)


def test_export_of_a_cuda_trained_checkpoint_loads_in_transformers(work):
    from transformers import AutoModelForCausalLM

    from pipeline.export.loading import load_model

    out = work["root"] / "cuda_export_run"
    train(work, out, "cuda", "dtype=bf16")
    export = work["root"] / "cuda_export"
    shutil.rmtree(export, ignore_errors=True)
    done = mm("export", out / "ckpt.pth", "--out", export)
    assert done.returncode == 0, done.stderr
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    ours = load_model(out / "ckpt.pth").model
    idx = torch.randint(0, hf.config.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)
