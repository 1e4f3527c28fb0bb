"""The pipeline as a user drives it: loading a model directory, every task, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cm3leon.generate.guidance import unconditional_prompt
from cm3leon.pipeline import CM3Leon
from helpers import build_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("pipe") / "model", resolution=16)


@pytest.fixture(scope="module")
def pipe(model_dir) -> CM3Leon:
    return CM3Leon.from_pretrained(model_dir)


def _img(color=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (16, 16), color)


def test_generate_images_shapes_and_determinism(pipe):
    res = pipe.generate_images(["a red circle", "a blue square at the top left"], n=3, seed=7)
    assert len(res) == 2 and all(len(r.images) == 3 for r in res)
    L = pipe.vocab.image_seq_len
    assert all(tuple(r.codes.shape) == (3, L) for r in res)
    assert all(im.size == (16, 16) for r in res for im in r.images)
    again = pipe.generate_images(["a red circle", "a blue square at the top left"], n=3, seed=7)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(res, again))


def test_generate_matches_direct_decode_with_paper_prompt(pipe):
    """The pipeline's t2i prompt is exactly `<eos> caption <break>` with the `<mask:0>` uncond stream."""
    from cm3leon.generate.decode import generate_image_tokens
    from cm3leon.generate.logits import SamplingConfig

    v = pipe.vocab
    cond = [v.eos_id, *pipe.text_ids("a red circle"), v.break_id]
    assert unconditional_prompt(cond, v) == [v.eos_id, v.mask_id(0), v.break_id]
    direct = generate_image_tokens(pipe.model, v, [cond], SamplingConfig(guidance=2.0, seed=3),
                                   uncond_prompts=[unconditional_prompt(cond, v)], n_per_prompt=2)
    via = pipe.generate_image("a red circle", n=2, guidance=2.0, seed=3)
    assert torch.equal(direct, via.codes)


def test_rerank_orders_by_clip_score(pipe):
    res = pipe.generate_image("a red circle", n=4, rerank=True, seed=1)
    assert res.scores is not None and res.scores == sorted(res.scores, reverse=True)


def test_a_reranker_directory_re_ranks_instead_of_the_retrieval_encoder(pipe, model_dir, tmp_path):
    import numpy as np

    from cm3leon.pipeline import ENCODER_DIR, RERANKER_DIR

    assert pipe.reranker is pipe.encoder  # no reranker/: the retrieval encoder re-ranks
    d = tmp_path / "with_reranker"
    shutil.copytree(model_dir, d)
    shutil.copytree(d / ENCODER_DIR, d / RERANKER_DIR)
    loaded = CM3Leon.from_pretrained(d)
    assert loaded.reranker is not None and loaded.reranker is not loaded.encoder

    class Brightest:  # cosine with the prompt grows with the image's mean brightness b: (b, 1 - b) . (1, 0)
        def embed_text(self, texts):
            return np.tile(np.array([[1.0, 0.0]], np.float32), (len(texts), 1))

        def embed_image(self, images):
            b = [float(np.asarray(im, np.float32).mean()) / 255 for im in images]
            return np.array([[x, 1 - x] for x in b], np.float32)

    loaded.reranker = Brightest()
    res = loaded.generate_image("a red circle", n=4, rerank=True, seed=1)
    bright = [float(np.asarray(im, np.float32).mean()) for im in res.images]
    assert bright == sorted(bright, reverse=True)
    loaded.reranker = None
    loaded.encoder = None
    with pytest.raises(ValueError, match="reranker/ or retrieval/encoder"):
        loaded.generate_image("a red circle", n=2, rerank=True)


def test_sampling_modes_run(pipe):
    for kw in ({"cd_k": 4}, {"mode": "mix"}, {"mode": "cd_k"}, {"guidance": 1.0, "top_k": 5}):
        r = pipe.generate_image("a green triangle", n=2, **kw)
        assert len(r.images) == 2


def test_cd_alpha_one_keeps_only_the_conditional_argmax(pipe):
    # CD-K with k=1, alpha=1: the candidate set is the conditional argmax alone, so every
    # sample and every seed decodes the same greedy image; cd_alpha reaches the sampler.
    codes = [pipe.generate_image("a red circle", n=3, cd_k=1, cd_alpha=1.0, seed=s).codes for s in (0, 1)]
    assert torch.equal(codes[0], codes[1]) and all(torch.equal(codes[0][0], c) for c in codes[0])
    with pytest.raises(ValueError, match="cd_alpha"):
        pipe.generate_image("a red circle", cd_k=1, cd_alpha=0.0)


def test_text_tasks(pipe):
    caps = pipe.captions([_img(), _img((0, 0, 255))], max_new_tokens=6)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert isinstance(pipe.caption(_img(), detailed=True, max_new_tokens=4), str)
    assert isinstance(pipe.answer(_img(), "what color is it?", max_new_tokens=4), str)
    assert isinstance(pipe.complete_text("a red", max_new_tokens=4), str)


def test_image_tasks(pipe):
    small = CM3Leon(pipe.model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer)
    assert len(small.edit(_img(), "make it blue", n=2)) == 2
    assert small.control("edge", _img((0, 0, 0)), "a red circle")[0].size == (16, 16)
    assert len(small.ground("a red circle", [("red circle", [2, 2, 10, 10])])) == 1


def test_infill_text_and_image(pipe):
    v = pipe.vocab
    codes = pipe.encode_images([_img()])[0].tolist()
    ids = [v.eos_id, v.mask_id(0), v.break_id, *v.codes_to_ids(codes), v.infill_id]
    out = pipe.infill(ids, kind="text", max_new_tokens=5)
    assert all(v.text_offset <= i < v.image_offset for i in out)
    img = pipe.infill([v.eos_id, *pipe.text_ids("a red circle"), v.break_id], kind="image")
    assert len(img) == v.image_seq_len and all(i >= v.image_offset for i in img)
    # a span cut out of the middle of an image: the places after it are unknown, so refused
    image = v.codes_to_ids(codes)
    partial = [v.eos_id, *pipe.text_ids("a red circle"), v.break_id, *image[:5], v.mask_id(0), *image[9:], v.break_id,
               v.eos_id, v.mask_id(0)]
    with pytest.raises(ValueError, match="run of 5 image ids where a whole image has"):
        pipe.infill(partial, kind="image")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.generate_image(""), "empty"),
        (lambda p: p.generate_image("a" * 5000), "limit"),
        (lambda p: p.generate_image("x", n=0), "n must be"),
        (lambda p: p.generate_image("x", guidance=float("nan")), "finite"),
        (lambda p: p.generate_image("x", retrieve=1), "retrieval memory"),
        (lambda p: p.generate_image("x", retrieve=5), "0, 1 or 2"),
        (lambda p: p.control("sketchy", _img(), "x"), "unknown control kind"),
        (lambda p: p.answers([_img()], ["a", "b"]), "1 images for 2"),
    ],
)
def test_bad_input(pipe, call, match):
    with pytest.raises(ValueError, match=match):
        call(pipe)


def test_prompt_longer_than_context_is_refused(pipe):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        pipe.generate_image(" ".join(["red circle"] * 180))


def test_unreadable_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.caption(bad)
    with pytest.raises(FileNotFoundError):
        pipe.caption(tmp_path / "missing.png")


def test_missing_and_mismatched_parts(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "image_tokenizer")
    with pytest.raises(FileNotFoundError, match="image_tokenizer"):
        CM3Leon.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not found"):
        CM3Leon.from_pretrained(tmp_path / "nowhere")
    trunc = tmp_path / "trunc"
    shutil.copytree(model_dir, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CM3Leon.from_pretrained(trunc)
