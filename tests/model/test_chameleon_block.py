"""The chameleon family inside our Transformer, without transformers: configs, left-padded batches
through the KV cache, activation checkpointing, and bf16 conversion."""

from __future__ import annotations

import pytest
import torch
from chameleon_fixtures import build_checkpoint
from safetensors import safe_open

from cm3leon.config import ConfigError, ModelConfig
from cm3leon.model.io import load_model, weight_files
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer


def tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, activation="silu",
                       init_std=0.2, family="chameleon", **kw)


def test_configs_without_the_field_are_the_paper_family():
    cfg = ModelConfig.from_dict({"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 4})
    assert cfg.family == "cm3leon" and hasattr(Transformer(cfg), "pos_emb")
    with pytest.raises(ConfigError, match="chameleon family"):
        ModelConfig(vocab_size=50, d_model=32, n_heads=4, swin_norm=True)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        tiny(n_kv_heads=3)
    assert not hasattr(Transformer(tiny()), "pos_emb")


@pytest.mark.parametrize("swin", [False, True])
def test_left_padded_rows_decode_as_alone(swin):
    torch.manual_seed(0)
    model = Transformer(tiny(swin_norm=swin, n_kv_heads=2)).eval()
    long, short = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 5))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    nxt = torch.randint(0, 50, (2, 1))
    with torch.no_grad():
        cache = KVCache.allocate(model.cfg, 2, 10)
        first = prefill(model, ids, valid, cache)[:, -1]
        second = decode_one_token(model, nxt, cache)
        alone = model(torch.cat([short, nxt[1:]], 1))
    torch.testing.assert_close(first[1], alone[0, -2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[1], alone[0, -1], rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    ids = torch.randint(0, 50, (2, 12))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_checkpoint_stays_bf16(tmp_path, one_torch_thread):
    from cm3leon.convert import convert_chameleon

    hf = build_checkpoint(tmp_path / "hf", shard_size=None)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")  # weights in bf16, tokenizer and VQ-GAN as before
    out = convert_chameleon(tmp_path / "hf", tmp_path / "ours")
    with safe_open(str(weight_files(out)[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[0, 40, 41, 42, 21, 5, 6]])
    with torch.no_grad():
        want = hf.lm_head(hf.model(input_ids=ids).last_hidden_state).float()
        got = model(ids).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
