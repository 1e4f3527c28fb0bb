"""Evaluation metrics: Fréchet distance (FID / FD-CLIP), CLIP score, CIDEr, VQA accuracy.

Pure functions: arrays, strings and encoder objects in, floats out. Encoders are passed
in (never imported here) and only need the retrieval-encoder protocol:

- ``embed_image(list[PIL.Image]) -> np.ndarray[N, D]`` for Fréchet-distance features
  (the CLIP image tower for FD-CLIP, or :class:`cm3leon.eval.inception.FIDInceptionV3`
  for Inception FID as in the paper's Table 1);
- plus ``embed_text(list[str]) -> np.ndarray[N, D]`` for the CLIP score.

See docs/evaluation.md for each metric's reference and caveats.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image
from scipy import linalg

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class ImageEmbedder(Protocol):
    """Anything that maps PIL images to feature vectors (CLIP image tower, FID Inception)."""

    def embed_image(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class TextImageEmbedder(ImageEmbedder, Protocol):
    """A dual encoder with a text and an image tower in one embedding space (CLIP)."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------


def _as_feature_matrix(feats: Any, name: str) -> np.ndarray:
    if hasattr(feats, "detach"):  # torch.Tensor, without importing torch here
        feats = feats.detach().cpu().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] of features, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 feature rows to estimate a covariance, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; check the feature extractor's input range")
    return arr


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D] (numpy or torch)."""
    arr = _as_feature_matrix(feats, "feats")
    if arr.shape[0] <= arr.shape[1]:
        logger.warning(
            "Fréchet statistics from %d samples of %d-d features: the covariance is rank-deficient "
            "and the distance is biased upwards; compare only numbers computed with the same N",
            arr.shape[0],
            arr.shape[1],
        )
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


def frechet_distance_from_stats(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b).

    ``|mu_a - mu_b|^2 + tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2))``, with the
    matrix square root from ``scipy.linalg.sqrtm``; if that is not finite (singular
    product) ``eps * I`` is added to both covariances, and a non-negligible imaginary
    part on the diagonal (> 1e-3) is an error, as in pytorch-fid.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(
            f"statistics disagree in dimension: mu_a {mu_a.shape}, mu_b {mu_b.shape}, "
            f"sigma_a {sigma_a.shape}, sigma_b {sigma_b.shape}; use the same feature extractor for both sets"
        )
    diff = mu_a - mu_b
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        logger.warning("sqrtm of the covariance product is singular; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(
                f"matrix square root has an imaginary diagonal component of {max_imag:.3g}: the covariances "
                "are too ill-conditioned; use more samples or a larger eps"
            )
        covmean = covmean.real
    dist = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(dist, 0.0)  # a distance; tiny negatives are round-off of identical sets


def frechet_distance(feats_a: Any, feats_b: Any, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    a, b = _as_feature_matrix(feats_a, "feats_a"), _as_feature_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ ({a.shape[1]} vs {b.shape[1]}); extract both sets with the same model"
        )
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b), eps=eps)


def image_features(images: Sequence[Image.Image], embedder: ImageEmbedder, *, batch_size: int = 64) -> np.ndarray:
    """Features [N, D] (float64) of PIL images from any ``embed_image`` encoder, in batches."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not hasattr(embedder, "embed_image"):
        raise ValueError(f"{type(embedder).__name__} has no embed_image(list[PIL]) method; pass a CLIP "
                         "encoder from cm3leon.retrieval or an Inception model from load_fid_inception")
    if len(images) == 0:
        raise ValueError("no images given")
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        feats = np.asarray(embedder.embed_image(batch), dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != len(batch):
            raise ValueError(f"embed_image returned shape {feats.shape} for {len(batch)} images; expected [N, D]")
        chunks.append(feats)
    return np.concatenate(chunks)


def fid(
    reference_images: Sequence[Image.Image],
    generated_images: Sequence[Image.Image],
    embedder: ImageEmbedder,
    *,
    batch_size: int = 64,
) -> float:
    """Fréchet distance between two image sets in ``embedder``'s feature space.

    With a CLIP image tower this is FD-CLIP; with :class:`FIDInceptionV3` it is the
    Inception FID of the paper. The two are on different scales and never comparable.
    """
    ref = image_features(reference_images, embedder, batch_size=batch_size)
    gen = image_features(generated_images, embedder, batch_size=batch_size)
    return frechet_distance(ref, gen)


# ---------------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------------


def clip_scores(
    texts: Sequence[str], images: Sequence[Image.Image], encoder: TextImageEmbedder, *, batch_size: int = 64
) -> np.ndarray:
    """Per-pair CLIP scores ``100 * max(cos(text_i, image_i), 0)`` as float64 [N]."""
    if len(texts) != len(images):
        raise ValueError(f"got {len(texts)} texts but {len(images)} images; CLIP score needs aligned pairs")
    if len(texts) == 0:
        raise ValueError("no text/image pairs given")
    if not hasattr(encoder, "embed_text"):
        raise ValueError(f"{type(encoder).__name__} has no embed_text(list[str]) method; pass a CLIP-style encoder")
    text_emb = np.concatenate(
        [np.asarray(encoder.embed_text(list(texts[i : i + batch_size])), np.float64)
         for i in range(0, len(texts), batch_size)]
    )
    image_emb = image_features(images, encoder, batch_size=batch_size)
    if text_emb.shape != image_emb.shape:
        raise ValueError(f"text embeddings {text_emb.shape} and image embeddings {image_emb.shape} differ in shape")
    norms = np.linalg.norm(text_emb, axis=1) * np.linalg.norm(image_emb, axis=1)
    if np.any(norms == 0):
        raise ValueError("the encoder returned a zero embedding; cosine similarity is undefined")
    cos = np.sum(text_emb * image_emb, axis=1) / norms
    return 100.0 * np.maximum(cos, 0.0)


def clip_score(
    texts: Sequence[str], images: Sequence[Image.Image], encoder: TextImageEmbedder, *, batch_size: int = 64
) -> float:
    """Mean CLIP score over aligned (text, image) pairs, in [0, 100]."""
    return float(clip_scores(texts, images, encoder, batch_size=batch_size).mean())


# ---------------------------------------------------------------------------------------
# CIDEr (CIDEr-D, as in the COCO caption toolkit)
# ---------------------------------------------------------------------------------------

_CLITIC = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m)\b")
_NOT = re.compile(r"(?<=\w)n't\b")
_SPLIT_PUNCT = re.compile(r"[;!?\"`()\[\]{}]|,(?!\d)|(?<!\d),|:(?!\d)|(?<!\d):")
_EDGE_PUNCT = "'\".,:;!?`-"


def caption_tokens(text: str) -> str:
    """PTB-like caption normalization: lowercase, clitics split, punctuation dropped.

    Approximates the COCO toolkit's Java PTBTokenizer + punctuation filter (which needs
    Java): ``"The dog's ball, isn't it?"`` -> ``"the dog 's ball is n't it"``. Inner
    hyphens and decimal points are kept (``"well-known"``, ``"3.5"``).
    """
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = text.replace("\u2019", "'")
    text = _SPLIT_PUNCT.sub(" ", text)
    text = _NOT.sub(" n't", text)
    text = _CLITIC.sub(r" \1", text)
    out = []
    for tok in text.split():
        if tok in ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m"):
            out.append(tok)
            continue
        tok = tok.strip(_EDGE_PUNCT)
        if tok:
            out.append(tok)
    return " ".join(out)


def _check_caption_inputs(candidates: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> None:
    if set(candidates) != set(references):
        only_c = sorted(map(str, set(candidates) - set(references)))[:5]
        only_r = sorted(map(str, set(references) - set(candidates)))[:5]
        raise ValueError(f"candidates and references must have the same ids; only in candidates: {only_c}, "
                         f"only in references: {only_r}")
    if len(candidates) < 2:
        raise ValueError(
            f"CIDEr needs a corpus of at least 2 images (its idf is log(#images / df), which is 0 for one "
            f"image), got {len(candidates)}"
        )
    for key, cand in candidates.items():
        if not isinstance(cand, str):
            raise ValueError(f"candidate for id {key!r} must be one string, got {type(cand).__name__}")
        refs = references[key]
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for id {key!r} must be a non-empty list of strings, got {refs!r}")


def cider_scores(candidates: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> dict[K, float]:
    """Per-image CIDEr-D (pycocoevalcap's ``Cider``: n=1..4, sigma=6, clipped, x10).

    ``candidates[id]`` is one generated caption, ``references[id]`` its human captions;
    both are normalized by :func:`caption_tokens`. The idf comes from this corpus's
    references, so scores depend on the whole set (and are 0 for n-grams every image shares).
    """
    from pycocoevalcap.cider.cider import Cider

    _check_caption_inputs(candidates, references)
    keys = list(candidates)
    res = {i: [caption_tokens(candidates[k])] for i, k in enumerate(keys)}
    gts = {i: [caption_tokens(r) for r in references[k]] for i, k in enumerate(keys)}
    if not any(r for refs in gts.values() for r in refs):
        raise ValueError("every reference caption is empty after tokenization; CIDEr needs reference words")
    _, per_image = Cider().compute_score(gts, res)
    return {k: float(s) for k, s in zip(keys, per_image)}


def cider(candidates: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_scores` (COCO papers report it x100)."""
    return float(np.mean(list(cider_scores(candidates, references).values())))


# ---------------------------------------------------------------------------------------
# VQA accuracy (VQA challenge evaluation, GT-Vision-Lab/VQA vqaEval.py)
# ---------------------------------------------------------------------------------------

# The official tables, verbatim (including their quirks: capitalised keys never match
# after lowercasing, and "somebody'd" maps to "somebodyd").
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: in effect "a period not followed by a digit"
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text: str) -> str:
    out = text
    digit_comma = _VQA_COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        # A mark touching a space (or any text with a digit comma, "1,000") is deleted;
        # otherwise it separates words ("black-and-white" -> "black and white").
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD_STRIP.sub("", out)


def _vqa_digit_article(text: str) -> str:
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA challenge's answer normalization (processPunctuation + processDigitArticle).

    Whitespace cleanup, punctuation rules, lowercasing, number words to digits
    ("two" -> "2"), articles dropped, apostrophe-less contractions restored ("isnt" -> "isn't").
    """
    if not isinstance(answer, str):
        raise ValueError(f"VQA answers must be strings, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digit_article(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2).

    ``mean over leave-one-out subsets of min(#matching answers in subset / 3, 1)``, after
    normalizing the prediction and every answer. With 10 answers of which k match this
    gives 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >=4. A single reference answer has no
    leave-one-out subset, so it is scored by exact match after normalization.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    per_subset = [min((total - int(left_out)) / 3.0, 1.0) for left_out in matches]
    return float(sum(per_subset) / len(per_subset))


def vqa_accuracy_mean(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` over questions (the VQA 'overall' number, as a fraction)."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} questions")
    if len(predictions) == 0:
        raise ValueError("no questions given")
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, answers)]))
