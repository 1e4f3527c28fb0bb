"""LoRA adapters (train/lora.py): target names across families, frozen base, merge, save/load, training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cm3leon.config import ConfigError, save_json
from cm3leon.model.io import load_model, save_model
from cm3leon.model.transformer import Transformer
from cm3leon.safetensors_io import read_safetensors
from cm3leon.train.config import TrainConfig
from cm3leon.train.loop import build_optimizer, collate, evaluate, lm_loss_sum, train
from cm3leon.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSpec,
    adapter_file_state,
    attach_lora,
    load_adapter_state,
    merge_adapter,
    merged_state,
    read_adapter,
    resolve_targets,
    save_adapter,
)
from cm3leon.train.parallelize import DistContext
from helpers import VOCAB, SynthData, one_thread, tiny_model_config

CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _base(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(tiny_model_config())
    with torch.no_grad():  # the zero-initialised LM head would hide the adapters' effect on the logits
        m.lm_head.weight.normal_(0.0, 0.02)
    return m


def _randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _chameleon_config():
    if "family" not in {f.name for f in dataclasses.fields(type(tiny_model_config()))}:
        pytest.skip("this ModelConfig has no chameleon family")
    return tiny_model_config(family="chameleon", activation="silu", d_ff=48, n_kv_heads=2)


# ---- spec and targets -------------------------------------------------------------------

def test_parse_spec():
    s = LoraSpec.parse("r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj,dropout=0.05")
    assert (s.r, s.alpha, s.dropout, s.scale) == (16, 32.0, 0.05, 2.0)
    assert s.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert LoraSpec.parse("r=4,targets=qkv+out,base=bf16").targets == ("qkv", "out")
    assert LoraSpec.parse("r=4").targets == ("all-linear",)
    assert LoraSpec.from_dict(s.to_dict()) == s
    for bad, msg in (("r=0", "r must be"), ("r=4,size=3", "unknown key 'size'"), ("r=x", "not a number"),
                     ("q_proj,r=4", "not key=value"), ("r=4,base=fp16", "base_dtype")):
        with pytest.raises((ValueError, ConfigError), match=msg):
            LoraSpec.parse(bad)


def test_targets_resolve_across_families():
    m = _base()
    assert resolve_targets(m, ["all-linear"]) == ("fc1", "fc2", "out", "qkv")  # the output head only when named
    assert resolve_targets(m, ["q_proj", "k_proj", "v_proj", "o_proj"]) == ("out", "qkv")
    assert resolve_targets(m, ["attn"]) == ("out", "qkv")
    assert resolve_targets(m, ["gate_proj", "up_proj", "down_proj"]) == ("fc1", "fc2")
    assert resolve_targets(m, ["lm_head", "mlp"]) == ("fc1", "fc2", "lm_head")
    with pytest.raises(ValueError, match="fused Linear 'qkv'"):
        resolve_targets(m, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="no Linear module of this model; it has: fc1, fc2, lm_head, out, qkv"):
        resolve_targets(m, ["wq"])


def test_targets_on_the_chameleon_block():
    m = Transformer(_chameleon_config())
    assert resolve_targets(m, ["qkv", "out"]) == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert resolve_targets(m, ["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert resolve_targets(m, ["mlp"]) == ("down_proj", "gate_proj", "up_proj")
    attach_lora(m, LoraSpec(r=2, targets=("q_proj", "v_proj", "o_proj")))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj", "o_proj"}


# ---- frozen base, training -------------------------------------------------------------

def test_adapter_only_training_reduces_sft_loss_and_leaves_every_base_parameter_bit_identical():
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, LoraSpec(r=4, alpha=8, targets=("all-linear", "lm_head")))
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(before)  # every base parameter is frozen, only adapters train
    cfg = TrainConfig(steps=30, lr=1e-2, weight_decay=0.1, warmup_steps=0)
    optim = build_optimizer(model, cfg, torch.device("cpu"))
    data = SynthData(n=16)
    batch = collate([data[i] for i in range(16)], VOCAB.pad_id)
    losses = []
    for _ in range(cfg.steps):
        ls = lm_loss_sum(model(batch["ids"]), batch["labels"]) / (batch["labels"] != -100).sum()
        ls.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(ls.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in frozen.items():
        key = n.replace(".base_layer.", ".")
        assert torch.equal(p, before[key]), f"{key} changed"
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_bf16_base_keeps_float32_adapters():
    model = attach_lora(_base(), LoraSpec(r=2, targets=("qkv",)), base_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    ids = SynthData()[0]["ids"][None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm_loss_sum(model(ids), ids).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# ---- merge, save / load ----------------------------------------------------------------

def test_merged_model_equals_base_plus_adapters():
    spec = LoraSpec(r=4, alpha=12, targets=("all-linear", "lm_head"))
    base_state = {k: v.clone() for k, v in _base().state_dict().items()}
    model = attach_lora(_base(), spec)
    _randomize_adapters(model)
    ids = torch.stack([SynthData()[i]["ids"] for i in range(3)])
    with torch.no_grad():
        want = model.eval()(ids)
    adapter = adapter_file_state(model.state_dict())
    merged = merged_state(base_state, adapter, spec.scale)
    a = adapter["base_model.model.blocks.1.attn.qkv.lora_A.weight"]
    b = adapter["base_model.model.blocks.1.attn.qkv.lora_B.weight"]
    torch.testing.assert_close(merged["blocks.1.attn.qkv.weight"], base_state["blocks.1.attn.qkv.weight"] + 3.0 * b @ a,
                               rtol=0, atol=1e-6)
    assert torch.equal(merged["tok_emb.weight"], base_state["tok_emb.weight"])  # untargeted: untouched
    plain = Transformer(tiny_model_config())
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        got = plain.eval()(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # peft's own merge gives the same weights
    from peft.tuners.lora import LoraLayer

    layer = model.blocks[1].attn.qkv
    assert isinstance(layer, LoraLayer)
    layer.merge()
    torch.testing.assert_close(layer.get_base_layer().weight, merged["blocks.1.attn.qkv.weight"], rtol=0, atol=1e-6)


def test_adapter_directory_round_trip_through_safetensors(tmp_path):
    spec = LoraSpec(r=3, alpha=6, targets=("q_proj", "k_proj", "v_proj", "fc2"), dropout=0.05)
    model = attach_lora(_base(), spec)
    _randomize_adapters(model)
    state = adapter_file_state(model.state_dict())
    save_adapter(tmp_path / "ad", state, spec, ("fc2", "qkv"), model_config=model.cfg, vocab=VOCAB,
                 base_dir=tmp_path / "base")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.json",
                                                             "vocab.json"}
    spec2, targets, loaded, cfg = read_adapter(tmp_path / "ad")
    assert targets == ("fc2", "qkv") and (spec2.r, spec2.alpha, spec2.dropout) == (3, 6.0, 0.05)
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    other = attach_lora(_base(), spec2)
    load_adapter_state(other, loaded, source="test")
    ids = SynthData()[0]["ids"][None]
    with torch.no_grad():
        assert torch.equal(other.eval()(ids), model.eval()(ids))
    # peft reads the directory as its own adapter
    from peft import PeftConfig, PeftModel

    assert PeftConfig.from_pretrained(str(tmp_path / "ad")).r == 3
    wrapped = PeftModel.from_pretrained(_base(), str(tmp_path / "ad"))
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(ids), model(ids), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit this model's adapters"):
        load_adapter_state(attach_lora(_base(), LoraSpec(r=2, targets=("fc2", "qkv"))), loaded, source="x.safetensors")


# ---- through the training loop -----------------------------------------------------------

def _base_dir(tmp_path):
    d = tmp_path / "base"
    save_model(_base(), d)
    save_json(VOCAB.to_dict(), d / "vocab.json")
    return d


def test_lora_run_trains_adapters_resumes_exactly_and_merges(tmp_path):
    base = _base_dir(tmp_path)
    spec = LoraSpec(r=4, alpha=8, targets=("attn", "mlp"))
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=3, eval_batches=2,
                      unigram_samples=8, precision="fp32")  # the merged model is scored in fp32
    kw = dict(vocab=VOCAB, val_data=SynthData(n=8, seed=3), init_from=base, progress=False, lora=spec)
    res = train(tiny_model_config(), cfg, SynthData(), tmp_path / "run", **kw)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert losses[-1] < losses[0], losses
    assert res.model_dir == tmp_path / "run" / "adapter" and (res.model_dir / ADAPTER_WEIGHTS).exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    ckpt = read_safetensors(tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors")
    assert ckpt and all(".lora_" in k for k in ckpt)  # checkpoints carry the adapters, not the base

    # interrupted at step 3 and resumed: the same losses
    train(tiny_model_config(), cfg, SynthData(), tmp_path / "part", until_step=3, **kw)
    resumed = train(tiny_model_config(), cfg, SynthData(), tmp_path / "part", resume=True, **kw)
    assert [resumed.losses[s] for s in sorted(resumed.losses)] == losses[3:]
    with pytest.raises(ValueError, match="resume with the same --lora"):
        train(tiny_model_config(), cfg, SynthData(), tmp_path / "part", resume=True,
              **{**kw, "lora": dataclasses.replace(spec, alpha=4.0)})

    # the merged model scores the validation data exactly as the trained base + adapters did
    merged = merge_adapter(res.model_dir, tmp_path / "merged")
    assert json.loads((merged / "vocab.json").read_text()) == VOCAB.to_dict()
    val = evaluate(load_model(merged), SynthData(n=8, seed=3), VOCAB, batch_size=8, n_batches=2, ctx=CPU)
    assert val["loss"] == pytest.approx(res.val["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="not empty"):
        merge_adapter(res.model_dir, tmp_path / "merged")


def test_merge_on_the_chameleon_block_equals_base_plus_adapters():
    cfg = _chameleon_config()
    torch.manual_seed(0)
    base = Transformer(cfg)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    spec = LoraSpec(r=2, alpha=4, targets=("all-linear",))
    model = attach_lora(base, spec)
    _randomize_adapters(model)
    ids = torch.stack([SynthData()[i]["ids"] for i in range(2)])
    with torch.no_grad():
        want = model.eval()(ids)
        plain = Transformer(cfg)
        plain.load_state_dict(merged_state(base_state, adapter_file_state(model.state_dict()), spec.scale))
        torch.testing.assert_close(plain.eval()(ids), want, rtol=1e-4, atol=1e-5)


def test_a_sharded_bf16_base_trains_and_merges_shard_by_shard(tmp_path):
    from cm3leon.model.io import WEIGHTS_INDEX_NAME, write_index
    from cm3leon.safetensors_io import write_safetensors

    single = _base_dir(tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in read_safetensors(single / "model.safetensors").items()}
    write_safetensors(state, single / "model.safetensors", what="test weights")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json", "vocab.json"):
        (sharded / f).write_bytes((single / f).read_bytes())
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        write_safetensors({k: state[k] for k in keys}, sharded / file, what="test shard")
    write_index(sharded, {k: file for file, keys in parts.items() for k in keys})

    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=0, eval_batches=1,
                      unigram_samples=4)
    res = train(tiny_model_config(), cfg, SynthData(n=8), tmp_path / "run", vocab=VOCAB, init_from=sharded,
                progress=False, lora=LoraSpec(r=2, targets=("attn", "mlp")))
    a = merge_adapter(res.model_dir, tmp_path / "from-shards")
    b = merge_adapter(res.model_dir, tmp_path / "from-one-file", base_dir=single)
    assert sorted(p.name for p in a.iterdir()) == sorted([*parts, WEIGHTS_INDEX_NAME, "config.json", "vocab.json"])
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sa.values())
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"])
