"""params.yaml and its loader: every key listed, closed sets and ranges checked on load, errors say where."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import REPO, assert_user_error, mm

from pipeline.errors import UserError
from pipeline.params import Params, check_params, load_params


def test_params_yaml_lists_every_key_with_its_code_default():
    """So editing any default in params.yaml is what changes it, and DVC sees the change."""
    listed = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params()
    for section in dataclasses.fields(defaults):
        values = getattr(defaults, section.name)
        for key in dataclasses.fields(values):
            if key.name == "overrides":  # model.<field> overrides the preset; none by default
                continue
            assert key.name in listed[section.name], f"{section.name}.{key.name} is not in params.yaml"
            assert listed[section.name][key.name] == getattr(values, key.name), f"{section.name}.{key.name}"


@pytest.mark.parametrize("override, words", [
    ("train.parallel=dpp", ["--set", "train.parallel", "ddp, fsdp", "dpp"]),
    ("train.dtype=bf32", ["train.dtype", "auto, bf16, fp16, fp32"]),
    ("export.dtype=int8", ["export.dtype", "int8"]),
    ("train.nonfinite=ignore", ["train.nonfinite", "skip, abort"]),
    ("train.min_lr=0.1", ["train.min_lr", "0.1"]),
    ("train.lr=0", ["train.lr", "positive"]),
    ("train.keep_last=0", ["train.keep_last", "at least 1"]),
    ("eval.batch_size=0", ["eval.batch_size"]),
    ("data.val_fraction=1.5", ["data.val_fraction", "1.5"]),
])
def test_closed_sets_and_ranges_are_checked_on_load(override, words):
    with pytest.raises(UserError) as e:
        load_params(None, [override])
    for word in words:
        assert word in str(e.value), str(e.value)


def test_range_error_names_the_file_it_came_from(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  beta2: 1.5\n")
    with pytest.raises(UserError, match=r"p\.yaml: train\.beta2 must be in \[0, 1\), got 1\.5"):
        load_params(path)
    assert load_params(path, ["train.beta2=0.99"]).train.beta2 == 0.99  # a --set fixes it


def test_params_built_in_code_are_checked_too():
    params = Params()
    params.train.micro_batch_size = 0
    with pytest.raises(UserError, match="train.micro_batch_size must be at least 1"):
        check_params(params)


def test_global_batch_is_computed_in_one_place():
    tp = load_params(None, ["train.micro_batch_size=3", "train.accumulation_steps=5"]).train
    assert tp.rank_batch == 15 and tp.global_batch(4) == 60


def test_dry_run_sees_the_checks(tmp_path):
    r = mm("train", "--dry-run", "--procs", "2", "--set", "train.warmup_steps=-1", cwd=tmp_path)
    assert_user_error(r, "--set", "train.warmup_steps must not be negative")


@pytest.mark.parametrize("phases, words", [
    ("[{until: 1.5, weights: {sample: 1}}]", ["p.yaml: data.phases[0].until", "1.5"]),
    ("[{until: 0.8, weights: {web: 1}}]", ["data.phases[0].weights.web", "not a source of data.sources"]),
    ("[{until: 0.8, weights: {sample: 0}}]", ["data.phases[0].weights", "all 0"]),
    ("[{until: 0.8, weights: {sample: 1}}, {until: 0.5, weights: {sample: 2}}]", ["data.phases[1].until", "after"]),
    ("[{until: 0.8}]", ["data.phases[0]", "until and weights"]),
    ("{until: 0.8}", ["data.phases", "list"]),
])
def test_data_phases_are_checked_naming_the_phase(tmp_path, phases, words):
    path = tmp_path / "p.yaml"
    path.write_text(f"data:\n  phases: {phases}\n")
    with pytest.raises(UserError) as e:
        load_params(path)
    for word in words:
        assert word in str(e.value), str(e.value)
    good = "[{until: 0.8, weights: {sample: 0.9}}, {until: 1.0, weights: {sample: 1}}]"
    path.write_text(f"data:\n  phases: {good}\n")
    assert load_params(path).data.phases[1] == {"until": 1.0, "weights": {"sample": 1}}
