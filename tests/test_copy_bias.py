"""The image copy bias (ModelConfig.image_copy_bias): which pairs it links, that the model's
attention equals a hand-written one with the bias, and that it starts as a no-op."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import Transformer, copy_pairs, image_index

FIRST_IMAGE = 60  # vocab 70, image_vocab 10: ids 60..69 are image ids


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=70, d_model=32, n_layers=2, n_heads=4, max_seq_len=40, image_tokens=4, image_vocab=10,
                image_copy_bias=True)
    return ModelConfig(**{**base, **kw})


def test_copy_pairs_link_the_next_place_in_other_images():
    # text, image A (places 0..3), text, image B (places 0..2 so far)
    ids = torch.tensor([[1, 60, 61, 62, 63, 2, 64, 65, 66]])
    places = image_index(ids, FIRST_IMAGE, 4)
    assert places.tolist() == [[-1, 0, 1, 2, 3, -1, 0, 1, 2]]
    pairs = copy_pairs(places, places)[0, 0]
    linked = {(int(q), int(k)) for q, k in zip(*torch.nonzero(pairs, as_tuple=True))}
    # a query at place p links every key at place p + 1; the causal mask later drops the
    # future ones (A's own next place, B's own next places), leaving B -> A
    assert linked == {(1, 2), (1, 7), (2, 3), (2, 8), (3, 4), (6, 2), (6, 7), (7, 3), (7, 8), (8, 4)}
    assert {(q, k) for q, k in linked if k < q} == {(6, 2), (7, 3), (8, 4)}


def _reference_logits(m: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The forward pass written out by hand: explicit scores, causal mask, copy bias per head."""
    cfg = m.cfg
    B, T = ids.shape
    places = image_index(ids, m.first_image_id, cfg.image_tokens)
    x = m.embed(ids, torch.arange(T).expand(B, T), places)
    nh, hd = cfg.n_heads, cfg.head_dim
    for block in m.blocks:
        h = F.layer_norm(x, (cfg.d_model,))
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in block.attn.qkv(h).split(cfg.d_model, dim=2))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, nh, T, T)
        for b in range(B):
            for i in range(T):
                for j in range(T):
                    if j > i:
                        scores[b, :, i, j] = float("-inf")
                    elif places[b, i] >= 0 and places[b, j] == places[b, i] + 1:
                        scores[b, :, i, j] += block.attn.copy_bias
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.d_model)
        x = x + block.attn.out(y)
        x = x + block.mlp(F.layer_norm(x, (cfg.d_model,)))
    return m.lm_head(F.layer_norm(x, (cfg.d_model,)))


@torch.no_grad()
def test_forward_equals_hand_written_attention_with_copy_bias():
    torch.manual_seed(0)
    m = Transformer(_cfg()).eval()
    for p in m.parameters():
        p.normal_(std=0.3)
    ids = torch.tensor([[1, 60, 61, 62, 63, 2, 64, 65, 66, 67], [3, 4, 69, 68, 67, 66, 5, 60, 61, 6]])
    torch.testing.assert_close(m(ids), _reference_logits(m, ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_copy_bias_starts_at_zero_and_then_matters():
    torch.manual_seed(0)
    m = Transformer(_cfg())
    assert all(float(b.attn.copy_bias.abs().sum()) == 0 for b in m.blocks)
    for p in m.parameters():
        p.normal_(std=0.3)
    for b in m.blocks:
        b.attn.copy_bias.zero_()
    off = Transformer(dataclasses.replace(m.cfg, image_copy_bias=False))
    off.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith("copy_bias")})
    ids = torch.tensor([[1, 60, 61, 62, 63, 2, 64, 65, 66, 67]])
    torch.testing.assert_close(m(ids), off(ids))  # zero bias: the same model as without it
    m.blocks[0].attn.copy_bias.fill_(3.0)
    out = m(ids)
    torch.testing.assert_close(out[:, :6], off(ids)[:, :6])  # before image B no earlier key links
    assert not torch.allclose(out[:, 6:], off(ids)[:, 6:])


def test_copy_bias_is_trained_without_weight_decay_and_gets_gradients():
    torch.manual_seed(0)
    m = Transformer(_cfg())
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    ids = torch.tensor([[1, 60, 61, 62, 63, 2, 64, 65, 66, 67]])
    m(ids)[:, :-1].logsumexp(-1).sum().backward()
    assert all(b.attn.copy_bias.grad is not None and b.attn.copy_bias.grad.abs().sum() > 0 for b in m.blocks)
    assert all(b.attn.copy_bias.dim() == 1 for b in m.blocks)  # 1-D: the no-decay group (train.loop)


def test_copy_bias_config_errors():
    with pytest.raises(ValueError, match="image_copy_bias needs image_tokens"):
        ModelConfig(vocab_size=70, d_model=32, n_heads=4, image_copy_bias=True)
    m = Transformer(_cfg())
    with pytest.raises(ValueError, match="key_places"):
        m.copy_pairs(torch.zeros(1, 1, dtype=torch.long), None)
