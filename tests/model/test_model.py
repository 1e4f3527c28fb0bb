"""The decoder (paper §2.3): architecture invariants, init, masking, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from cm3leon.config import ModelConfig, load_json, save_json
from cm3leon.model.io import load_model, save_model
from cm3leon.model.transformer import Transformer, padded_causal_mask, positions_from_valid
from cm3leon.vocab import Vocab

V = 97


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
    base.update(kw)
    return ModelConfig(vocab_size=V, **base)


def randomized(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose LM head and position table are non-zero (the paper init zeroes the head)."""
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(std=0.05)
        m.pos_emb.weight.normal_(std=0.05)
    return m


def trunc_normal_std(std: float) -> float:
    """Std of N(0, std^2) truncated at +-3 std (independent closed form)."""
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    mass = math.erf(3 / math.sqrt(2))
    return std * math.sqrt(1 - 2 * 3 * phi3 / mass)


def test_no_bias_and_parameter_free_layernorm():
    m = Transformer(tiny_cfg())
    names = [n for n, _ in m.named_parameters()]
    assert not [n for n in names if "bias" in n]
    lns = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(lns) == 2 * m.cfg.n_layers + 1  # two per block + final
    assert all(not list(ln.parameters()) for ln in lns)
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in m.modules())
    assert not list(m.buffers())  # nothing stateful in the model


def test_zero_lm_head_gives_uniform_logits():
    m = Transformer(tiny_cfg()).eval()
    ids = torch.randint(0, V, (2, 11))
    logits = m(ids)
    assert logits.shape == (2, 11, V)
    assert torch.count_nonzero(logits) == 0
    probs = logits.softmax(-1)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / V))


def test_init_statistics():
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=1, n_heads=4, max_seq_len=512)
    torch.manual_seed(0)
    m = Transformer(cfg)
    for name, p in m.named_parameters():
        if name == "lm_head.weight":
            assert torch.count_nonzero(p) == 0
            continue
        std = cfg.pos_init_std if name == "pos_emb.weight" else cfg.init_std
        assert p.abs().max() <= 3 * std + 1e-12, name
        assert abs(p.mean().item()) < 0.02 * std, name
        assert p.std().item() == pytest.approx(trunc_normal_std(std), rel=0.02), name


def test_causal_future_tokens_never_change_past_logits():
    m = randomized(tiny_cfg())
    ids = torch.randint(0, V, (3, 20))
    ref = m(ids)
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[:, t:] = torch.randint(0, V, (3, 20 - t))
        out = m(changed)
        torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
        if t < 19:
            assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :])


def test_left_padding_matches_unpadded_rows_and_stays_finite():
    m = randomized(tiny_cfg())
    lens = [9, 4, 1]
    T = max(lens)
    seqs = [torch.randint(4, V, (n,)) for n in lens]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    valid = torch.zeros(len(lens), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = s
        valid[i, T - len(s) :] = True
    out = m(ids, positions_from_valid(valid), key_valid=valid)
    assert torch.isfinite(out).all()
    for i, s in enumerate(seqs):
        alone = m(s[None])[0]
        torch.testing.assert_close(out[i, T - len(s) :], alone, atol=1e-5, rtol=0)


def test_positions_and_mask_helpers():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert positions_from_valid(valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    mask = padded_causal_mask(valid)
    assert mask.shape == (2, 1, 5, 5)
    for b in range(2):
        for q in range(5):
            for k in range(5):
                want = (k <= q and bool(valid[b, k])) or k == q
                assert bool(mask[b, 0, q, k]) == want


def test_explicit_default_positions_are_0_to_t():
    m = randomized(tiny_cfg())
    ids = torch.randint(0, V, (2, 6))
    torch.testing.assert_close(m(ids), m(ids, torch.arange(6).expand(2, 6)))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradient_checkpointing_gives_same_gradients(activation):
    cfg = tiny_cfg(activation=activation)
    ids = torch.randint(0, V, (2, 12))
    grads = []
    for ckpt in (False, True):
        m = randomized(cfg).train()
        m.gradient_checkpointing = ckpt
        m(ids).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    m = Transformer(tiny_cfg())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="Long"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="positions shape"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_num_params_matches_analytic_count():
    cfg = tiny_cfg(d_ff=80)
    m = Transformer(cfg)
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + 2 * d * 80
    assert m.num_params(non_embedding=True) == L * per_layer + V * d  # + untied LM head
    assert m.num_params() == L * per_layer + 2 * V * d + cfg.max_seq_len * d


@pytest.mark.parametrize("name,nominal", [("350m", 350e6), ("760m", 760e6), ("7b", 7e9)])
def test_paper_presets_are_near_their_names(name, nominal):
    cfg = ModelConfig.from_name(name, vocab_size=Vocab.paper().size)
    with torch.device("meta"):
        m = Transformer(cfg)
    # Analytic count, independent of the module: embeddings + positions + layers + LM head.
    d, L, F = cfg.d_model, cfg.n_layers, cfg.ffn_dim
    analytic = 2 * cfg.vocab_size * d + cfg.max_seq_len * d + L * (4 * d * d + 2 * d * F)
    assert m.num_params() == analytic
    # OPT-style names count the output matrix once (tied); ours is untied (paper §2.3).
    assert (analytic - cfg.vocab_size * d) == pytest.approx(nominal, rel=0.1)


# ---- native save / load --------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    m = randomized(tiny_cfg(activation="gelu"))
    save_model(m, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(loaded(ids), m(ids), atol=0, rtol=0)


def test_load_casts_dtype_on_request(tmp_path):
    m = randomized(tiny_cfg())
    save_model(m, tmp_path / "m")
    half = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(half.lm_head.weight.float(), m.lm_head.weight, atol=1e-3, rtol=1e-2)


def test_load_other_preset_names_key_and_shapes(tmp_path):
    save_model(randomized(tiny_cfg()), tmp_path / "m")
    other = tiny_cfg(d_ff=64)  # same config.json shape, different FFN width
    save_json(other, tmp_path / "m" / "config.json")
    msg = r"blocks\.0\.mlp\.fc1\.weight: checkpoint has shape \(128, 32\), model expects \(64, 32\)"
    with pytest.raises(ValueError, match=msg):
        load_model(tmp_path / "m")


def test_load_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    d = tmp_path / "m"
    save_model(randomized(tiny_cfg()), d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(d)


def test_load_refuses_hf_directory_and_unknown_fields(tmp_path):
    d = tmp_path / "m"
    save_model(randomized(tiny_cfg()), d)
    cfg = load_json(d / "config.json")
    save_json({**cfg, "model_type": "opt"}, d / "config.json")
    with pytest.raises(ValueError, match="import-hf"):
        load_model(d)
    save_json({**cfg, "n_experts": 2}, d / "config.json")
    with pytest.raises(ValueError, match="unknown fields"):
        load_model(d)


def test_load_config_naming_options_the_decoder_lacks(tmp_path):
    """image_rope_dims / image_rope_pairs_only / image_copy_bias load when off, are refused when on."""
    d = tmp_path / "m"
    model = randomized(tiny_cfg())
    save_model(model, d)
    cfg = load_json(d / "config.json")
    off = {"image_rope_dims": 0, "image_rope_pairs_only": False, "image_copy_bias": False}
    save_json({**cfg, **off}, d / "config.json")
    assert load_model(d).cfg == model.cfg
    for key, on in (("image_rope_dims", 16), ("image_rope_pairs_only", True), ("image_copy_bias", True)):
        save_json({**cfg, **off, key: on}, d / "config.json")
        with pytest.raises(ValueError, match=f"{key}.*options this decoder does not have"):
            load_model(d)
