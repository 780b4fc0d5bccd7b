"""train.init and `mm config --from`: start training from a Hugging Face or mm model's weights.

The reference models are made here with transformers (tiny random Llama, Qwen3 and Qwen3-MoE
configs with the tiny store's tokenizer, some sharded, some in bf16); nothing is downloaded.
Every run goes through the real CLI: `mm config --from`, `mm train` with train.init, `mm export`,
and transformers loads what comes out.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, mm, mm_env

from pipeline.errors import UserError

TRAIN = ["seq_len=32", "micro_batch_size=8", "warmup_steps=2", "eval_interval=0", "save_interval=1000",
         "log_interval=1", "dtype=fp32", "compile=false"]
STILL = ["lr=1e-30", "min_lr=0", "max_steps=1"]  # a step too small to move any fp32 weight


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("init")
    (work / "none.yaml").write_text("{}\n")
    return work


def ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def config_from(work: Path, source: Path, out: Path, *args):
    return mm("config", "--from", source, "--out", out, "--params", work / "none.yaml", *args, cwd=work)


def train(work: Path, store: Path, tokenizer: Path, model: Path, out: Path, *sets: str):
    args = ["train", "--data", store, "--tokenizer", tokenizer, "--model", model, "--device", "cpu",
            "--resume", "none", "--params", work / "none.yaml", "--set", f"train.out_dir={out}"]
    for s in (*TRAIN, *sets):
        args += ["--set", f"train.{s}"]
    return mm(*args, cwd=work, env=mm_env(OMP_NUM_THREADS="1"), timeout=900)


def export(work: Path, ckpt: Path, out: Path, *args):
    return ok(mm("export", ckpt, "--out", out, "--params", work / "none.yaml", *args, cwd=work))


def first_loss(run_dir: Path) -> float:
    rows = (run_dir / "train_log.tsv").read_text().splitlines()
    header, first = rows[0].split("\t"), rows[1].split("\t")
    return float(first[header.index("loss")])


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def trained(tiny_store, work):
    """An mm model trained 60 steps from random weights, and its Hugging Face export."""
    model = work / "trained.json"
    ok(mm("config", "--preset", "tiny", "--tokenizer", tiny_store.tokenizer, "--out", model, "--params",
          work / "none.yaml", "--set", "model.dim=64", "--set", "model.n_layers=2", cwd=work))
    ok(train(work, tiny_store.store, tiny_store.tokenizer, model, work / "trained", "max_steps=60", "lr=3e-3"))
    return export(work, work / "trained" / "ckpt.pth", work / "trained_export") and work / "trained_export"


@pytest.fixture(scope="module")
def llama_ok(tiny_store, work) -> Path:
    return reference("llama", tiny_store.tokenizer, work / "llama-ok")


def reference(kind: str, tokenizer: Path, dest: Path, **changes) -> Path:
    """A tiny random transformers model of `kind` with this tokenizer, saved as a model directory."""
    import transformers as tf

    from pipeline.data.tokenizer import load_tokenizer

    _, info = load_tokenizer(tokenizer)
    common = dict(vocab_size=info["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=info["bos_id"], eos_token_id=info["eos_id"])
    config, cls = {
        "llama": (lambda c: tf.LlamaConfig(**c), tf.LlamaForCausalLM),
        "qwen3": (lambda c: tf.Qwen3Config(**c), tf.Qwen3ForCausalLM),
        "qwen3_moe": (lambda c: tf.Qwen3MoeConfig(**({"num_experts": 4, "num_experts_per_tok": 2,
                                                       "moe_intermediate_size": 32, "norm_topk_prob": True} | c)),
                      tf.Qwen3MoeForCausalLM),
        "qwen2": (lambda c: tf.Qwen2Config(**c), tf.Qwen2ForCausalLM),
        "gpt2": (lambda c: tf.GPT2Config(vocab_size=c["vocab_size"], n_embd=64, n_layer=2, n_head=4, n_positions=256),
                 tf.GPT2LMHeadModel),
    }[kind]
    torch.manual_seed(0)
    model = cls(config({**common, **changes}))
    with torch.no_grad():  # norm gains away from 1, so a dropped or misplaced norm shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if kind == "qwen3":
        model = model.to(torch.bfloat16)  # any float dtype: bf16 weights, converted exactly on loading
    model.save_pretrained(dest, max_shard_size="200KB")  # sharded, with model.safetensors.index.json
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, dest / name)
    return dest


# ---------------------------------------------------------------------------
# Round trip: config --from, train.init with a still learning rate, export: the same model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mm-export", "llama", "qwen3", "qwen3_moe"])
def test_round_trip_through_training_is_exact(kind, trained, tiny_store, work):
    source = trained if kind == "mm-export" else reference(kind, tiny_store.tokenizer, work / f"ref-{kind}")
    if kind == "qwen3":
        assert len(list(source.glob("model-*.safetensors"))) > 1  # the sharded, bf16 case
    model, out = work / f"{kind}.json", work / f"still-{kind}"
    ok(config_from(work, source, model))
    r = ok(train(work, tiny_store.store, source, model, out, f"init={source}", *STILL))
    assert "train.init:" in r.stderr and str(source) in r.stderr
    again = export(work, out / "ckpt.pth", work / f"again-{kind}") and work / f"again-{kind}"
    assert json.loads((again / "config.json").read_text())["architectures"] == \
        json.loads((source / "config.json").read_text())["architectures"]
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1))
    before, after = hf_logits(source, ids), hf_logits(again, ids)
    assert (after - before).abs().max().item() <= 1e-5
    # And mm itself computed that function while training (a table wrong both ways would pass the above).
    from pipeline.export.loading import load_model

    with torch.no_grad():
        assert (load_model(out / "ckpt.pth").model(ids)[0] - before).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------
# Continued pretraining
# ---------------------------------------------------------------------------


def test_continued_pretraining_starts_where_the_export_ends(trained, tiny_store, work):
    from pipeline.data.sampler import MixtureSampler, SourceSplit
    from pipeline.data.store.reader import open_store
    from pipeline.evaluate.held_out import evaluate_model

    model, out = work / "continue.json", work / "continue"
    ok(config_from(work, trained, model))
    ok(train(work, tiny_store.store, trained, model, out, f"init={trained}", "lr=1e-3", "max_steps=21"))

    # The first step's loss is the export's own loss on that batch (the run's first batch, seed 1337).
    store = open_store(tiny_store.store)
    name, source = next(iter(store.sources.items()))
    sampler = MixtureSampler([SourceSplit(name, 1.0, source.train.tokens, source.train.doc_offsets)], 32, 1337)
    batch = next(iter(sampler.micro_batches(0, 0, 1, 8, 1)))
    logits = hf_logits(trained, batch.inputs)
    export_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).item()
    assert first_loss(out) == pytest.approx(export_loss, abs=1e-4)
    random_start = first_loss(work / "trained")  # the same batch, from random weights
    assert random_start > math.log(1024) - 0.1 and first_loss(out) < random_start - 1.0

    # 20 more steps lower the held-out loss; the new export loads in transformers and as GGUF.
    again = export(work, out / "ckpt.pth", work / "continue_export") and work / "continue_export"
    before, after = (evaluate_model(d, tiny_store.store, seq_len=32, batches=8, batch_size=8, device="cpu")["val_loss"]
                     for d in (trained, again))
    assert after < before - 0.01, (before, after)
    assert torch.isfinite(hf_logits(again, batch.inputs)).all()
    gguf = pytest.importorskip("gguf")
    path = work / "continue.gguf"
    export(work, out / "ckpt.pth", path, "--format", "gguf")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"


def test_init_from_an_mm_checkpoint_is_the_checkpoint(trained, tiny_store, work):
    from pipeline.checkpoint.format import load_checkpoint

    out = work / "from-ckpt"
    ok(train(work, tiny_store.store, tiny_store.tokenizer, work / "trained.json", out,
             f"init={work / 'trained' / 'ckpt.pth'}", *STILL))
    a, b = load_checkpoint(work / "trained" / "ckpt.pth"), load_checkpoint(out / "ckpt.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["step"] == 1  # a fresh run: step 0 was the checkpoint's weights, not a resume of its step 60


# ---------------------------------------------------------------------------
# Refusals: one line naming what mm cannot represent
# ---------------------------------------------------------------------------


def test_unsupported_models_are_refused_in_one_line(tiny_store, work, llama_ok):
    gpt2 = reference("gpt2", tiny_store.tokenizer, work / "gpt2")
    assert_user_error(config_from(work, gpt2, work / "x.json"), "model_type 'gpt2'", "GPT2LMHeadModel")
    yarn = work / "yarn"
    shutil.copytree(llama_ok, yarn)
    doc = json.loads((yarn / "config.json").read_text())
    doc.update(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    (yarn / "config.json").write_text(json.dumps(doc))
    assert_user_error(config_from(work, yarn, work / "x.json"), "rope_scaling.type", "'yarn'")
    assert not (work / "x.json").exists()


def test_each_unrepresentable_field_is_named(tiny_store, work, llama_ok):
    from pipeline.export.hf_import import open_hf_dir

    cases = {  # what is changed → what the one line must name
        "qwen2": ({}, ["model_type 'qwen2'", "biases"]),
        "llama": ({"tie_word_embeddings": False}, ["tie_word_embeddings = False"]),
        "qwen3_moe": ({"norm_topk_prob": False}, ["norm_topk_prob = False"]),
    }
    for kind, (changes, needles) in cases.items():
        d = reference(kind, tiny_store.tokenizer, work / f"bad-{kind}", **changes)
        with pytest.raises(UserError) as e:
            open_hf_dir(d)
        assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)
    for field, value, needle in [("hidden_act", "gelu", "hidden_act = 'gelu'"),
                                 ("use_sliding_window", True, "use_sliding_window"),
                                 ("quantization_config", {"bits": 4}, "field 'quantization_config'"),
                                 ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "'llama3'")]:
        d = work / f"bad-{field}"
        shutil.copytree(llama_ok, d)
        doc = json.loads((d / "config.json").read_text()) | {field: value}
        (d / "config.json").write_text(json.dumps(doc))
        with pytest.raises(UserError, match=needle):
            open_hf_dir(d)


def test_vocabulary_and_architecture_mismatches_name_both_sides(tiny_store, work, llama_ok):
    from pipeline.architecture import build_config
    from pipeline.export.hf_import import init_weights
    from pipeline.model.transformer import Transformer

    big = reference("llama", tiny_store.tokenizer, work / "big-vocab", vocab_size=2048)
    assert_user_error(config_from(work, big, work / "x.json", "--tokenizer", tiny_store.tokenizer), "2048", "1024")
    other = Transformer(build_config("tiny", 1024, {"dim": 64, "n_layers": 3}))
    with pytest.raises(UserError, match=r"n_layers \(2 vs 3\)"):
        init_weights(other, llama_ok, "unused")
    small = Transformer(build_config("tiny", 512, {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128,
                                                  "norm_eps": 1e-6, "rope_theta": 1e4, "max_seq_len": 256}))
    with pytest.raises(UserError, match="embedding has 2048 rows.*vocab_size 512"):
        init_weights(small, big, "unused")
    with pytest.raises(UserError, match="tokenizer.json differs from the run's tokenizer"):
        init_weights(Transformer(build_config("tiny", 1024, {"dim": 64, "n_layers": 2, "head_dim": 16,
                                                             "hidden_dim": 128, "norm_eps": 1e-6, "rope_theta": 1e4,
                                                             "max_seq_len": 256})), llama_ok, "0" * 64)
    with pytest.raises(UserError, match="train.init .*nope: not found"):
        init_weights(small, work / "nope", "unused")


def test_minimind_directory_loads_as_minimind_writes_it(tiny_store, work):
    """MiniMind2's config.json (intermediate_size null, its own field names) and a torch.save'd state dict
    holding both model.embed_tokens.weight and lm_head.weight: the same function as the Llama it came from."""
    from pipeline.export.hf_import import load_into, open_hf_dir
    from pipeline.model.transformer import Transformer

    src = reference("llama", tiny_store.tokenizer, work / "mm2-src", intermediate_size=192, hidden_size=64,
                    head_dim=16, rope_theta=1e6, rms_norm_eps=1e-5)
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    d = work / "minimind2"
    d.mkdir()
    state = {k: v.clone() for k, v in llama.state_dict().items()} | {"lm_head.weight": llama.lm_head.weight.clone()}
    torch.save(state, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": None,
        "max_position_embeddings": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "vocab_size": 1024, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "inference_rope_scaling": False,
        "flash_attn": True, "use_moe": False, "num_experts_per_tok": 2, "n_routed_experts": 4, "n_shared_experts": 1,
        "scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True, "norm_topk_prob": True,
        "torch_dtype": "float32", "transformers_version": "4.48.0"}))
    hf = open_hf_dir(d)
    assert hf.model_type == "minimind" and hf.config.hidden_dim == 192 and not hf.config.qk_norm
    model = Transformer(hf.config).eval()
    load_into(model, hf)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids)[0] - llama(ids).logits).abs().max().item() <= 1e-5


def test_config_takes_train_init_architecture_when_it_names_a_directory(work, llama_ok):
    """What the DVC config stage relies on: with train.init set, `mm config` (no --preset, no --from) writes
    the base model's architecture, the same model.json as --from."""
    explicit, implicit = work / "explicit.json", work / "implicit.json"
    ok(config_from(work, llama_ok, explicit))
    ok(mm("config", "--out", implicit, "--tokenizer", llama_ok, "--params", work / "none.yaml",
          "--set", f"train.init={llama_ok}", cwd=work))
    assert json.loads(implicit.read_text()) == json.loads(explicit.read_text())
    assert json.loads(implicit.read_text())["preset"] == f"from {llama_ok}"


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_newer_minimind_with_qk_norm_and_experts(kind, tiny_store, work):
    """MiniMind's newer config (head_dim, QK-norm always, num_experts / moe_intermediate_size) over weights as
    its save_pretrained names them: read as the Qwen3 (MoE) model computing the same function."""
    from transformers import AutoModelForCausalLM

    from pipeline.export.hf_import import load_into, open_hf_dir
    from pipeline.model.transformer import Transformer

    src = work / f"ref-{kind}" if (work / f"ref-{kind}").is_dir() else reference(kind, tiny_store.tokenizer,
                                                                                 work / f"mm3-{kind}")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    d = work / f"minimind3-{kind}"
    shutil.copytree(src, d, dirs_exist_ok=True)
    moe = kind == "qwen3_moe"
    (d / "config.json").write_text(json.dumps({
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2,
        "use_moe": moe, "dropout": 0.0, "vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2, "flash_attn": True,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "intermediate_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
        "tie_word_embeddings": True, "inference_rope_scaling": False, "rope_scaling": None, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True, "router_aux_loss_coef": 5e-4,
        "dtype": "float32", "transformers_version": "5.0.0"}))
    hf = open_hf_dir(d)
    assert hf.model_type == "minimind" and hf.config.qk_norm and hf.config.n_experts == (4 if moe else 0)
    model = Transformer(hf.config).eval()
    load_into(model, hf)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-5
