"""Config values are checked for type and range where they are read: model config.json,
run configs and ``--override`` edits. Each problem is one message naming the field, the
value and what is allowed; all problems come in one ValueError, never a TypeError."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3leon.config import ConfigError, ModelConfig
from cm3leon.model.io import load_model, save_model
from cm3leon.model.transformer import Transformer
from cm3leon.train.config import DataConfig, RunConfig, TrainConfig
from cm3leon.train.recipes import get_recipe

MODEL = {"vocab_size": 200, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128,
         "image_tokens": 64, "image_vocab": 16, "image_axial": True}


@pytest.mark.parametrize("field, value, message", [
    ("d_model", "sixty-four", "d_model must be a whole number >= 1 (got 'sixty-four')"),
    ("n_heads", 4.0, "n_heads must be a whole number >= 1 (got 4.0)"),
    ("n_layers", -1, "n_layers must be a whole number >= 1 (got -1)"),
    ("n_layers", True, "n_layers must be a whole number >= 1 (got True)"),
    ("d_ff", 0, "d_ff must be a whole number >= 1 or null (got 0)"),
    ("activation", "tanh", "activation must be one of ['relu', 'gelu', 'silu'] (got 'tanh')"),
    ("init_std", float("nan"), "init_std must be a finite number >= 0 (got nan)"),
    ("image_axial", 1, "image_axial must be true or false (got 1)"),
    ("image_tokens", -4, "image_tokens must be a whole number >= 0 (got -4)"),
])
def test_model_config_field_errors(field, value, message):
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict({**MODEL, field: value})
    assert str(info.value) == f"invalid ModelConfig: {message}"


def test_model_config_collects_every_problem_and_names_missing_fields():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({**MODEL, "d_model": "sixty-four", "n_heads": 4.0, "n_layers": -1})
    assert [p.split(" ")[0] for p in info.value.problems] == ["d_model", "n_layers", "n_heads"]
    with pytest.raises(ValueError, match=r"ModelConfig: missing required fields \['vocab_size'\]"):
        ModelConfig.from_dict({"d_model": 64})
    with pytest.raises(ValueError, match="a model config must be a JSON object, got array"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_model=64 is not divisible by n_heads=3"):
        ModelConfig.from_dict({**MODEL, "n_heads": 3})


def test_model_directory_with_a_bad_config_names_the_file_and_field(tmp_path):
    d = tmp_path / "m"
    save_model(Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)), d)
    cfg = json.loads((d / "config.json").read_text())
    for field, value, shown in (("d_model", "sixty-four", "'sixty-four'"), ("n_heads", 4.0, "4.0"),
                                ("n_layers", -1, "-1")):
        (d / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ValueError) as info:
            load_model(d)
        assert str(info.value) == (f"invalid model config {d / 'config.json'}: {field} must be a whole number "
                                   f">= 1 (got {shown})")


@pytest.mark.parametrize("override, message", [
    ("lr=inf", "train.lr must be a positive finite number (got 'inf')"),
    ("lr=nan", "train.lr must be a positive finite number (got 'nan')"),
    ("lr=Infinity", "train.lr must be a positive finite number (got inf)"),
    ("lr=NaN", "train.lr must be a positive finite number (got nan)"),
    ("lr=-1", "train.lr must be a positive finite number (got -1)"),
    ('steps="ten"', "train.steps must be a whole number >= 1 (got 'ten')"),
    ("steps=10.5", "train.steps must be a whole number >= 1 (got 10.5)"),
    ("batch_size=0", "train.batch_size must be a whole number >= 1 or null (got 0)"),
    ("compile=yes", "train.compile must be true or false (got 'yes')"),
    ("betas=[0.9]", "train.betas must be two numbers in [0, 1) (got (0.9,))"),
    ("seed=-1", "train.seed must be a whole number in 0..4294967295 (got -1)"),
    ("data.seq_len=0", "data.seq_len must be a whole number >= 1 (got 0)"),
    ("data.options=3", "data.options must be an object of dataset options (got 3)"),
    ('model_overrides.d_model="sixty-four"', "model_overrides.d_model must be a whole number >= 1 (got 'sixty-four')"),
    ("model_overrides.n_heads=4.0", "model_overrides.n_heads must be a whole number >= 1 (got 4.0)"),
    ("model_overrides.n_layers=-1", "model_overrides.n_layers must be a whole number >= 1 (got -1)"),
    ("model_overrides.vocab_size=9", "model_overrides.vocab_size cannot be set: it is the data's vocabulary size"),
    ("model_overrides=3", "model_overrides must be an object of ModelConfig fields (got number)"),
    ("train=5", "train: TrainConfig: expected a JSON object with its fields, got number"),
])
def test_override_errors(override, message):
    with pytest.raises(ValueError) as info:
        get_recipe("smoke").with_overrides([override])
    assert str(info.value) == f"invalid run config: {message}"


def test_run_config_collects_every_problem_into_one_error():
    with pytest.raises(ConfigError) as info:
        get_recipe("smoke").with_overrides(["lr=nan", "steps=ten", "batch_size=0", "data.seq_len=0",
                                            "model_overrides.n_heads=4.0"])
    assert [p.split(" ")[0] for p in info.value.problems] == [
        "model_overrides.n_heads", "train.steps", "train.batch_size", "train.lr", "data.seq_len"]


def test_direct_construction_is_checked_too():
    with pytest.raises(ValueError, match=r"invalid TrainConfig: lr must be a positive finite number \(got inf\)"):
        TrainConfig(lr=math.inf)
    with pytest.raises(ValueError, match=r"invalid DataConfig: data.kind must be one of \['pretrain', 'sft'\]"):
        DataConfig(train="x", kind="rlhf")
    with pytest.raises(ValueError, match="unknown model preset"):
        RunConfig("x", ["tiny"], TrainConfig(), DataConfig(train="x"))  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzz: random JSON values per field

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
MODEL_FIELDS = sorted({"vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "activation",
                       "init_std", "pos_init_std", "image_tokens", "image_vocab", "image_axial", "image_rope_dims"})
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(build: Any, d: Any, names: list[str]) -> None:
    try:
        build(d)
    except ValueError as e:
        assert any(n in str(e) or repr(n) in str(e) for n in names), f"{e} names none of {names}"


@FUZZ
@given(st.dictionaries(st.sampled_from(MODEL_FIELDS) | st.text(max_size=6), JSON, min_size=1, max_size=3))
def test_fuzz_model_config(edits):
    _check(ModelConfig.from_dict, {**MODEL, **edits}, list(edits))


RUN = get_recipe("smoke").to_dict()
SECTIONS = {"train": sorted(RUN["train"]), "data": sorted(RUN["data"]), "": sorted(RUN),
            "model_overrides": MODEL_FIELDS}


@FUZZ
@given(st.lists(st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda s: st.tuples(st.just(s), st.sampled_from(SECTIONS[s]), JSON)), min_size=1, max_size=3))
def test_fuzz_run_config(edits):
    d = json.loads(json.dumps(RUN))
    names = []
    for section, field, value in edits:
        target = d if not section else d[section] if isinstance(d.get(section), dict) else None
        if target is None:
            continue
        target[field] = value
        names.append(field)
    if names:
        _check(RunConfig.from_dict, d, names)


@FUZZ
@given(st.sampled_from(sorted(RUN["train"])), st.text(max_size=8))
def test_fuzz_overrides(field, raw):
    _check(lambda edits: get_recipe("smoke").with_overrides(edits), [f"{field}={raw}"], [field])


def test_a_valid_model_config_still_builds_a_model():
    cfg = ModelConfig.from_dict(MODEL)
    assert Transformer(cfg)(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 200)
