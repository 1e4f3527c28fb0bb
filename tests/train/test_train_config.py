"""TrainConfig validation, schedule, batch plans; RunConfig JSON/overrides; recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cm3leon.config import MODEL_PRESETS
from cm3leon.train.config import DataConfig, RunConfig, TrainConfig
from cm3leon.train.recipes import RECIPES, get_recipe

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


def test_warmup_then_linear_decay_to_min_lr():
    c = TrainConfig(steps=110, lr=1.0, warmup_steps=10, decay="linear", min_lr_ratio=0.1)
    assert [c.lr_at(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert c.lr_at(10) == pytest.approx(1.0)
    assert c.lr_at(60) == pytest.approx(1.0 - 0.9 * 0.5)
    assert c.lr_at(110) == pytest.approx(0.1) and c.lr_at(500) == pytest.approx(0.1)


def test_cosine_and_constant_schedules():
    c = TrainConfig(steps=100, lr=2.0, warmup_steps=0, decay="cosine", min_lr_ratio=0.0)
    for s in (0, 13, 50, 77, 100):
        assert c.lr_at(s) == pytest.approx(0.5 * 2.0 * (1 + math.cos(math.pi * s / 100)))
    k = TrainConfig(steps=100, lr=2.0, warmup_steps=5, decay="constant")
    assert k.lr_at(2) == pytest.approx(2.0 * 3 / 5) and k.lr_at(99) == 2.0


def test_batch_plan_from_sequences_and_tokens():
    p = TrainConfig(batch_size=32, micro_batch_size=4).batch_plan(seq_len=128, world_size=2)
    assert (p.global_batch, p.micro_batch, p.grad_accum, p.tokens_per_step) == (32, 4, 4, 32 * 128)
    q = TrainConfig(batch_size=None, global_batch_tokens=8 * 2**20, micro_batch_size=8).batch_plan(4096, 256)
    assert (q.global_batch, q.grad_accum) == (2048, 1)  # paper Table 3: 8M tokens = 2048 x 4096
    r = TrainConfig(batch_size=None, global_batch_tokens=1000).batch_plan(seq_len=300)
    assert r.global_batch == 4  # rounded up to whole sequences
    with pytest.raises(ValueError, match="divisible by 3"):
        TrainConfig(batch_size=8).batch_plan(16, world_size=3)
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(batch_size=8, micro_batch_size=3).batch_plan(16)


@pytest.mark.parametrize("bad, msg", [
    (dict(steps=0), "steps"), (dict(lr=float("nan")), "lr"), (dict(decay="step"), "decay"),
    (dict(dist="deepspeed"), "dist"), (dict(batch_size=None), "exactly one"),
    (dict(global_batch_tokens=100), "exactly one"), (dict(betas=(0.9, 1.5)), "betas"),
    (dict(precision="fp16"), "precision"), (dict(min_lr_ratio=2.0), "min_lr_ratio"),
])
def test_train_config_rejects_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**bad)


def test_run_config_json_round_trip_and_unknown_fields():
    for name in RECIPES:
        r = get_recipe(name)
        assert RunConfig.from_dict(json.loads(r.to_json())) == r
    d = get_recipe("smoke").to_dict()
    d["train"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="learning_rate"):
        RunConfig.from_dict(d)
    d = get_recipe("smoke").to_dict()
    d["optimizer"] = {}
    with pytest.raises(ValueError, match="optimizer"):
        RunConfig.from_dict(d)
    d = get_recipe("smoke").to_dict()
    d["model"] = "13b"
    with pytest.raises(ValueError, match="unknown model preset '13b'"):
        RunConfig.from_dict(d)


def test_overrides():
    r = get_recipe("smoke").with_overrides(
        ["lr=1e-4", "train.dist=ddp", "data.val=null", "data.train=/x", "model_overrides.d_model=128",
         "data.options.n_retrieved=0", "betas=[0.8,0.9]"])
    assert r.train.lr == 1e-4 and r.train.dist == "ddp" and r.data.val is None and r.data.train == "/x"
    assert r.model_overrides["d_model"] == 128 and r.data.options["n_retrieved"] == 0
    assert r.train.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="unknown field 'lrr'"):
        get_recipe("smoke").with_overrides(["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        get_recipe("smoke").with_overrides(["lr"])
    with pytest.raises(ValueError, match="decay"):
        get_recipe("smoke").with_overrides(["decay=exp"])


def test_resolve_paths(tmp_path):
    r = RunConfig("x", "tiny", TrainConfig(), DataConfig(train="shards/a", val="/abs/v"), init_from="pre")
    got = r.resolve_paths(tmp_path)
    assert got.data.train == str(tmp_path.resolve() / "shards/a") and got.data.val == "/abs/v"
    assert got.init_from == str(tmp_path.resolve() / "pre")


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*smoke"):
        get_recipe("nope")


def test_recipe_files_match_the_registry():
    """recipes/*.json are the registry's configs written out (regenerate with --print-config)."""
    files = {p.stem for p in RECIPE_DIR.glob("*.json")}
    assert files == set(RECIPES)
    for name in RECIPES:
        assert RunConfig.from_json_file(RECIPE_DIR / f"{name}.json") == get_recipe(name), name


@pytest.mark.parametrize("name, preset, lr, tokens", [
    ("paper-350m", "350m", 6e-4, 1.4e12), ("paper-760m", "760m", 5e-4, 1.9e12), ("paper-7b", "7b", 1.2e-4, 2.4e12),
])
def test_paper_recipes_follow_table_3(name, preset, lr, tokens):
    r = get_recipe(name)
    t = r.train
    assert r.model == preset and r.data.seq_len == 4096 == MODEL_PRESETS[preset]["max_seq_len"]
    assert t.lr == lr and t.warmup_steps == 1500 and t.betas == (0.9, 0.95)
    plan = t.batch_plan(r.data.seq_len, world_size=256 if preset != "7b" else 512)
    assert plan.tokens_per_step == 8 * 2**20
    assert t.steps * plan.tokens_per_step == pytest.approx(tokens, rel=1e-4)


def test_sft_recipe_follows_table_4():
    t = get_recipe("sft-paper-7b").train
    assert t.lr == 5e-5 and t.warmup_steps == 150
    assert t.batch_plan(4096, 128).tokens_per_step == 2 * 2**20
    assert t.steps * 2 * 2**20 == pytest.approx(30e9, rel=1e-4)


def test_auto_precision_trains_in_bf16_where_the_device_multiplies_in_bf16(monkeypatch):
    import torch

    from cm3leon.train import config as train_config

    cfg = TrainConfig(steps=1, batch_size=1)
    assert cfg.uses_bf16("cuda")
    assert not TrainConfig(steps=1, batch_size=1, precision="fp32").uses_bf16("cuda")
    assert TrainConfig(steps=1, batch_size=1, precision="bf16").uses_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cfg.uses_bf16("cpu") and train_config.cpu_has_bf16_matmul()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cfg.uses_bf16("cpu")
    assert not cfg.uses_bf16("mps")
