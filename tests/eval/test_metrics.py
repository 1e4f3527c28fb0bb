"""Tests for cm3leon.eval.metrics and cm3leon.eval.inception against independent references."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.eval import metrics as M
from cm3leon.eval.inception import (
    FIDInceptionV3,
    InceptionA,
    InceptionC,
    InceptionE,
    load_fid_inception,
)

# ---------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------


def _fd_by_eigenvalues(a: np.ndarray, b: np.ndarray) -> float:
    """Reference FD: tr((S_a S_b)^1/2) as the sum of sqrt eigenvalues of the symmetric
    PSD matrix S_a^1/2 S_b S_a^1/2 (same spectrum as S_a S_b), all via numpy eigh."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    s_a, s_b = ca.T @ ca / (len(a) - 1), cb.T @ cb / (len(b) - 1)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_eigen_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(200, 8))
    b = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5 + rng.normal(size=8)
    assert M.frechet_distance(a, b) == pytest.approx(_fd_by_eigenvalues(a, b), rel=1e-8, abs=1e-8)


def test_frechet_distance_rank_deficient_still_matches_reference():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 20)), rng.normal(size=(7, 20)) + 0.3  # N < D: singular covariances
    assert M.frechet_distance(a, b) == pytest.approx(_fd_by_eigenvalues(a, b), rel=1e-4)


def test_frechet_distance_closed_form_diagonal():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    va, vb = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 9.0])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2 + 0.0
    got = M.frechet_distance_from_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_invariants():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(100, 5)), rng.normal(size=(80, 5)) * 2
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert M.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)  # pure translation
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-9)  # symmetric
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(M.frechet_distance(a, b))


def test_feature_stats_matches_definition():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4))
    mu, sigma = M.feature_stats(x)
    centered = x - x.sum(0) / len(x)
    np.testing.assert_allclose(mu, x.sum(0) / 30)
    np.testing.assert_allclose(sigma, centered.T @ centered / 29, rtol=1e-12)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((1, 3)), np.zeros((4, 3)), "at least 2"),
        (np.zeros((4, 3)), np.zeros((4, 2)), "dimensions differ"),
        (np.zeros(4), np.zeros((4, 2)), "2-D"),
        (np.full((4, 2), np.nan), np.zeros((4, 2)), "NaN"),
    ],
)
def test_frechet_distance_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        M.frechet_distance(a, b)


# ---------------------------------------------------------------------------------------
# Encoders used as FD-CLIP / CLIP-score feature extractors (a real, tiny dual encoder)
# ---------------------------------------------------------------------------------------

_COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class ColorEncoder:
    """A deterministic dual encoder: an image embeds as its mean colour, a text as the
    colour it names (centred at grey, deliberately NOT unit-normalized)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed_image(self, images):
        self.calls.append(len(images))
        return np.stack([np.asarray(im, np.float32).reshape(-1, 3).mean(0) - 127.5 for im in images])

    def embed_text(self, texts):
        return np.stack([np.asarray(_COLORS[t], np.float32) * 3.0 - 382.5 for t in texts])


def _solid(rgb, size=(8, 8)):
    return Image.new("RGB", size, tuple(int(c) for c in rgb))


def test_clip_score_definition_on_known_pairs():
    enc = ColorEncoder()
    texts = ["red", "red", "blue", "yellow"]
    images = [_solid((255, 0, 0)), _solid((0, 255, 255)), _solid((0, 0, 255)), _solid((255, 255, 0))]
    scores = M.clip_scores(texts, images, enc, batch_size=3)
    # red vs red, red vs cyan (exact opposite -> clamped to 0), blue vs blue, yellow vs yellow.
    np.testing.assert_allclose(scores, [100.0, 0.0, 100.0, 100.0], atol=1e-4)
    # red vs green: (1,-1,-1).(-1,1,-1) / 3 = -1/3 -> clamped to 0; red vs magenta: (1,-1,-1).(1,-1,1)/3 = 1/3.
    s = M.clip_scores(["red", "red"], [_solid((0, 255, 0)), _solid((255, 0, 255))], enc)
    np.testing.assert_allclose(s, [0.0, 100.0 / 3], atol=1e-4)
    assert M.clip_score(texts, images, enc) == pytest.approx(75.0, abs=1e-4)
    assert enc.calls[:2] == [3, 1]  # batched as asked


def test_clip_score_bad_input():
    enc = ColorEncoder()
    with pytest.raises(ValueError, match="aligned pairs"):
        M.clip_score(["red"], [], enc)
    with pytest.raises(ValueError, match="embed_text"):
        M.clip_score(["red"], [_solid((1, 2, 3))], object())
    with pytest.raises(ValueError, match="zero embedding"):
        M.clip_score(["red"], [_solid((127.5, 127.5, 127.5))], _ZeroImageEncoder())


class _ZeroImageEncoder(ColorEncoder):
    def embed_image(self, images):
        return np.zeros((len(images), 3), np.float32)


def test_fd_clip_uses_image_features_and_is_batch_invariant():
    rng = np.random.default_rng(6)
    real = [_solid(rng.integers(0, 256, 3)) for _ in range(12)]
    fake = [_solid(rng.integers(0, 128, 3)) for _ in range(10)]
    enc = ColorEncoder()
    f1, f5 = M.image_features(real, enc, batch_size=1), M.image_features(real, enc, batch_size=5)
    np.testing.assert_array_equal(f1, f5)
    ref = np.stack([np.asarray(im, np.float64)[0, 0] - 127.5 for im in real])
    np.testing.assert_allclose(f1, ref)
    fake_feats = np.stack([np.asarray(im, np.float64)[0, 0] - 127.5 for im in fake])
    assert M.fid(real, fake, enc, batch_size=4) == pytest.approx(_fd_by_eigenvalues(ref, fake_feats), rel=1e-6)
    assert M.fid(real, real, enc) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="embed_image"):
        M.image_features(real, object())


# ---------------------------------------------------------------------------------------
# CIDEr
# ---------------------------------------------------------------------------------------


def _ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _cider_d_reference(cands: dict, refs: dict, sigma: float = 6.0) -> dict:
    """CIDEr-D from Vedantam et al. (2015) as used by the COCO toolkit, written from the
    formula: tf-idf n-gram vectors (idf = log(#images / df over each image's reference set)),
    clipped dot product, Gaussian length penalty, mean over n = 1..4, mean over refs, x10."""
    n_images = len(refs)
    df = Counter()
    for rs in refs.values():
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r.split(), n)})

    def vec(words, n):
        return {g: c * (math.log(n_images) - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()}

    out = {}
    for key, cand in cands.items():
        cw, total = cand.split(), 0.0
        for r in refs[key]:
            rw = r.split()
            penalty = math.exp(-((len(cw) - len(rw)) ** 2) / (2 * sigma**2))
            per_n = []
            for n in range(1, 5):
                vc, vr = vec(cw, n), vec(rw, n)
                nc, nr = math.sqrt(sum(v * v for v in vc.values())), math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
                per_n.append(penalty * (dot / (nc * nr) if nc and nr else dot))
            total += sum(per_n) / 4
        out[key] = 10 * total / len(refs[key])
    return out


def test_cider_matches_independent_cider_d():
    cands = {
        "img1": "a red square on a blue background",
        "img2": "two small green circles",
        "img3": "a big yellow triangle next to a red circle",
    }
    refs = {
        "img1": ["a red square on a blue background", "red square with blue around it", "a square that is red"],
        "img2": ["two green circles", "a pair of small green circles side by side"],
        "img3": ["a yellow triangle and a red circle", "big yellow triangle beside a small red circle",
                 "a triangle next to a circle"],
    }
    expected = _cider_d_reference(cands, refs)
    got = M.cider_scores(cands, refs)
    assert got.keys() == expected.keys()
    for k in cands:
        assert got[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12)
    assert M.cider(cands, refs) == pytest.approx(np.mean(list(expected.values())), rel=1e-9)


def test_cider_hand_cases():
    # Identical captions, no n-gram shared across images: every n-gram cosine is 1 -> 10.
    refs = {0: ["red square left"], 1: ["blue circle right side"], 2: ["green triangle top corner"]}
    cands = {k: v[0] for k, v in refs.items()}
    for k, s in M.cider_scores(cands, refs).items():
        # CIDEr-D averages n=1..4; a 3-word caption has no 4-gram, so 3/4 of the maximum.
        assert s == pytest.approx(10.0 * min(len(refs[k][0].split()), 4) / 4)
    # Unrelated captions score exactly 0.
    assert M.cider({0: "purple hexagon", 1: "orange star", 2: "cyan oval"}, refs) == 0.0
    # An n-gram found in every image's references has idf log(3/3) = 0 and earns nothing.
    shared = {0: ["a photo of a cat"], 1: ["a photo of a dog"], 2: ["a photo of a fox"]}
    assert M.cider({0: "a photo of", 1: "a photo of", 2: "a photo of"}, shared) == 0.0
    # Normalization: case and punctuation do not matter.
    assert M.cider_scores({0: "Red, square LEFT!", 1: "x", 2: "y"}, refs)[0] == pytest.approx(7.5)


def test_caption_tokens_ptb_like():
    assert M.caption_tokens("The dog's ball, isn't it?") == "the dog 's ball is n't it"
    assert M.caption_tokens('A "well-known" man... at 3.5 km.') == "a well-known man at 3.5 km"
    assert M.caption_tokens("  Two\tcats;  one (small)  ") == "two cats one small"


@pytest.mark.parametrize(
    "cands, refs, match",
    [
        ({0: "a", 1: "b"}, {0: ["a"], 2: ["b"]}, "same ids"),
        ({0: "a"}, {0: ["a"]}, "at least 2"),
        ({0: "a", 1: "b"}, {0: ["a"], 1: []}, "non-empty"),
        ({0: "a", 1: "b"}, {0: ["a"], 1: "b"}, "non-empty"),
        ({0: ["a"], 1: "b"}, {0: ["a"], 1: ["b"]}, "one string"),
        ({0: "a", 1: "b"}, {0: ["..."], 1: ["!"]}, "empty after tokenization"),
    ],
)
def test_cider_bad_input(cands, refs, match):
    with pytest.raises(ValueError, match=match):
        M.cider(cands, refs)


# ---------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_subset_rule(k, expected):
    # Hand-derived: leaving out a matching answer leaves k-1 matches, another leaves k;
    # acc = (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10.
    answers = ["cat"] * k + ["dog", "bird", "fish", "cow", "pig", "hen", "ant", "bee", "elk", "owl"][: 10 - k]
    assert M.vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("none", "0"),
        ("isnt", "isn't"),
        ("isn't", "isn't"),
        ("Yes!", "yes"),
        ("black-and-white", "black and white"),
        ("left - right", "left right"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("  red\nball\t", "red ball"),
        ("ten", "10"),
    ],
)
def test_vqa_normalization(raw, normalized):
    assert M.normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_normalizes_both_sides_and_batch_mean():
    assert M.vqa_accuracy("Two", ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"]) == 1.0
    assert M.vqa_accuracy("The Dog.", ["dog"]) == 1.0  # single reference: exact match
    assert M.vqa_accuracy("cat", ["dog"]) == 0.0
    answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8]
    assert M.vqa_accuracy_mean(["Yes", "two"], answers) == pytest.approx((1.0 + 0.6) / 2)
    with pytest.raises(ValueError, match="non-empty"):
        M.vqa_accuracy("x", [])
    with pytest.raises(ValueError, match="predictions"):
        M.vqa_accuracy_mean(["x"], [])


# ---------------------------------------------------------------------------------------
# FID Inception (pytorch-fid layout) with random weights
# ---------------------------------------------------------------------------------------


def _expected_fid_inception_convs() -> dict[str, tuple[int, int, int, int]]:
    """conv name -> (out, in, kh, kw) of pytorch-fid's FID InceptionV3, written from the
    architecture (Szegedy et al. 2016 / torchvision layout), independent of the module."""
    convs = {
        "Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
        "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3),
    }
    for name, cin, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
        convs.update({
            f"{name}.branch1x1": (64, cin, 1, 1), f"{name}.branch5x5_1": (48, cin, 1, 1),
            f"{name}.branch5x5_2": (64, 48, 5, 5), f"{name}.branch3x3dbl_1": (64, cin, 1, 1),
            f"{name}.branch3x3dbl_2": (96, 64, 3, 3), f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
            f"{name}.branch_pool": (pool, cin, 1, 1),
        })
    convs.update({
        "Mixed_6a.branch3x3": (384, 288, 3, 3), "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
        "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    })
    for name, c in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        convs.update({
            f"{name}.branch1x1": (192, 768, 1, 1), f"{name}.branch7x7_1": (c, 768, 1, 1),
            f"{name}.branch7x7_2": (c, c, 1, 7), f"{name}.branch7x7_3": (192, c, 7, 1),
            f"{name}.branch7x7dbl_1": (c, 768, 1, 1), f"{name}.branch7x7dbl_2": (c, c, 7, 1),
            f"{name}.branch7x7dbl_3": (c, c, 1, 7), f"{name}.branch7x7dbl_4": (c, c, 7, 1),
            f"{name}.branch7x7dbl_5": (192, c, 1, 7), f"{name}.branch_pool": (192, 768, 1, 1),
        })
    convs.update({
        "Mixed_7a.branch3x3_1": (192, 768, 1, 1), "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    })
    for name, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:
        convs.update({
            f"{name}.branch1x1": (320, cin, 1, 1), f"{name}.branch3x3_1": (384, cin, 1, 1),
            f"{name}.branch3x3_2a": (384, 384, 1, 3), f"{name}.branch3x3_2b": (384, 384, 3, 1),
            f"{name}.branch3x3dbl_1": (448, cin, 1, 1), f"{name}.branch3x3dbl_2": (384, 448, 3, 3),
            f"{name}.branch3x3dbl_3a": (384, 384, 1, 3), f"{name}.branch3x3dbl_3b": (384, 384, 3, 1),
            f"{name}.branch_pool": (192, cin, 1, 1),
        })
    return convs


def _pytorch_fid_checkpoint(seed: int = 0, *, with_nbt: bool = True) -> dict[str, torch.Tensor]:
    """A random state dict in pytorch-fid's checkpoint format (incl. its 1008-way fc)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i, kh, kw) in _expected_fid_inception_convs().items():
        sd[f"{name}.conv.weight"] = torch.randn(o, i, kh, kw, generator=g) * math.sqrt(2.0 / (i * kh * kw))
        sd[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(o, generator=g)
        sd[f"{name}.bn.bias"] = 0.1 * torch.randn(o, generator=g)
        sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(o, generator=g)
        sd[f"{name}.bn.running_var"] = 1 + 0.1 * torch.rand(o, generator=g)
        if with_nbt:
            sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def test_fid_inception_keys_and_shapes_match_pytorch_fid_layout():
    model = FIDInceptionV3()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {}
    for name, (o, i, kh, kw) in _expected_fid_inception_convs().items():
        expected[f"{name}.conv.weight"] = (o, i, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{name}.bn.{stat}"] = (o,)
        expected[f"{name}.bn.num_batches_tracked"] = ()
    assert got == expected
    assert all(f.eps == 0.001 for f in model.modules() if isinstance(f, torch.nn.BatchNorm2d))
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    # torchvision's inception_v3 has 27,161,264 parameters (its docs); minus AuxLogits
    # (768*128 + 2*128 + 128*768*25 + 2*768 + 768*1000 + 1000) and fc (2048*1000 + 1000).
    aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - aux - (2048 * 1000 + 1000)


def _pool_probe(block, in_ch: int) -> torch.Tensor:
    """Output channels of the block's pool branch, with that branch's 1x1 conv and BN set
    to the identity, for a non-negative input holding single spikes."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
        block.branch_pool.conv.weight.copy_(torch.eye(in_ch).view(in_ch, in_ch, 1, 1))
        bn = block.branch_pool.bn
        bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
        block.eval()
        x = torch.zeros(1, in_ch, 6, 6)
        x[0, :, 0, 0] = 9.0  # corner spike
        x[0, :, 3, 3] = 18.0  # interior spike
        return block(x)[:, -in_ch:]


def _avg_pool_valid_only(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    out = np.zeros_like(x)
    for r in range(h):
        for c in range(w):
            win = x[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
            out[r, c] = win.sum() / win.size  # padding excluded from the count
    return out


@pytest.mark.parametrize(
    "make, in_ch, kind",
    [
        (lambda: InceptionA(16, pool_features=16), 16, "avg"),
        (lambda: InceptionC(192, channels_7x7=8), 192, "avg"),
        (lambda: InceptionE(192, pool="avg"), 192, "avg"),
        (lambda: InceptionE(192, pool="max"), 192, "max"),
    ],
)
def test_fid_blocks_pool_branch_semantics(make, in_ch, kind):
    out = _pool_probe(make(), in_ch)[0, 0].numpy()
    x = np.zeros((6, 6))
    x[0, 0], x[3, 3] = 9.0, 18.0
    if kind == "avg":  # TensorFlow-style: corner = 9/4 (4 valid cells), not 9/9
        ref = _avg_pool_valid_only(x)
    else:
        ref = np.array([[max(x[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].max(), 0) for c in range(6)]
                        for r in range(6)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_fid_inception_mixed_7b_avg_7c_max():
    model = FIDInceptionV3()
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")


@pytest.fixture(scope="module")
def fid_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    sd = _pytorch_fid_checkpoint(seed=0)
    torch.save(sd, path)
    return path, sd


def test_load_fid_inception_roundtrip_and_forward(fid_checkpoint):
    path, sd = fid_checkpoint
    model = load_fid_inception(path)
    loaded = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert not model.training
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("L")]
    feats = model.embed_image(images, batch_size=2)
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0
    assert not np.allclose(feats[0], feats[1])


@pytest.mark.parametrize("size", [(40, 56), (320, 400)])
def test_inception_preprocessing_is_plain_bilinear_to_299(size):
    # pytorch-fid resizes [0,1] RGB bilinearly (half-pixel centres, no antialias) to 299x299;
    # OpenCV's INTER_LINEAR on float input is an independent implementation of the same map.
    import cv2

    from cm3leon.eval.inception import _to_unit_tensor

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    got = _to_unit_tensor(Image.fromarray(arr))[0].permute(1, 2, 0).numpy()
    ref = cv2.resize(arr.astype(np.float32) / 255, (299, 299), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 weight round-off; a wrong mode errs by ~1e-1


def test_load_fid_inception_variants(tmp_path):
    from safetensors.torch import save_file

    sd = _pytorch_fid_checkpoint(seed=1, with_nbt=False)
    torch.save(sd, tmp_path / "old_format.pth")  # older checkpoints lack num_batches_tracked
    model = load_fid_inception(tmp_path / "old_format.pth")
    assert torch.equal(model.Mixed_6e.branch_pool.bn.running_var, sd["Mixed_6e.branch_pool.bn.running_var"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    model2 = load_fid_inception(tmp_path / "w.safetensors")
    assert torch.equal(model2.Conv2d_1a_3x3.conv.weight, sd["Conv2d_1a_3x3.conv.weight"])


def test_load_fid_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        load_fid_inception(tmp_path / "nope.pth")
    # Half precision keeps these throw-away files small; the loader casts to float32.
    sd = {k: v.half() for k, v in _pytorch_fid_checkpoint(seed=2, with_nbt=False).items()}
    cases = {
        "missing": {k: v for k, v in sd.items() if k != "Mixed_5b.branch1x1.conv.weight"},
        "unexpected": {**sd, "AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1)},
        "shape": {**sd, "Mixed_7c.branch_pool.bn.bias": torch.zeros(7)},
    }
    torch.save(sd, tmp_path / "ok_half.pth")
    assert load_fid_inception(tmp_path / "ok_half.pth").Mixed_5b.branch1x1.conv.weight.dtype == torch.float32
    for name, bad in cases.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match="missing keys|shape mismatch") as info:
            load_fid_inception(tmp_path / f"{name}.pth")
        assert {"missing": "Mixed_5b.branch1x1.conv.weight", "unexpected": "AuxLogits",
                "shape": "Mixed_7c.branch_pool.bn.bias"}[name] in str(info.value)
    torch.save({"model": object()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="plain PyTorch state dict"):
        load_fid_inception(tmp_path / "pickle.pth")
