"""Atomic checkpoints: round trip, pruning, strict loading and clear errors for bad files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cm3leon.config import to_json_dict
from cm3leon.model.transformer import Transformer
from cm3leon.train import checkpoint as ck
from cm3leon.train.config import TrainConfig
from cm3leon.train.loop import train
from helpers import VOCAB, SynthData, one_thread, tiny_model_config


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _optimizer_with_state():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randint(0, VOCAB.size, (2, 8))).square().mean().backward()
        opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _optimizer_with_state()
    osd = get_optimizer_state_dict(model, opt)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = ck.save_checkpoint(tmp_path, 12, model_state=model.state_dict(), optimizer_state=osd,
                              state={"consumed_samples": 96, "model_config": to_json_dict(model.cfg)})
    expect = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    got = ck.load_checkpoint(path)
    assert got.step == 12 and got.state["consumed_samples"] == 96
    for k, v in model.state_dict().items():
        assert torch.equal(got.model[k], v)
    for name, st in osd["state"].items():
        for key, t in st.items():
            assert torch.equal(got.optimizer["state"][name][key], t), (name, key)
    assert got.optimizer["param_groups"][0]["betas"] == osd["param_groups"][0]["betas"]
    ck.restore_rng(got.state["rng"], got.rng_tensors)
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(3), expect[2])


def test_keep_last_prunes_and_temp_dirs_are_never_picked(tmp_path):
    sd = {"w": torch.ones(2)}
    osd = {"state": {}, "param_groups": []}
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model_state=sd, optimizer_state=osd, state={}, keep_last=2)
    (tmp_path / ".tmp-step-00000009-123").mkdir()  # a crashed save
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert ck.latest_checkpoint(tmp_path).name == "step-00000004"
    ck.save_checkpoint(tmp_path, 4, model_state={"w": torch.zeros(2)}, optimizer_state=osd, state={}, keep_last=2)
    assert torch.equal(ck.load_checkpoint(tmp_path / "step-00000004").model["w"], torch.zeros(2))


def _run(tmp_path, **kw):
    tc = TrainConfig(steps=4, batch_size=2, log_every=1, ckpt_every=2, keep_last=5, unigram_samples=4)
    return train(tiny_model_config(**kw), tc, SynthData(n=8), tmp_path / "run", vocab=VOCAB, until_step=2,
                 progress=False)


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_truncated_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path):
    _run(tmp_path)
    f = tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = _snapshot(tmp_path / "run")
    tc = TrainConfig(steps=4, batch_size=2, log_every=1, ckpt_every=2, unigram_samples=4)
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt; start a new run"):
        train(tiny_model_config(), tc, SynthData(n=8), tmp_path / "run", vocab=VOCAB, resume=True, progress=False)
    assert _snapshot(tmp_path / "run") == before


def test_broken_state_json_is_refused(tmp_path):
    _run(tmp_path)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").write_text('{"step": 2')
    with pytest.raises(ValueError, match="state.json is not valid JSON"):
        ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")


def test_checkpoint_from_another_model_names_the_difference(tmp_path):
    _run(tmp_path)
    before = _snapshot(tmp_path / "run")
    tc = TrainConfig(steps=4, batch_size=2, log_every=1, ckpt_every=2, unigram_samples=4)
    with pytest.raises(ValueError, match=r"different model \(d_model: checkpoint 32 vs run 64"):
        train(tiny_model_config(d_model=64), tc, SynthData(n=8), tmp_path / "run", vocab=VOCAB, resume=True,
              progress=False)
    assert _snapshot(tmp_path / "run") == before


def test_checkpoint_from_before_a_config_field_existed_resumes(tmp_path):
    """A checkpoint written before a ModelConfig field was added does not name it: it had the
    default, so the same model resumes (and a run that sets the field is still refused)."""
    _run(tmp_path)
    got = ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")
    del got.state["model_config"]["image_axial"]
    model = Transformer(tiny_model_config())
    ck.check_model_compat(got, to_json_dict(model.cfg), model.state_dict())
    with pytest.raises(ValueError, match="image_axial: checkpoint False vs run True"):
        ck.check_model_compat(got, {**to_json_dict(model.cfg), "image_axial": True}, model.state_dict())


def test_checkpoint_naming_options_the_decoder_lacks(tmp_path):
    """A checkpoint's model_config may name image_rope_dims / image_rope_pairs_only /
    image_copy_bias: it resumes when they are off and is refused when one is on."""
    _run(tmp_path)
    got = ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")
    model = Transformer(tiny_model_config())
    off = {"image_rope_dims": 0, "image_rope_pairs_only": False, "image_copy_bias": False}
    got.state["model_config"].update(off)
    ck.check_model_compat(got, to_json_dict(model.cfg), model.state_dict())
    got.state["model_config"]["image_rope_dims"] = 4
    with pytest.raises(ValueError, match="image_rope_dims.*options this decoder does not have"):
        ck.check_model_compat(got, to_json_dict(model.cfg), model.state_dict())


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    _run(tmp_path)
    got = ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")
    got.model["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    model = Transformer(tiny_model_config())
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight: checkpoint has shape \(3, 3\), model expects "
                                         r"\(128, 32\)"):
        ck.check_model_compat(got, to_json_dict(model.cfg), model.state_dict())


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a cm3leon training checkpoint"):
        ck.load_checkpoint(tmp_path / "step-00000001")
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing")
