"""CM3Leon.interleaved: text and images mixed in one prompt, continued with text or an image, laid
out as one document (cm3leon's <break> layout here; a converted model's markers in
tests/train/test_sft_chameleon_cli.py)."""

from __future__ import annotations

import pytest
from PIL import Image

import cm3leon.pipeline as pipeline_mod
from cm3leon.generate.guidance import unconditional_prompt
from cm3leon.pipeline import CM3Leon
from helpers import build_tiny_model_dir, one_thread


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> CM3Leon:
    with one_thread():
        return CM3Leon.from_pretrained(build_tiny_model_dir(tmp_path_factory.mktemp("m"), resolution=16,
                                                            encoder=False))


def spy_prompts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], list[int] | None]]:
    """Record (kind, prompt, unconditional prompt) of every decode the pipeline starts."""
    seen: list[tuple[str, list[int], list[int] | None]] = []
    text, image = pipeline_mod.generate_text, pipeline_mod.generate_image_tokens

    def spy_text(model, vocab, prompts, cfg, **kw):  # noqa: ANN001, ANN202
        seen.append(("text", list(prompts[0]), None))
        return text(model, vocab, prompts, cfg, **kw)

    def spy_image(model, vocab, prompts, cfg, **kw):  # noqa: ANN001, ANN202
        un = kw.get("uncond_prompts")
        seen.append(("image", list(prompts[0]), list(un[0]) if un else None))
        return image(model, vocab, prompts, cfg, **kw)

    monkeypatch.setattr(pipeline_mod, "generate_text", spy_text)
    monkeypatch.setattr(pipeline_mod, "generate_image_tokens", spy_image)
    return seen


def test_interleaved_prompts_are_one_document(model: CM3Leon, monkeypatch: pytest.MonkeyPatch):
    v, img = model.vocab, Image.new("RGB", (16, 16), (200, 30, 30))
    codes = v.codes_to_ids(model.encode_images([img])[0].tolist())
    seen = spy_prompts(monkeypatch)
    with one_thread():
        out = model.interleaved(["a red", img, "b"], output="text", max_new_tokens=3)
        assert isinstance(out, str)
        images = model.interleaved(["a red", img, "make it blue"], output="image", n=2, guidance=2.0)
        assert len(images) == 2 and images[0].size == (16, 16)
        model.interleaved([img], output="text", max_new_tokens=2)
    (_, p1, _), (_, p2, u2), (_, p3, _) = seen
    a, b, blue = model.text_ids("a red"), model.text_ids("b"), model.text_ids("make it blue")
    assert p1 == [v.eos_id, *a, v.break_id, *codes, v.break_id, *b]  # the last text goes on
    assert p2 == [v.eos_id, *a, v.break_id, *codes, v.break_id, *blue, v.break_id]
    assert u2 == unconditional_prompt(p2, v)
    assert p3 == [v.eos_id, *codes, v.break_id]  # after an image: a new text segment


def test_interleaved_errors(model: CM3Leon):
    with pytest.raises(ValueError, match="no prompt parts"):
        model.interleaved([])
    with pytest.raises(ValueError, match="output must be"):
        model.interleaved(["a"], output="video")
