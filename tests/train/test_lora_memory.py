"""The memory plan (train/memory.py): its parameter counts against real models on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import Transformer
from cm3leon.train.config import TrainConfig
from cm3leon.train.lora import LoraSpec, attach_lora, count_trainable
from cm3leon.train.memory import ModelShape, log_memory_plan, lora_params, memory_plan, memory_table
from cm3leon.train.recipes import get_recipe


def _meta_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


@pytest.mark.parametrize("preset", ["tiny", "350m", "7b"])
def test_weights_figure_is_the_real_parameter_count(preset):
    cfg = ModelConfig.from_name(preset, vocab_size=65536)
    shape = ModelShape.from_config(cfg)
    assert shape.n_params() == _meta_params(cfg)
    plan = memory_plan(shape, seq_len=4096, micro_batch=1)
    assert plan.weights == 4 * _meta_params(cfg)  # float32 master weights


def test_image_place_embeddings_are_counted():
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, image_tokens=16,
                      image_vocab=16, image_axial=True)
    assert ModelShape.from_config(cfg).n_params() == _meta_params(cfg)


def test_chameleon_7b_shape_matches_transformers_on_the_meta_device():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    with torch.device("meta"):
        hf = ChameleonForConditionalGeneration(ChameleonConfig(vocabulary_map={"<image>": 8711}))
    n = sum(p.numel() for k, p in hf.named_parameters() if ".vqmodel." not in k)  # the decoder, not the VQ-GAN
    assert ModelShape.chameleon_7b().n_params() == n == 7_013_666_816


def test_our_chameleon_family_shape_matches_its_parameter_count():
    if "family" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        pytest.skip("this ModelConfig has no chameleon family")
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, d_ff=96, n_kv_heads=2, family="chameleon",
                      activation="silu", max_seq_len=64)
    assert ModelShape.from_config(cfg).n_params() == _meta_params(cfg)


@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "k_proj", "v_proj", "o_proj"), ("mlp", "lm_head")])
def test_lora_parameter_count_is_what_peft_adds(targets):
    cfg = ModelConfig.from_name("tiny", vocab_size=300)
    spec = LoraSpec(r=8, targets=targets)
    model = attach_lora(Transformer(cfg), spec)
    assert lora_params(ModelShape.from_config(cfg), spec) == count_trainable(model)


def test_plan_for_the_paper_7b_recipe_and_chameleon_7b():
    run = get_recipe("paper-7b")
    cfg = ModelConfig.from_name(run.model, vocab_size=65536, **run.model_overrides)
    spec = LoraSpec(r=16, alpha=32, targets=("attn",))
    for shape in (ModelShape.from_config(cfg), ModelShape.chameleon_7b()):
        full = memory_plan(shape, seq_len=4096, micro_batch=1)
        full_ckpt = memory_plan(shape, seq_len=4096, micro_batch=1, activation_checkpointing=True)
        lora = memory_plan(shape, seq_len=4096, micro_batch=1, lora=spec)
        lora_ckpt = memory_plan(shape, seq_len=4096, micro_batch=1, lora=spec, activation_checkpointing=True)
        assert full.optimizer == 2 * full.weights and full.total > 110e9  # 16 bytes a parameter before activations
        assert lora.weights == pytest.approx(2 * shape.n_params(), rel=0.01)  # bf16 base
        assert lora.trainable < 0.01 * full.trainable and lora.gradients < 0.1e9
        assert full_ckpt.activations < full.activations / 3 and lora_ckpt.activations < lora.activations / 3
        assert lora.activations < full.activations and lora_ckpt.total < 20e9
        sharded = memory_plan(shape, seq_len=4096, micro_batch=1, world_size=8, fsdp=True)
        assert sharded.optimizer == pytest.approx(full.optimizer / 8)
    table = memory_table(ModelShape.chameleon_7b(), seq_len=4096, micro_batch=1, lora=spec, mark=("lora", True))
    rows = table.splitlines()
    assert len(rows) == 5 and rows[4].startswith("*LoRA + act. ckpt")


def test_the_run_logs_its_plan(caplog):
    cfg = ModelConfig.from_name("tiny", vocab_size=300)
    with caplog.at_level("INFO", logger="cm3leon.train.memory"):
        table = log_memory_plan(cfg, seq_len=64, micro_batch=2, train_cfg=TrainConfig(precision="fp32"), world_size=1,
                                lora=LoraSpec(r=4))
    assert "memory plan per rank" in caplog.text and "*LoRA " in table and "fp32" in caplog.text


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + loss (parameters excluded)."""
    from cm3leon.train.loop import lm_loss_sum

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss_sum(model(ids), ids)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["cm3leon", "chameleon"])
@pytest.mark.parametrize("targets", [None, ("attn",), ("all-linear",)])
def test_saved_activations_are_what_autograd_saves(family, targets):
    kw = dict(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, max_seq_len=256)
    if family == "chameleon":
        if "family" not in {f.name for f in dataclasses.fields(ModelConfig)}:
            pytest.skip("this ModelConfig has no chameleon family")
        kw.update(family="chameleon", activation="silu", d_ff=352)
    cfg = ModelConfig(**kw)
    spec = LoraSpec(r=8, targets=targets) if targets else None
    torch.manual_seed(0)
    model = Transformer(cfg)
    if spec:
        attach_lora(model, spec)
    got = _saved_bytes(model, torch.randint(0, 2048, (2, 128)))
    plan = memory_plan(ModelShape.from_config(cfg), seq_len=128, micro_batch=2, lora=spec, bf16=False)
    assert plan.saved == pytest.approx(got, rel=0.03)
