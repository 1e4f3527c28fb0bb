"""KV-cached batched decoding (generate/decode.py) on a tiny random model with a non-zero LM head."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.config import ModelConfig
from cm3leon.generate.decode import decode_streams, generate_image_tokens, generate_text, sample_mix
from cm3leon.generate.guidance import unconditional_prompt
from cm3leon.generate.logits import SamplingConfig, image_allowed, text_allowed
from cm3leon.generate.rerank import rerank, rerank_groups
from cm3leon.model.transformer import Transformer
from cm3leon.vocab import Vocab

V = Vocab(text_size=40, image_size=24, image_seq_len=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V.size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    with torch.no_grad():  # the paper zero-inits the head; a random one makes logits informative
        torch.nn.init.normal_(m.lm_head.weight, std=1.0)
    return m.eval()


def _prompt(*bpe: int) -> list[int]:
    return [V.eos_id, *V.text_to_ids(list(bpe)), V.break_id]


PROMPTS = [_prompt(1, 2, 3, 4, 5), _prompt(7), _prompt(9, 9, 3)]


def _full_logits(model: Transformer, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq]))[0]  # (T, V)


@pytest.mark.parametrize("n_streams", [2, 3])
def test_cached_guided_streams_equal_full_forward_of_each_sequence(model: Transformer, n_streams: int) -> None:
    cfg = SamplingConfig(guidance=3.0, seed=5)
    n = 2
    cond = [p for p in PROMPTS for _ in range(n)]
    streams = [cond, [unconditional_prompt(p, V) for p in cond]]
    if n_streams == 3:  # editing-like: [full, image only, neither]
        img = V.codes_to_ids(list(range(V.image_seq_len)))
        cond = [[V.eos_id, *img, *p[1:]] for p in cond]
        streams = [cond] + [[unconditional_prompt(p, V, mask_images=m) for p in cond] for m in (False, True)]
    seen: list[torch.Tensor] = []
    out = decode_streams(
        model, V, streams, cfg, n_new=V.image_seq_len, allowed=image_allowed(V),
        on_logits=lambda i, lg: seen.append(lg.clone()),
    )
    assert len(seen) == V.image_seq_len and seen[0].shape[0] == n_streams
    for s, stream in enumerate(streams):
        for b, prompt in enumerate(stream):
            full = _full_logits(model, prompt + out[b].tolist())
            for i in range(V.image_seq_len):
                torch.testing.assert_close(seen[i][s, b], full[len(prompt) - 1 + i], atol=1e-4, rtol=1e-4)


def _naive_greedy_cfg(model: Transformer, prompt: list[int], scale: float) -> list[int]:
    """Reference: no cache, no batching; full forward of cond and uncond every step."""
    cond, unc = list(prompt), unconditional_prompt(prompt, V)
    img = image_allowed(V)
    toks = []
    for _ in range(V.image_seq_len):
        c, u = _full_logits(model, cond)[-1], _full_logits(model, unc)[-1]
        mixed = (u + scale * (c - u)).masked_fill(~img, float("-inf"))
        t = int(mixed.argmax())
        toks.append(t)
        cond.append(t)
        unc.append(t)
    return toks


def test_greedy_cfg_equals_naive_reference(model: Transformer) -> None:
    cfg = SamplingConfig(greedy=True, guidance=3.0)
    got = generate_image_tokens(model, V, PROMPTS, cfg)
    for b, p in enumerate(PROMPTS):
        assert V.codes_to_ids(got[b].tolist()) == _naive_greedy_cfg(model, p, 3.0)


def test_greedy_instruct_cfg_equals_naive_reference(model: Transformer) -> None:
    img = V.codes_to_ids([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    prompts = [[V.eos_id, *img, *p[1:]] for p in PROMPTS]  # <eos> IMAGE instruction <break>
    got = generate_image_tokens(model, V, prompts, SamplingConfig(greedy=True), instruct=True)
    allowed = image_allowed(V)
    for b, p in enumerate(prompts):
        full, im, none = p, unconditional_prompt(p, V), unconditional_prompt(p, V, mask_images=True)
        ref = []
        for _ in range(V.image_seq_len):
            lf, li, ln = (_full_logits(model, s)[-1] for s in (full, im, none))
            mixed = ln + 1.5 * (li - ln) + 7.5 * (lf - li)  # paper §4: image 1.5, text 7.5
            t = int(mixed.masked_fill(~allowed, float("-inf")).argmax())
            ref.append(t)
            full, im, none = full + [t], im + [t], none + [t]
        assert V.codes_to_ids(got[b].tolist()) == ref


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(model: Transformer) -> None:
    base = SamplingConfig(seed=11, top_p=0.95, temperature=1.3)
    unc = [unconditional_prompt(p, V) for p in PROMPTS]
    plain_cond = generate_image_tokens(model, V, PROMPTS, dataclasses.replace(base, guidance=1.0), n_per_prompt=2)
    cfg_one = generate_image_tokens(
        model, V, PROMPTS, dataclasses.replace(base, guidance=1.0), uncond_prompts=unc, n_per_prompt=2
    )
    assert torch.equal(cfg_one, plain_cond)
    plain_unc = generate_image_tokens(model, V, unc, dataclasses.replace(base, guidance=1.0), n_per_prompt=2)
    cfg_zero = generate_image_tokens(
        model, V, PROMPTS, dataclasses.replace(base, guidance=0.0), uncond_prompts=unc, n_per_prompt=2
    )
    assert torch.equal(cfg_zero, plain_unc)
    assert not torch.equal(plain_cond, plain_unc)  # the two streams do differ
    inst_one = generate_image_tokens(
        model, V, PROMPTS, dataclasses.replace(base, image_guidance=1.0, text_guidance=1.0), instruct=True,
        n_per_prompt=2,
    )
    assert torch.equal(inst_one, plain_cond)


def test_every_image_has_exactly_L_codes_and_seeds_reproduce(model: Transformer) -> None:
    cfg = SamplingConfig(seed=3)
    a = generate_image_tokens(model, V, PROMPTS, cfg, n_per_prompt=3)
    assert a.shape == (len(PROMPTS) * 3, V.image_seq_len) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V.image_size
    assert torch.equal(a, generate_image_tokens(model, V, PROMPTS, cfg, n_per_prompt=3))
    other_seed = dataclasses.replace(cfg, seed=4)
    assert not torch.equal(a, generate_image_tokens(model, V, PROMPTS, other_seed, n_per_prompt=3))


def test_greedy_is_deterministic_and_independent_of_batch(model: Transformer) -> None:
    cfg = SamplingConfig(greedy=True, guidance=2.0)
    batch = generate_image_tokens(model, V, PROMPTS, cfg)
    assert torch.equal(batch, generate_image_tokens(model, V, PROMPTS, cfg))
    for b, p in enumerate(PROMPTS):
        assert torch.equal(generate_image_tokens(model, V, [p], cfg)[0], batch[b])


def test_callback_streams_partial_images(model: Transformer) -> None:
    calls: list[tuple[int, torch.Tensor]] = []
    out = generate_image_tokens(
        model, V, PROMPTS[:2], SamplingConfig(seed=1), callback=lambda n, t: calls.append((n, t)), callback_every=5
    )
    assert [n for n, _ in calls] == [5, 10, 12]
    for n, t in calls:
        assert torch.equal(t, out[:, :n])


def test_sample_mix_halves_match_cfg_and_cdk(model: Transformer) -> None:
    cfg = SamplingConfig(greedy=True, guidance=3.0, cd_k=4, cd_alpha=0.2)
    codes, is_cdk = sample_mix(model, V, PROMPTS, cfg, n_per_prompt=4)
    assert codes.shape == (12, V.image_seq_len)
    assert is_cdk.tolist() == [False, False, True, True] * 3
    cfg_rows = generate_image_tokens(model, V, PROMPTS, dataclasses.replace(cfg, cd_k=None))
    cdk_rows = generate_image_tokens(model, V, PROMPTS, cfg)
    for p in range(3):
        assert torch.equal(codes[4 * p], cfg_rows[p]) and torch.equal(codes[4 * p + 1], cfg_rows[p])
        assert torch.equal(codes[4 * p + 2], cdk_rows[p]) and torch.equal(codes[4 * p + 3], cdk_rows[p])


@pytest.fixture(scope="module")
def eos_model(model: Transformer) -> Transformer:
    """The tiny model with a boosted <eos> row so that some texts stop early."""
    m = Transformer(model.cfg)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.lm_head.weight[V.eos_id] *= 4.0
    return m.eval()


def _naive_greedy_text(model: Transformer, prompt: list[int], max_new: int) -> list[int]:
    seq, out = list(prompt), []
    allowed = text_allowed(V)
    for _ in range(max_new):
        t = int(_full_logits(model, seq)[-1].masked_fill(~allowed, float("-inf")).argmax())
        if t in (V.eos_id, V.break_id):
            break
        out.append(t)
        seq.append(t)
    return out


def test_text_stops_at_eos_and_matches_naive_reference(eos_model: Transformer) -> None:
    prompts = [[V.eos_id, *V.codes_to_ids(list(range(i, i + 12))), V.break_id] for i in range(6)]
    max_new = 10
    got = generate_text(eos_model, V, prompts, SamplingConfig(greedy=True), max_new_tokens=max_new)
    assert got == [_naive_greedy_text(eos_model, p, max_new) for p in prompts]
    assert any(len(r) < max_new for r in got), "fixture should make some rows stop early"
    assert any(len(r) > 0 for r in got)
    assert all(V.text_offset <= t < V.image_offset for r in got for t in r)


def test_text_sampling_only_text_ids_and_no_repeat(model: Transformer) -> None:
    got = generate_text(model, V, PROMPTS, SamplingConfig(seed=2, no_repeat_ngram=1), max_new_tokens=15)
    for p, r in zip(PROMPTS, got):
        assert all(V.text_offset <= t < V.image_offset for t in r)
        assert len(set(r)) == len(r) and not set(r) & set(p)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: generate_image_tokens(m, V, [], SamplingConfig()), "non-empty"),
        (lambda m: generate_image_tokens(m, V, [[]], SamplingConfig()), "empty"),
        (lambda m: generate_image_tokens(m, V, [_prompt(*range(60))], SamplingConfig()), "max_seq_len"),
        (lambda m: generate_image_tokens(m, V, PROMPTS, SamplingConfig(), n_per_prompt=0), "n_per_prompt"),
        (lambda m: generate_image_tokens(m, V, [[V.eos_id, 20]], SamplingConfig()), "break"),
        (lambda m: generate_image_tokens(m, V, [[V.eos_id, V.size, V.break_id]], SamplingConfig()), "outside"),
        (lambda m: generate_image_tokens(m, V, PROMPTS, SamplingConfig(), uncond_prompts=PROMPTS[:1]), "one each"),
        (lambda m: generate_image_tokens(m, Vocab(10, 10, 4), PROMPTS, SamplingConfig()), "vocab"),
        (lambda m: generate_text(m, V, PROMPTS, SamplingConfig(), max_new_tokens=0), "max_new_tokens"),
        (lambda m: generate_text(m, V, PROMPTS, SamplingConfig(cd_k=3), max_new_tokens=4), "uncond"),
        (lambda m: sample_mix(m, V, PROMPTS, SamplingConfig(), n_per_prompt=-2), "n_per_prompt"),
    ],
)
def test_bad_input_is_refused_clearly(model: Transformer, call, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        call(model)
    with pytest.raises(ValueError, match="guidance"):
        SamplingConfig(guidance=float("nan"))


# ---- CLIP re-ranking (generate/rerank.py) ----------------------------------------------
class _ColorEncoder:
    """A toy two-tower encoder: text = one-hot colour name, image = its mean RGB (unnormalized)."""

    def embed_text(self, texts):  # noqa: ANN001, ANN201
        names = ["red", "green", "blue"]
        return np.array([[float(t == n) for n in names] for t in texts], dtype=np.float32)

    def embed_image(self, images):  # noqa: ANN001, ANN201
        return np.array([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images])


def _solid(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (4, 4), rgb)


def test_rerank_orders_by_cosine() -> None:
    cols = [(10, 200, 0), (200, 50, 0), (90, 90, 90), (255, 0, 0)]
    r = rerank(_ColorEncoder(), "red", [_solid(c) for c in cols])
    expect = [c[0] / np.sqrt(c[0] ** 2 + c[1] ** 2 + c[2] ** 2) for c in cols]
    np.testing.assert_allclose(r.scores, expect, rtol=1e-5)
    assert r.order == [3, 1, 2, 0] and r.best == 3
    groups = rerank_groups(_ColorEncoder(), ["red", "green"], [_solid(c) for c in cols], n_per_prompt=2)
    assert [g.order for g in groups] == [[1, 0], [0, 1]]  # local indices; green: (90,90,90) beats (255,0,0)
    with pytest.raises(ValueError, match="4 images for 1 prompts x 2 samples; expected 2"):
        rerank_groups(_ColorEncoder(), ["red"], [_solid(c) for c in cols], n_per_prompt=2)
    with pytest.raises(ValueError, match="no candidate"):
        rerank(_ColorEncoder(), "red", [])


@pytest.mark.slow
def test_compiled_step_matches_eager(model: Transformer) -> None:
    cfg = SamplingConfig(greedy=True, guidance=3.0)
    eager = generate_image_tokens(model, V, PROMPTS, cfg)
    assert torch.equal(generate_image_tokens(model, V, PROMPTS, cfg, compile=True), eager)
