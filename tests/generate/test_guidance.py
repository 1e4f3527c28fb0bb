"""CFG / instruct-CFG / CD-K math and unconditional-stream construction (generate/guidance.py)."""

from __future__ import annotations

import math

import pytest
import torch

from cm3leon.generate.guidance import (
    cdk_candidates,
    cdk_scores,
    cfg_mix,
    instruct_cfg_mix,
    next_token_scores,
    unconditional_prompt,
)
from cm3leon.generate.logits import SamplingConfig
from cm3leon.vocab import Vocab

NEG = float("-inf")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_cfg_mix_formula_and_exact_endpoints() -> None:
    c, u = _rand(4, 50, seed=1), _rand(4, 50, seed=2)
    assert torch.equal(cfg_mix(c, u, 1.0), c)
    assert torch.equal(cfg_mix(c, u, 0.0), u)
    for a in (0.5, 3.0, 7.5, -1.0):
        assert torch.allclose(cfg_mix(c, u, a), u + a * (c - u), atol=1e-5)


def test_instruct_cfg_mix_formula() -> None:
    full, img, none = _rand(3, 30, seed=1), _rand(3, 30, seed=2), _rand(3, 30, seed=3)
    out = instruct_cfg_mix(full, img, none, image_scale=1.5, text_scale=7.5)
    ref = none + 1.5 * (img - none) + 7.5 * (full - img)
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.equal(instruct_cfg_mix(full, img, none, image_scale=1.0, text_scale=1.0), full)
    # text scale 0 keeps only image guidance: none + s_img (img - none)
    assert torch.allclose(instruct_cfg_mix(full, img, none, image_scale=2.0, text_scale=0.0),
                          none + 2.0 * (img - none), atol=1e-5)


def test_cdk_candidates_hand_example() -> None:
    # p_cond = [0.40, 0.30, 0.20, 0.06, 0.04]; k=2 -> 2nd largest 0.30; alpha=0.5 -> threshold 0.15
    # candidates: {0, 1, 2}. With k=1 (plain CD), threshold 0.20 -> {0, 1, 2} at alpha 0.5,
    # and alpha=0.6 -> 0.24 -> {0, 1}.
    p = torch.tensor([[0.40, 0.30, 0.20, 0.06, 0.04]])
    logits = p.log() + 1.234  # a per-row shift must not matter
    assert cdk_candidates(logits, 2, 0.5).tolist() == [[True, True, True, False, False]]
    assert cdk_candidates(logits, 1, 0.6).tolist() == [[True, True, False, False, False]]
    # k=4 -> 0.06; alpha=0.5 -> 0.03: everything
    assert cdk_candidates(logits, 4, 0.5).all()
    # k=3, alpha=1 -> p >= 0.20
    assert cdk_candidates(logits, 3, 1.0).tolist() == [[True, True, True, False, False]]


def test_cdk_candidates_respect_mask_and_large_k() -> None:
    logits = torch.tensor([[0.0, 1.0, NEG, 2.0, NEG]])
    # only 3 allowed ids; k=10 clamps to the smallest allowed prob, so all 3 allowed, never the masked ones
    assert cdk_candidates(logits, 10, 1.0).tolist() == [[True, True, False, True, False]]


def test_cdk_scores_hand_example() -> None:
    pc = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    pu = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    out = cdk_scores(pc.log(), pu.log() - 3.0, k=2, alpha=0.5)  # threshold 0.15 -> {0, 1, 2}
    expect = [math.log(0.5 / 0.1), math.log(0.3 / 0.6), math.log(0.15 / 0.2), NEG]
    for got, want in zip(out[0].tolist(), expect):
        assert got == want if want == NEG else abs(got - want) < 1e-5


def test_next_token_scores_cfg_endpoints_equal_single_stream() -> None:
    c, u = _rand(5, 40, seed=4), _rand(5, 40, seed=5)
    allowed = torch.rand(40, generator=torch.Generator().manual_seed(0)) > 0.3
    for cfg in (SamplingConfig(top_p=0.8, temperature=0.7), SamplingConfig(greedy=True)):
        one = next_token_scores(c[None], allowed, cfg)
        assert torch.equal(next_token_scores(torch.stack([c, u]), allowed, _with(cfg, guidance=1.0)), one)
        zero = next_token_scores(u[None], allowed, cfg)
        assert torch.equal(next_token_scores(torch.stack([c, u]), allowed, _with(cfg, guidance=0.0)), zero)
        full_inst = next_token_scores(
            torch.stack([c, u, _rand(5, 40, seed=6)]), allowed, _with(cfg, image_guidance=1.0, text_guidance=1.0)
        )
        assert torch.equal(full_inst, one)


def test_next_token_scores_cdk_rows_and_temperature() -> None:
    c, u = _rand(4, 30, seed=7), _rand(4, 30, seed=8)
    allowed = torch.ones(30, dtype=torch.bool)
    allowed[:3] = False
    cfg = SamplingConfig(cd_k=3, cd_alpha=0.2, temperature=2.0, guidance=3.0, top_p=0.9)
    rows = torch.tensor([False, True, False, True])
    out = next_token_scores(torch.stack([c, u]), allowed, cfg, cd_rows=rows)
    cd = cdk_scores(c.masked_fill(~allowed, NEG), u.masked_fill(~allowed, NEG), 3, 0.2) / 2.0
    cfg_only = next_token_scores(torch.stack([c, u]), allowed, _with(cfg, cd_k=None))
    assert torch.equal(out[rows], cd[rows])
    assert torch.equal(out[~rows], cfg_only[~rows])
    assert torch.isinf(out[:, :3]).all()
    with pytest.raises(ValueError, match="three"):
        next_token_scores(torch.stack([c, u, u]), allowed, cfg)


def _with(cfg: SamplingConfig, **kw: object) -> SamplingConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_unconditional_prompt_construction() -> None:
    v = Vocab(text_size=20, image_size=10, image_seq_len=3)
    cap = v.text_to_ids([3, 4, 5])
    img = v.codes_to_ids([1, 2, 3])
    prompt = [v.eos_id, *cap, v.break_id]
    assert unconditional_prompt(prompt, v) == [v.eos_id, v.mask_id(0), v.break_id]
    # retrieved document first: kept in both streams; only the query is masked
    retrieved = [v.eos_id, *v.text_to_ids([7, 8]), v.break_id, *img]
    assert unconditional_prompt(retrieved + prompt, v) == retrieved + [v.eos_id, v.mask_id(0), v.break_id]
    assert unconditional_prompt(retrieved + prompt, v, query_only=False) == [
        v.eos_id, v.mask_id(0), v.break_id, *img, v.eos_id, v.mask_id(1), v.break_id,
    ]
    # editing: "<eos> IMAGE <break> instruction <break>"
    edit = [v.eos_id, *img, v.break_id, *cap, v.break_id]
    assert unconditional_prompt(edit, v) == [v.eos_id, *img, v.break_id, v.mask_id(0), v.break_id]
    assert unconditional_prompt(edit, v, mask_images=True) == [
        v.eos_id, v.mask_id(0), v.break_id, v.mask_id(1), v.break_id,
    ]
    assert prompt == [v.eos_id, *cap, v.break_id]  # input untouched
    with pytest.raises(ValueError, match="empty"):
        unconditional_prompt([], v)
