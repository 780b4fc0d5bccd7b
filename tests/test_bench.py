"""`mm eval EXPORT --tasks ...`: lm-evaluation-harness on an export, offline; the chat template.

A local 4-way multiple-choice task over the shared corpus (right continuation
= the corpus text, wrong ones = the same words shuffled, the rule of
examples/bench/make_docstring_mc.py) is scored on an export of a tiny model
trained on that corpus and on an export of the same model freshly
initialised. Everything runs with the Hugging Face libraries offline.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_user_error, mm, mm_env
from test_export import SMALL, make_state

pytest.importorskip("lm_eval", reason="mm[bench] (lm-eval) not installed")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _make_items():
    spec = importlib.util.spec_from_file_location("make_docstring_mc", REPO / "examples/bench/make_docstring_mc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(tiny_store, tmp_path_factory) -> dict:
    """A freshly initialised tiny model, saved as a checkpoint the way training saves one, and its export."""
    from pipeline.checkpoint.format import load_checkpoint, save_checkpoint
    from pipeline.export.exporter import export_hf

    root = tmp_path_factory.mktemp("fresh")
    save_checkpoint(make_state(tiny_store.tokenizer, "tiny", SMALL), root, keep_last=1)
    return {"ckpt": root / "ckpt.pth", "export": export_hf(load_checkpoint(root / "ckpt.pth"), root / "export")}


@pytest.fixture(scope="module")
def bench(tiny_store, fresh, tmp_path_factory) -> dict:
    """Exports of a trained and of a freshly initialised tiny model, and a local task YAML."""
    from pipeline.architecture import build_config, save_model_json
    from pipeline.checkpoint.format import load_checkpoint
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.export.exporter import export_hf
    from pipeline.params import Params
    from pipeline.train.loop import train

    root = tmp_path_factory.mktemp("bench")
    maker = _make_items()
    maker.write_items(maker.make_items(tiny_store.corpus, n=40), root / "mc.jsonl")
    yaml_text = (REPO / "examples/bench/docstring_mc.yaml").read_text()
    task = root / "mc.yaml"
    task.write_text(yaml_text.replace("examples/bench/docstring_mc.jsonl", str(root / "mc.jsonl")))

    _, info = load_tokenizer(tiny_store.tokenizer)
    save_model_json(build_config("tiny", info["vocab_size"], SMALL), root / "model.json", "tiny")
    params = Params()
    tp = params.train
    tp.seq_len, tp.micro_batch_size, tp.max_steps, tp.warmup_steps, tp.lr, tp.min_lr = 64, 16, 150, 10, 1e-2, 1e-3
    tp.eval_interval, tp.save_interval, tp.log_interval, tp.dtype = 0, 1000, 1000, "fp32"
    tp.out_dir = str(root / "trained")
    train(params, tiny_store.store, tiny_store.tokenizer, root / "model.json", resume="none", device="cpu")
    trained = export_hf(load_checkpoint(root / "trained" / "ckpt.pth"), root / "export-trained")
    return {"root": root, "task": task, "trained": trained, "fresh": fresh["export"]}


def _bench(export: Path, task: Path, out: Path, *extra) -> dict:
    env = {k: v for k, v in mm_env().items() if k not in OFFLINE}  # mm goes offline by itself
    r = mm("eval", export, "--tasks", task, "--out", out, "--device", "cpu", "--batch-size", 16, *extra, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "acc" in r.stdout and "stderr" in r.stdout
    return json.loads(out.read_text())


def test_local_task_trained_above_chance_fresh_near_it_same_as_the_harness(bench):
    root, task = bench["root"], bench["task"]
    trained = _bench(bench["trained"], task, root / "bench-trained.json")
    fresh = _bench(bench["fresh"], task, root / "bench-fresh.json")
    acc_trained, acc_fresh = trained["docstring_mc"]["acc"], fresh["docstring_mc"]["acc"]
    # 40 items, 4 choices: chance is 0.25 (binomial sd 0.07).
    assert acc_trained >= 0.6, (acc_trained, acc_fresh)
    assert acc_fresh <= 0.45, (acc_trained, acc_fresh)
    assert trained["docstring_mc"]["acc_stderr"] > 0
    assert trained["config"]["offline"] is True and trained["config"]["num_fewshot"] == 0
    # The harness's own files: aggregated results and per-sample logs.
    written = [p.name for p in (root / "bench-trained").rglob("*.json*")]
    assert any(n.startswith("results_") for n in written) and any(n.startswith("samples_docstring_mc") for n in written)

    # The same numbers from lm_eval.simple_evaluate called directly, with the arguments mm documents.
    script = (
        "import json, sys, lm_eval\n"
        "from pipeline.evaluate.benchmarks import harness_arguments\n"
        "r = lm_eval.simple_evaluate(model='hf', model_args=harness_arguments(sys.argv[1]),\n"
        "                            tasks=[sys.argv[2]], num_fewshot=0, batch_size=16, device='cpu')\n"
        "print(json.dumps(r['results']['docstring_mc']))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(bench["trained"]), str(task)], capture_output=True,
                       text=True, cwd=REPO, env=mm_env(**OFFLINE), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    direct = json.loads(r.stdout.strip().splitlines()[-1])
    assert direct["acc,none"] == trained["docstring_mc"]["acc"]
    assert direct["acc_norm,none"] == trained["docstring_mc"]["acc_norm"]
    assert direct["acc_stderr,none"] == trained["docstring_mc"]["acc_stderr"]


def test_missing_task_data_offline_is_one_line_and_no_network(fresh, tmp_path):
    empty_home = tmp_path / "hf-home"
    empty_home.mkdir()
    # A hub endpoint that would hold any connection open: a request would show up here (and wait).
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(8)
    hub.setblocking(False)
    # No HF_*_OFFLINE in the environment: mm goes offline by itself.
    env = {k: v for k, v in mm_env(HF_HOME=str(empty_home)).items() if k not in OFFLINE}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.getsockname()[1]}"
    start = time.perf_counter()
    r = mm("eval", fresh["export"], "--tasks", "arc_easy", "--out", tmp_path / "b.json", env=env)
    seconds = time.perf_counter() - start
    assert_user_error(r, "arc_easy", "not in the local cache", "HF_DATASETS_OFFLINE=0")
    with pytest.raises(BlockingIOError):
        hub.accept()  # nothing ever connected: no network was tried, so none was waited for
    hub.close()
    assert seconds < 300, seconds  # process start, imports and the harness's task index only
    assert not (tmp_path / "b.json").exists()
    # A checkpoint instead of an export: refused before the harness is loaded.
    assert_user_error(mm("eval", fresh["ckpt"], "--tasks", "arc_easy"), "mm export")


def test_benchmarks_check_that_bos_comes_first(fresh, tmp_path):
    """The harness gets BOS only through add_bos_token: the export's tokenizer, loaded as the harness loads
    it, must put BOS first (it does with this transformers); one without a BOS token is refused in a line."""
    import shutil

    from pipeline.errors import UserError
    from pipeline.evaluate.benchmarks import check_bos_first

    check_bos_first(fresh["export"])
    broken = tmp_path / "no_bos"
    shutil.copytree(fresh["export"], broken)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        doc = json.loads((broken / name).read_text())
        doc.pop("bos_token", None)
        (broken / name).write_text(json.dumps(doc))
    with pytest.raises(UserError, match="does not put BOS"):
        check_bos_first(broken)


def test_export_chat_template_is_chatml_as_minimind_writes_it(fresh):
    """MiniMind's ChatML (its tokenizer_config.json): <|im_start|>ROLE\\nTEXT<|im_end|>\\n per message,
    a default system message when none is given; written out here by hand from that format."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fresh["export"])
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (1, 2)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2? 你好"},
                {"role": "assistant", "content": "4."}]
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2? 你好<|im_end|>\n"
                "<|im_start|>assistant\n4.<|im_end|>\n")
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    by_hand = []
    for m in messages:
        by_hand += [start] + tok(f"{m['role']}\n{m['content']}").input_ids + [end] + tok("\n").input_ids
    assert list(ids) == by_hand
    # No system message: MiniMind's default one; add_generation_prompt opens the assistant's turn.
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2+2? 你好<|im_end|>\n<|im_start|>assistant\n")
    card = (fresh["export"] / "README.md").read_text()
    assert "pretrained only" in card and "bits per byte" in card and "data sources" in card
