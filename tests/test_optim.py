"""train.optimizer=muon, train.compile=auto and `mm config`'s memory estimate.

  muon split        Muon gets exactly the blocks' weight matrices, AdamW the embedding and norms
  muon in fp32      the fp32 Newton–Schulz is torch's iteration (bit for bit when run in bf16)
  exact resume      16 steps straight == 8 (stop_after) + 8 resumed, bit for bit, with Muon (CLI)
  optimizer change  resuming a Muon checkpoint with AdamW is a one-line error
  compile: auto     the decision and its reason (CUDA, short and long CPU runs, true/false)
  memory estimate   one block's saved activations counted by formula == counted by torch's
                    saved-tensor hooks (fp32 and bf16, both attention paths, QK-norm)
(2 processes with Muon == 1 with double accumulation: tests/test_distributed.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, mm, mm_env

from pipeline.architecture import block_activation_bytes, build_config, config_from_dict, hidden_matrix_shapes
from pipeline.errors import UserError
from pipeline.model.transformer import Block, Transformer, rope_tables
from pipeline.params import TrainParams, load_params
from pipeline.train.compiling import CPU_COMPILE_MIN_FLOPS, decide
from pipeline.train.optim import MuonWithAdamW, lr_at, make_optimizer, muon_matrices, orthogonalise, set_lr


def small_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(build_config("tiny", 256, {"dim": 64, "n_layers": 2}))


# ---------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model, tp = small_model(), TrainParams(optimizer="muon", dtype="fp32")
    optimizer = make_optimizer(model, tp, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    muon_ids = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon_ids}
    assert names == {name for name, _ in muon_matrices(model)}
    assert len(names) == 2 * 7 and all(n.startswith("layers.") and n.endswith("proj.weight") for n in names)
    assert sorted(tuple(p.shape) for _, p in muon_matrices(model)) == sorted(hidden_matrix_shapes(model.config))
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert adamw | muon_ids == {id(p) for p in model.parameters()} and not adamw & muon_ids

    # One schedule: AdamW's groups follow lr_at, Muon's the same curve scaled to muon_lr.
    lr = lr_at(40, tp, 300)
    set_lr(optimizer, lr, tp)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(lr * tp.muon_lr / tp.lr)
    assert all(g["lr"] == lr for g in optimizer.adamw.param_groups)


def test_fp32_newton_schulz_is_torchs_iteration():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(96, 40, generator=torch.Generator().manual_seed(0))
    coefficients = (3.4445, -4.775, 2.0315)
    torchs = _zeropower_via_newtonschulz(g, coefficients, 5, 1e-7)
    assert torch.equal(orthogonalise(g.bfloat16(), coefficients, 5, 1e-7), torchs)  # same ops, same rounding
    fp32 = orthogonalise(g, coefficients, 5, 1e-7)
    assert fp32.dtype == torch.float32 and (fp32 - torchs.float()).abs().max() < 0.05


def test_muon_without_torch_muon_is_one_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match="torch >= 2.9"):
        make_optimizer(small_model(), TrainParams(optimizer="muon"), torch.device("cpu"))


def test_optimizer_and_compile_keys_are_checked():
    assert load_params(None, ["train.compile=true"]).train.compile is True
    assert load_params(None, []).train.compile == "auto"
    for bad, words in (("train.compile=1", ["train.compile", "auto, true, false"]),
                       ("train.optimizer=sgd", ["train.optimizer", "adamw, muon"]),
                       ("train.muon_momentum=1", ["train.muon_momentum"]),
                       ("train.muon_lr=0", ["train.muon_lr"])):
        with pytest.raises(UserError) as e:
            load_params(None, [bad])
        assert all(w in str(e.value) for w in words), str(e.value)


@pytest.fixture(scope="module")
def muon_runs(tiny_store, tmp_path_factory):
    """16 Muon steps straight, and 8 (stop_after) + 8 resumed; then that checkpoint resumed with AdamW."""
    work = tmp_path_factory.mktemp("muon")
    (work / "none.yaml").write_text("{}\n")
    model = work / "model.json"
    r = mm("config", "--tokenizer", tiny_store.tokenizer, "--out", model, "--params", work / "none.yaml",
           "--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "train.optimizer=muon", cwd=work,
           timeout=900)
    assert r.returncode == 0, r.stderr

    def train(out, *sets, resume="auto"):
        args = ["train", "--data", tiny_store.store, "--tokenizer", tiny_store.tokenizer, "--model", model,
                "--device", "cpu", "--resume", resume, "--params", work / "none.yaml", "--set", f"train.out_dir={out}"]
        for s in ("seq_len=32", "micro_batch_size=4", "max_steps=16", "warmup_steps=3", "eval_interval=8",
                  "eval_batches=2", "save_interval=100", "dtype=fp32", "optimizer=muon", *sets):
            args += ["--set", f"train.{s}"]
        return mm(*args, cwd=work, env=mm_env(OMP_NUM_THREADS="1"), timeout=900)

    straight, first = train(work / "straight"), train(work / "split", "stop_after=8")
    resumed = train(work / "split")
    other = train(work / "other", "optimizer=adamw", resume=str(work / "split" / "step_00000008.pth"))
    return types.SimpleNamespace(work=work, config=r, straight=straight, first=first, resumed=resumed, other=other)


def test_muon_resume_is_bit_exact(muon_runs):
    from pipeline.checkpoint.format import load_checkpoint

    for r in (muon_runs.straight, muon_runs.first, muon_runs.resumed):
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in muon_runs.resumed.stderr and "at step 8" in muon_runs.resumed.stderr
    rows = {k: (muon_runs.work / k / "train_log.tsv").read_text().splitlines() for k in ("straight", "split")}
    strip = lambda lines: [line.split("\t")[:4] for line in lines]  # noqa: E731  step, loss, lr, grad_norm
    assert len(rows["straight"]) == 17 and strip(rows["split"]) == strip(rows["straight"])
    a, b = (load_checkpoint(muon_runs.work / k / "ckpt.pth") for k in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    buffers = [k for k, v in a["optimizer"]["state"].items() if "momentum_buffer" in v]
    assert len(buffers) == 14  # Muon's state is in the checkpoint ...
    for k in buffers:  # ... and restored exactly
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    metrics = json.loads((muon_runs.work / "straight" / "metrics.json").read_text())
    assert metrics["optimizer"] == "muon" and metrics["compiled"] is False
    assert metrics["compile_reason"].startswith("auto: a short CPU run")
    assert "Muon Newton–Schulz" in muon_runs.config.stdout and "peak train memory" in muon_runs.config.stdout


def test_resuming_with_another_optimizer_is_one_line_error(muon_runs):
    assert_user_error(muon_runs.other, "cannot resume", "train.optimizer (muon → adamw)")


# ---------------------------------------------------------------------------
# compile: auto
# ---------------------------------------------------------------------------


def test_compile_auto_decides_by_device_and_run_length():
    c = build_config("minimind2-small", 6400)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decide(True, cpu, c, 512, 2048, 10) == (True, "train.compile=true")
    assert decide(False, cuda, c, 512, 2048, 10**6) == (False, "train.compile=false")
    assert decide("auto", cuda, c, 512, 2048, 10)[0] is True
    demo = decide("auto", cpu, build_config("tiny", 6400), 256, 16 * 256, 300)
    assert demo[0] is False and "short CPU run" in demo[1]
    long = decide("auto", cpu, c, 512, 2048, 10**5)
    assert long[0] is True and "long CPU run" in long[1]
    from pipeline.architecture import flops_per_token
    steps = CPU_COMPILE_MIN_FLOPS / (flops_per_token(c, 512) * 2048)
    assert decide("auto", cpu, c, 512, 2048, int(steps) - 1)[0] is False
    assert decide("auto", cpu, c, 512, 2048, int(steps) + 1)[0] is True


# ---------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------


def saved_activation_bytes(block: Block, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages one block's forward saves for backward, weights (and their casts) excluded."""
    c = block.self_attn
    x = torch.randn(batch, seq_len, block.input_layernorm.weight.numel(), requires_grad=True)
    cos, sin = rope_tables(c.head_dim, seq_len, 1e6)
    weights = list(block.parameters())
    weight_shapes = {tuple(p.shape) for p in weights} | {tuple(p.t().shape) for p in weights if p.dim() == 2}
    skip = {p.untyped_storage().data_ptr() for p in [*weights, cos, sin]}
    storages = {}

    def pack(t):
        weight_copy = t.dtype != torch.float32 and tuple(t.shape) in weight_shapes  # autocast's weight casts
        if t.untyped_storage().data_ptr() not in skip and not weight_copy:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            block(x, cos, sin)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [20, 2100])  # bf16: the CPU matmul attention path, then SDPA's (2·4·2100² > 2^25)
@pytest.mark.parametrize("shape", [{}, {"qk_norm": True}, {"n_kv_heads": 4}])
def test_block_activation_estimate_counts_what_autograd_saves(dtype, seq_len, shape):
    c = config_from_dict({"vocab_size": 256, "dim": 96, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                          "max_seq_len": 4096, **shape}, "test")
    measured = saved_activation_bytes(Block(c), 2, seq_len, dtype)
    estimated = block_activation_bytes(c, 2, seq_len, 4 if dtype == torch.float32 else 2, "cpu")
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)


# ---------------------------------------------------------------------------
# Schedules (train.schedule), decay branches, and what a resume says about the learning rate
# ---------------------------------------------------------------------------

LR, MIN_LR, WARMUP = 3e-3, 3e-4, 3
SCHEDULES = {  # name: (the run's sets, total steps, steps that decay)
    "cosine": (["schedule=cosine"], 12, None),
    "wsd_linear": (["schedule=wsd", "decay_shape=linear", "decay_fraction=0.25"], 12, 3),
    "wsd_1-sqrt": (["schedule=wsd", "decay_shape=1-sqrt", "decay_steps=4"], 12, 4),
    "constant": (["schedule=constant"], 12, None),
}
WSD = ["schedule=wsd", "decay_steps=4", "eval_interval=4", "eval_batches=2", "save_interval=4", "keep_last=10"]


def expected_lr(name: str, step: int) -> float:
    """The schedule's formula, written out here independently of lr_at (step is 0-based)."""
    _, total, decay = SCHEDULES[name]
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    if name == "constant":
        return LR
    if name == "cosine":
        return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (step - (WARMUP - 1)) / (total - WARMUP)))
    if step < total - decay:
        return LR
    progress = (step - (total - decay - 1)) / decay
    return MIN_LR + (LR - MIN_LR) * (1 - (progress if name == "wsd_linear" else math.sqrt(progress)))


def _start(work: Path, model: Path, data, out: str, *sets: str, resume: str = "auto") -> subprocess.Popen:
    args = ["--data", data.store, "--tokenizer", data.tokenizer, "--model", model, "--device", "cpu",
            "--resume", resume, "--params", work / "none.yaml", "--set", f"train.out_dir={work / out}"]
    for s in ("seq_len=32", "micro_batch_size=2", "dtype=fp32", f"lr={LR}", f"min_lr={MIN_LR}",
              f"warmup_steps={WARMUP}", "eval_interval=0", "log_interval=100", *sets):
        args += ["--set", f"train.{s}"]
    return subprocess.Popen([sys.executable, "-m", "stages.cli", "train", *map(str, args)], cwd=work,
                            env=mm_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _finish(*procs: subprocess.Popen) -> list[subprocess.CompletedProcess]:
    done = []
    for p in procs:
        stderr = p.communicate(timeout=900)[1]
        done.append(subprocess.CompletedProcess(p.args, p.returncode, "", stderr))
    return done


def _tree(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def schedule_runs(tiny_store, tmp_path_factory):
    """The four schedules (12 steps); a 16-step wsd run straight and its parent stopped at 10; a branch of
    the parent at step 8 that decays over steps 9-12; refused and accepted resumes; the parent resumed."""
    work = tmp_path_factory.mktemp("schedules")
    (work / "none.yaml").write_text("{}\n")
    model = work / "model.json"
    r = mm("config", "--tokenizer", tiny_store.tokenizer, "--out", model, "--params", work / "none.yaml",
           "--set", "model.dim=64", "--set", "model.n_layers=2", cwd=work)
    assert r.returncode == 0, r.stderr
    start = functools.partial(_start, work, model, tiny_store)
    runs = {}
    for pair in (("cosine", "wsd_linear"), ("wsd_1-sqrt", "constant")):
        procs = [start(name, f"max_steps={SCHEDULES[name][1]}", *SCHEDULES[name][0]) for name in pair]
        runs.update(zip(pair, _finish(*procs), strict=True))
    runs["straight"], runs["parent"] = _finish(start("straight", "max_steps=16", *WSD),
                                               start("parent", "max_steps=16", "stop_after=10", *WSD))
    before = _tree(work / "parent")
    shutil.copytree(work / "parent", work / "parent_copy")
    runs["branch"], runs["seq_len"] = _finish(
        start("branch", "max_steps=12", *WSD, resume=str(work / "parent" / "step_00000008.pth")),
        start("other", "max_steps=16", "seq_len=16", *WSD, resume=str(work / "parent" / "step_00000008.pth")))
    runs["parent_untouched"] = _tree(work / "parent") == before
    runs["shorter"], runs["cosine_longer"] = _finish(start("parent", "max_steps=11", *WSD),
                                                     start("cosine", "max_steps=20", *SCHEDULES["cosine"][0]))
    runs["longer"], runs["resumed"] = _finish(start("parent_copy", "max_steps=24", "stop_after=1", *WSD),
                                              start("parent", "max_steps=16", *WSD))
    return types.SimpleNamespace(work=work, **{k.replace("-", "_"): v for k, v in runs.items()})


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_logged_lr_is_the_schedule_formula_at_every_step(schedule_runs, name):
    from pipeline.train.progress import read_log

    assert getattr(schedule_runs, name.replace("-", "_")).returncode == 0
    lrs = [row["lr"] for row in read_log(schedule_runs.work / name / "train_log.tsv")]
    _, total, decay = SCHEDULES[name]
    assert len(lrs) == total
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(expected_lr(name, step), rel=1e-12, abs=0), (name, step + 1)
    assert lrs[WARMUP - 1] == pytest.approx(LR, rel=1e-12)  # the end of warmup
    if name == "constant":
        assert lrs[WARMUP:] == [LR] * (total - WARMUP)
    else:
        assert lrs[-1] == MIN_LR  # exactly, at the last step
    if decay:  # a plateau at lr exactly, then every decay step strictly lower
        assert lrs[WARMUP:total - decay] == [LR] * (total - decay - WARMUP)
        assert all(a > b for a, b in zip(lrs[total - decay - 1:], lrs[total - decay:], strict=False))


def test_a_decay_branch_starts_as_its_parent_and_leaves_it_alone(schedule_runs):
    work = schedule_runs.work
    branch = schedule_runs.branch
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert f"at step 8 as a branch of {work / 'parent'} into {work / 'branch'}" in branch.stderr
    assert "train.max_steps 16 → 12 changes the learning rate of steps not yet taken" in branch.stderr
    rows = {k: (work / k / "train_log.tsv").read_text().splitlines() for k in ("parent", "branch", "straight")}
    strip = lambda lines: [line.split("\t")[:5] for line in lines]  # noqa: E731  step, loss, lr, grad_norm, tokens
    assert len(rows["branch"]) == 13 and strip(rows["branch"][:9]) == strip(rows["parent"][:9])  # header + 8 steps
    lrs = [float(line.split("\t")[2]) for line in rows["branch"][1:]]
    assert lrs[7] == LR and lrs[8] < LR and lrs[-1] == MIN_LR  # stable to step 8, decayed over steps 9-12
    val = (work / "branch" / "val_log.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in val[1:]] == ["4", "8", "12"]
    assert val[1:3] == (work / "straight" / "val_log.tsv").read_text().splitlines()[1:3]
    assert schedule_runs.parent_untouched  # the branch read the parent's directory and wrote nothing there


def test_the_parent_resumed_after_a_branch_is_the_uninterrupted_run(schedule_runs):
    from pipeline.checkpoint.format import load_checkpoint

    work, resumed = schedule_runs.work, schedule_runs.resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 10" in resumed.stderr and "note:" not in resumed.stderr
    strip = lambda path: [line.split("\t")[:5] for line in path.read_text().splitlines()]  # noqa: E731
    assert strip(work / "parent" / "train_log.tsv") == strip(work / "straight" / "train_log.tsv")
    a, b = load_checkpoint(work / "parent" / "ckpt.pth"), load_checkpoint(work / "straight" / "ckpt.pth")
    assert a["step"] == b["step"] == 16 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["train_config"]["schedule"] == "wsd" and a["train_config"]["decay_steps"] == 4  # recorded


def test_a_resume_that_changes_the_lr_of_steps_taken_is_refused_with_the_ways_out(schedule_runs):
    line = assert_user_error(schedule_runs.shorter, "cannot resume", "train.max_steps 16 → 11",
                             "steps already taken", "another train.out_dir", "--resume none",
                             "train.lr_change=allow")
    assert "step 8: 0.003 → " in line and "jump at the resumed step 11" in line
    assert_user_error(schedule_runs.cosine_longer, "train.max_steps 12 → 20", "steps already taken",
                      "another train.out_dir", "--resume none")


def test_an_accepted_lr_change_is_a_note_with_before_and_after(schedule_runs):
    r = schedule_runs.longer
    assert r.returncode == 0, r.stderr[-3000:]
    note = next(line for line in r.stderr.splitlines() if line.startswith("note: train.max_steps 16 → 24"))
    assert "steps not yet taken (step 11: lr 0.003 → 0.003; it first differs at step 13: 0.002325 → 0.003)" in note


def test_a_refused_resume_names_the_two_ways_out(schedule_runs):
    assert_user_error(schedule_runs.seq_len, "cannot resume", "seq_len (32 → 16)", "--resume none",
                      "another train.out_dir")


def test_schedule_change_rules():
    from pipeline.train.branch import schedule_change

    old = TrainParams(schedule="wsd", decay_steps=20, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    same = schedule_change("ckpt", 50, old, 100, old, 100, branch=False)
    assert same is None
    note = schedule_change("ckpt", 50, old, 100, dataclasses.replace(old, min_lr=0.0), 100, branch=False)
    assert note.startswith("note: train.min_lr 0.0001 → 0.0 changes the learning rate of steps not yet taken")
    assert "it first differs at step 81" in note
    higher = dataclasses.replace(old, lr=2e-3)
    with pytest.raises(UserError, match=r"train.lr 0.001 → 0.002 changes the learning rate of steps already taken "
                                        r"\(step 1: 0.0001 → 0.0002\)"):
        schedule_change("ckpt", 50, old, 100, higher, 100, branch=False)
    jump = schedule_change("ckpt", 50, old, 100, higher, 100, branch=True)
    assert "this branch takes the new schedule from step 51: lr 0.001 → 0.002 (a jump" in jump
    allowed = schedule_change("ckpt", 50, old, 100, dataclasses.replace(higher, lr_change="allow"), 100, branch=False)
    assert "train.lr_change=allow: this run takes the new schedule from step 51" in allowed
    # An older checkpoint without train.schedule was cosine.
    from pipeline.train.branch import saved_schedule
    assert saved_schedule({"lr": 1e-3, "max_steps": 5}).schedule == "cosine"


def test_spike_guard_keys_load_and_its_copy_is_in_the_memory_estimate():
    from pipeline.architecture import count_params, training_memory

    assert load_params(None, ["train.spike_action=none"]).train.spike_action == "none"  # a word YAML keeps a word
    assert load_params(None, []).train.spike_action == "rollback"
    for bad, words in (("train.spike_factor=1", ["train.spike_factor", "above 1"]),
                       ("train.spike_window=0", ["train.spike_window"]),
                       ("train.decay_fraction=1.5", ["train.decay_fraction"]),
                       ("train.schedule=linear", ["train.schedule", "cosine, wsd, constant"])):
        with pytest.raises(UserError) as e:
            load_params(None, [bad])
        assert all(w in str(e.value) for w in words), str(e.value)
    c = build_config("tiny", 6400)
    off, on = (training_memory(c, 16, 256, "bf16", "adamw", fused_loss=True, spike_copy=s) for s in (False, True))
    assert on["spike_copy"] == 12 * count_params(c)["total"] and on["total"] - off["total"] == on["spike_copy"]
