"""Logits processors and SamplingConfig (generate/logits.py) against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from cm3leon.generate.logits import (
    SamplingConfig,
    apply_temperature,
    image_allowed,
    mask_disallowed,
    no_repeat_ngram,
    process,
    repetition_penalty,
    sample,
    text_allowed,
    top_k_filter,
    top_p_filter,
)
from cm3leon.vocab import Vocab


def _ref_top_p(row: list[float], p: float) -> set[int]:
    """Python reference: smallest top set (by descending prob) whose mass reaches p."""
    m = max(row)
    z = sum(math.exp(x - m) for x in row)
    probs = [math.exp(x - m) / z for x in row]
    order = sorted(range(len(row)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_reference(p: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g) * 2
    out = top_p_filter(logits, p)
    for b in range(6):
        kept = {i for i in range(40) if math.isfinite(out[b, i].item())}
        assert kept == _ref_top_p(logits[b].tolist(), p)
        assert torch.equal(out[b, sorted(kept)], logits[b, sorted(kept)])


def test_top_p_keeps_at_least_one_and_respects_existing_mask() -> None:
    logits = torch.tensor([[5.0, 1.0, float("-inf"), 0.0]])
    out = top_p_filter(logits, 1e-6)
    assert torch.isfinite(out).sum() == 1 and out[0, 0] == 5.0
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    with pytest.raises(ValueError, match="top-p"):
        top_p_filter(logits, 0.0)


def test_top_k_and_temperature() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert torch.equal(top_k_filter(logits, None), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_repetition_penalty_ctrl_form() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    prev = torch.tensor([[0, 1, 3]])
    valid = torch.tensor([[True, True, False]])  # id 3 is padding: not penalized
    out = repetition_penalty(logits, prev, 2.0, valid=valid)
    assert out.tolist() == [[1.0, -4.0, 1.0, 3.0]]
    assert repetition_penalty(logits, prev, 2.0).tolist() == [[1.0, -4.0, 1.0, 1.5]]


def test_no_repeat_ngram_bans_completions() -> None:
    logits = torch.zeros(2, 6)
    # row 0: history 1 2 3 1 2 -> bigram prefix (2,) seen before followed by 3 -> with n=3, prefix (1,2) -> ban 3
    out = no_repeat_ngram(logits, [[1, 2, 3, 1, 2], [4, 4]], 3)
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3]
    assert torch.isfinite(out[1]).all()  # (4,4) never followed by anything
    out2 = no_repeat_ngram(logits, [[1, 2, 3, 1, 2], [4, 4]], 2)
    assert torch.isinf(out2[0]).nonzero().flatten().tolist() == [3]  # "2 3" seen
    assert torch.isinf(out2[1]).nonzero().flatten().tolist() == [4]  # "4 4" seen


def test_modality_masks() -> None:
    v = Vocab(text_size=10, image_size=6, image_seq_len=4)
    logits = torch.zeros(1, v.size)
    img = mask_disallowed(logits, image_allowed(v))
    assert torch.isfinite(img[0]).nonzero().flatten().tolist() == list(range(v.image_offset, v.size))
    txt = mask_disallowed(logits, text_allowed(v))
    assert torch.isfinite(txt[0]).nonzero().flatten().tolist() == [v.eos_id, v.break_id] + list(
        range(v.text_offset, v.image_offset)
    )
    with pytest.raises(ValueError, match="allowed mask"):
        mask_disallowed(logits, torch.ones(3, dtype=torch.bool))


def test_processors_never_mutate_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, generator=g)
    keep = logits.clone()
    cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.5)
    process(logits, cfg)
    top_p_filter(logits, 0.5)
    top_k_filter(logits, 3)
    repetition_penalty(logits, torch.tensor([[1, 2]] * 3), 1.5)
    no_repeat_ngram(logits, [[1, 2, 1]] * 3, 2)
    mask_disallowed(logits, torch.rand(20, generator=g) > 0.5)
    sample(logits, torch.Generator().manual_seed(0))
    assert torch.equal(logits, keep)


def test_sample_greedy_seeded_and_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]])
    assert sample(logits, None, greedy=True).tolist() == [2]
    big = logits.expand(40000, 4)
    a = sample(big, torch.Generator().manual_seed(3))
    b = sample(big, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(big, torch.Generator().manual_seed(4)))
    freq = torch.bincount(a, minlength=4).double() / len(a)
    expected = torch.softmax(logits[0].double(), -1)
    assert freq[3] == 0  # masked id never drawn
    assert torch.allclose(freq, expected, atol=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guidance=float("nan")), "guidance"),
        (dict(text_guidance=float("inf")), "text_guidance"),
        (dict(temperature=0.0), "greedy=True"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(cd_k=0), "cd_k"),
        (dict(cd_alpha=0.0), "cd_alpha"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(no_repeat_ngram=-1), "no_repeat_ngram"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_sampling_config_greedy_allows_zero_temperature() -> None:
    cfg = SamplingConfig(greedy=True, temperature=0.0)
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert torch.equal(process(logits, cfg), logits)
