"""Speculative Jacobi decoding (generate/jacobi.py): the same greedy tokens and the same
sampling distribution as sequential decoding, exactly L image ids, and cache rollback."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from cm3leon.config import ModelConfig
from cm3leon.generate.decode import generate_image_tokens, sample_mix
from cm3leon.generate.generation_config import TaskDecoding
from cm3leon.generate.guidance import next_token_scores, unconditional_prompt
from cm3leon.generate.jacobi import rollback, window_forward
from cm3leon.generate.logits import SamplingConfig, image_allowed
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer
from cm3leon.pipeline import CM3Leon
from cm3leon.vocab import Vocab
from helpers import build_tiny_model_dir

V = Vocab(text_size=40, image_size=24, image_seq_len=12)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(vocab: Vocab, d: int = 32, std: float = 1.0, **kw: object) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=vocab.size, d_model=d, n_layers=2, n_heads=4, max_seq_len=64, **kw))
    with torch.no_grad():  # the paper zero-inits the head; a random one makes logits informative
        torch.nn.init.normal_(m.lm_head.weight, std=std)
    return m.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model(V)


def _prompt(vocab: Vocab, *bpe: int) -> list[int]:
    return [vocab.eos_id, *vocab.text_to_ids(list(bpe)), vocab.break_id]


PROMPTS = [_prompt(V, 1, 2, 3, 4, 5), _prompt(V, 7), _prompt(V, 9, 9, 3)]  # left-padded to different lengths


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_sjd_equals_sequential_greedy_batched_left_padded(model: Transformer, window: int,
                                                                 guidance: float) -> None:
    cfg = SamplingConfig(greedy=True, guidance=guidance)
    seq = generate_image_tokens(model, V, PROMPTS, cfg, n_per_prompt=2)
    sjd = generate_image_tokens(model, V, PROMPTS, cfg, n_per_prompt=2, jacobi_window=window)
    assert sjd.shape == (len(PROMPTS) * 2, V.image_seq_len)
    assert torch.equal(sjd, seq)


def test_greedy_sjd_equals_sequential_with_cdk_instruct_and_image_places() -> None:
    m = _model(V, image_tokens=V.image_seq_len, image_vocab=V.image_size)
    cfg = SamplingConfig(greedy=True, cd_k=4)
    seq, _ = sample_mix(m, V, PROMPTS, cfg, n_per_prompt=2)
    sjd, _ = sample_mix(m, V, PROMPTS, cfg, n_per_prompt=2, jacobi_window=4)
    assert torch.equal(sjd, seq)
    src = V.codes_to_ids(list(range(V.image_seq_len)))
    edit = [[V.eos_id, *src, *p[1:]] for p in PROMPTS]
    greedy = SamplingConfig(greedy=True)
    assert torch.equal(generate_image_tokens(m, V, edit, greedy, instruct=True, jacobi_window=5),
                       generate_image_tokens(m, V, edit, greedy, instruct=True))


def test_sjd_sampling_gives_exactly_l_image_ids_and_progress(model: Transformer) -> None:
    seen: list[tuple[int, torch.Tensor]] = []
    cfg = SamplingConfig(guidance=3.0, top_p=0.8, top_k=10, temperature=0.7, seed=3)
    codes = generate_image_tokens(model, V, PROMPTS, cfg, n_per_prompt=3, jacobi_window=4, callback_every=4,
                                  callback=lambda n, c: seen.append((n, c)))
    assert codes.shape == (9, V.image_seq_len)
    assert codes.min() >= 0 and codes.max() < V.image_size
    assert seen[-1][0] == V.image_seq_len and torch.equal(seen[-1][1], codes)
    assert all(c.shape == (9, n) and torch.equal(c, codes[:, :n]) for n, c in seen)
    again = generate_image_tokens(model, V, PROMPTS, cfg, n_per_prompt=3, jacobi_window=4)
    assert torch.equal(again, codes)  # same seed, same tokens


def test_a_predictable_model_needs_few_forwards() -> None:
    m = _model(V, std=0.0)  # zero head: every step's arg-max is the first image id, so drafts are right
    calls = []
    forward = m.forward_cached
    m.forward_cached = lambda *a, **k: calls.append(1) or forward(*a, **k)  # type: ignore[method-assign]
    codes = generate_image_tokens(m, V, PROMPTS, SamplingConfig(greedy=True, guidance=3.0), jacobi_window=6)
    del m.forward_cached
    assert (codes == 0).all()
    # the prefill, then two windows that accept every draft (1 + 7 + 4 tokens)
    assert len(calls) == 3 < V.image_seq_len


def test_rollback_leaves_the_cache_as_sequential_decoding() -> None:
    m = _model(V, image_tokens=9, image_vocab=V.image_size, image_axial=True)
    rows = [PROMPTS[0], PROMPTS[1]]
    T = max(len(r) for r in rows)
    ids = torch.full((2, T), V.pad_id)
    valid = torch.zeros(2, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], valid[i, T - len(r):] = torch.tensor(r), True
    img = V.image_offset + torch.tensor([[3, 5, 1, 7, 2, 2], [4, 4, 0, 9, 1, 6]])
    seq = KVCache.allocate(m.cfg, 2, T + 8)
    sjd = KVCache.allocate(m.cfg, 2, T + 8)
    with torch.no_grad():
        prefill(m, ids, valid, seq)
        prefill(m, ids, valid, sjd)
        for t in range(4):
            ref = decode_one_token(m, img[:, t : t + 1], seq)
        window_forward(m, img[:, :2], sjd, None)
        rollback(sjd, 2, 2, image_tokens=9)
        got = window_forward(m, img[:, 2:], sjd, None)  # places 2..5 fed, only 2 and 3 kept
        rollback(sjd, 4, 2, image_tokens=9)
    torch.testing.assert_close(got[:, 1], ref, rtol=1e-4, atol=1e-5)
    for name in ("pos", "slot", "image_idx"):
        assert torch.equal(getattr(sjd, name), getattr(seq, name)), name
    assert sjd._written == seq._written
    n = seq._written
    assert torch.equal(sjd.valid[:, :n], seq.valid[:, :n]) and not sjd.valid[:, n:].any()
    keep = seq.valid[:, None, :n, None]  # (B, 1, n, 1): the slots either path may attend
    for a, b in ((sjd.k, seq.k), (sjd.v, seq.v)):
        torch.testing.assert_close(a[..., :n, :] * keep, b[..., :n, :] * keep, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the next steps of both caches agree
        nxt = img[:, 4:5]
        torch.testing.assert_close(window_forward(m, nxt, sjd, None)[:, 0], decode_one_token(m, nxt, seq),
                                   rtol=1e-4, atol=1e-5)


def test_bad_jacobi_settings_are_refused(model: Transformer) -> None:
    with pytest.raises(ValueError, match="jacobi_window must be"):
        generate_image_tokens(model, V, PROMPTS, SamplingConfig(), jacobi_window=-1)
    with pytest.raises(ValueError, match="compile=False"):
        generate_image_tokens(model, V, PROMPTS, SamplingConfig(), jacobi_window=2, compile=True)


# ---- the sampling distribution -------------------------------------------------------------
SMALL = Vocab(text_size=8, image_size=3, image_seq_len=4)  # 3^4 = 81 possible images


def _exact_joint(m: Transformer, prompt: list[int], cfg: SamplingConfig) -> dict[tuple[int, ...], float]:
    """Probability of every image under sequential decoding, from full forwards of each prefix."""
    allowed = image_allowed(SMALL)
    unc = unconditional_prompt(prompt, SMALL)
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(SMALL.image_seq_len):
        nxt = {}
        for prefix, pr in probs.items():
            tail = SMALL.codes_to_ids(list(prefix))
            with torch.no_grad():
                lg = torch.stack([m(torch.tensor([s + tail]))[0, -1] for s in (prompt, unc)])[:, None]  # (2, 1, V)
            p = torch.softmax(next_token_scores(lg, allowed, cfg)[0].double(), -1)
            for c in range(SMALL.image_size):
                nxt[(*prefix, c)] = pr * float(p[SMALL.image_offset + c])
        probs = nxt
    return probs


def test_sjd_sampling_matches_the_sequential_distribution() -> None:
    """Chi-square of 6,000 SJD images per prompt against the exact law of sequential decoding.

    Tolerance: images of probability 0 (cut by top-p) never appear, the joint over the others
    (cells with expected count < 5 pooled) must not be rejected at p < 1e-3, and each place's
    marginal must be within total variation 0.03 (about 4 standard errors at n = 6,000). A
    decoder that drew the rejected place from p instead of the residual fails the chi-square
    by far (p ~ 1e-62) on this model.
    """
    m = _model(SMALL, d=16, std=0.6)  # top-p cuts a third of the 81 images
    cfg = SamplingConfig(guidance=2.0, temperature=1.3, top_p=0.95, seed=11)
    prompts = [_prompt(SMALL, 1, 2, 3), _prompt(SMALL, 5)]
    n = 6000
    codes = generate_image_tokens(m, SMALL, prompts, cfg, n_per_prompt=n, jacobi_window=2).numpy()
    for j, prompt in enumerate(prompts):
        exact = _exact_joint(m, prompt, cfg)
        keys = list(itertools.product(range(SMALL.image_size), repeat=SMALL.image_seq_len))
        index = {k: i for i, k in enumerate(keys)}
        got = np.bincount([index[tuple(r)] for r in codes[j * n : (j + 1) * n].tolist()], minlength=len(keys))
        expected = np.array([exact[k] for k in keys]) * n
        assert got[expected == 0].sum() == 0  # top-p removed those images: never drawn
        small = (expected < 5) & (expected > 0)
        big = expected >= 5
        obs = np.append(got[big], got[small].sum())
        exp = np.append(expected[big], expected[small].sum())
        assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
        for place in range(SMALL.image_seq_len):
            emp = np.bincount(codes[j * n : (j + 1) * n, place], minlength=SMALL.image_size) / n
            law = np.zeros(SMALL.image_size)
            for k, pr in exact.items():
                law[k[place]] += pr
            assert 0.5 * np.abs(emp - law).sum() < 0.03, (j, place, emp, law)


# ---- configuration and the pipeline ----------------------------------------------------------
def test_jacobi_window_in_task_decoding() -> None:
    d = TaskDecoding(jacobi_window=8)
    assert TaskDecoding.from_dict(d.to_dict()).jacobi_window == 8
    assert TaskDecoding().jacobi_window == 0  # sequential unless asked
    with pytest.raises(ValueError, match="jacobi_window must be"):
        TaskDecoding(jacobi_window=-2)


def test_pipeline_greedy_images_are_the_same_with_jacobi(tmp_path) -> None:  # noqa: ANN001
    pipe = CM3Leon.from_pretrained(build_tiny_model_dir(tmp_path / "m", resolution=16, encoder=False))
    t2i = pipe.generation_config.text_to_image
    pipe.generation_config = dataclasses.replace(
        pipe.generation_config, text_to_image=t2i.replace(greedy=True, guidance=2.0, jacobi_window=4)
    )
    prompts = ["a red circle", "two small blue squares at the top"]
    sjd = pipe.generate_images(prompts, n=2)
    seq = pipe.generate_images(prompts, n=2, jacobi_window=0)
    for a, b in zip(sjd, seq):
        assert torch.equal(a.codes, b.codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_sjd_equals_sequential_on_cuda_bf16() -> None:
    m = _model(V, image_tokens=V.image_seq_len, image_vocab=V.image_size).to("cuda", torch.bfloat16)
    cfg = SamplingConfig(greedy=True, guidance=3.0)
    seq = generate_image_tokens(m, V, PROMPTS, cfg, n_per_prompt=2)
    sjd = generate_image_tokens(m, V, PROMPTS, cfg, n_per_prompt=2, jacobi_window=8)
    # bf16 window and one-token forwards round differently: near-ties may flip, rarely
    assert (sjd == seq).float().mean() > 0.9
    codes = generate_image_tokens(m, V, PROMPTS, SamplingConfig(seed=1), jacobi_window=8)
    assert codes.shape == (3, V.image_seq_len) and codes.is_cuda
