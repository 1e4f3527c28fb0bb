"""generation_config.json: decoding defaults that travel with a model directory and that the
pipeline, the CLI and the server read, explicit arguments overriding them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cm3leon.generate.generation_config import (
    GENERATION_CONFIG,
    PAPER_DEFAULTS,
    GenerationConfig,
    TaskDecoding,
)
from cm3leon.generate.logits import SamplingConfig
from cm3leon.pipeline import CM3Leon
from helpers import build_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = GenerationConfig(
    text_to_image=TaskDecoding(SamplingConfig(temperature=0.5, top_p=1.0, guidance=1.5, cd_k=1, cd_alpha=0.3),
                               samples=3, rerank=True),
    edit=TaskDecoding(SamplingConfig(temperature=0.5, top_p=1.0, image_guidance=1.25, text_guidance=1.25)),
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("gencfg") / "model", resolution=16)


def test_round_trip_and_paper_defaults(tmp_path):
    assert GenerationConfig.from_dict(SMALL.to_dict()) == SMALL
    assert GenerationConfig.load(tmp_path) is PAPER_DEFAULTS  # no file: the paper's values
    t2i = PAPER_DEFAULTS.text_to_image.sampling
    assert (t2i.guidance, t2i.temperature, t2i.top_p) == (3.0, 1.0, 0.9)
    e = PAPER_DEFAULTS.edit.sampling
    assert (e.image_guidance, e.text_guidance) == (1.5, 7.5)
    assert PAPER_DEFAULTS.caption.sampling.greedy and PAPER_DEFAULTS.vqa.max_new_tokens == 16
    SMALL.save(tmp_path)
    assert GenerationConfig.load(tmp_path) == SMALL
    # a partial file keeps the paper defaults for everything it leaves out
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps({"edit": {"text_guidance": 2.0}}))
    got = GenerationConfig.load(tmp_path)
    assert got.edit.sampling.text_guidance == 2.0 and got.edit.sampling.image_guidance == 1.5
    assert got.text_to_image == PAPER_DEFAULTS.text_to_image


@pytest.mark.parametrize("body, words", [
    ({"t2i": {}}, "unknown tasks ['t2i']"),
    ({"edit": {"cfg": 2}}, "unknown decoding settings ['cfg']"),
    ({"edit": {"temperature": "hot"}}, "temperature must be a finite number"),
    ({"text_to_image": {"mode": "beam"}}, "mode must be one of"),
    ({"text_to_image": {"samples": 0}}, "samples must be a whole number >= 1"),
    ({"text_to_image": {"retrieve": 3}}, "retrieve must be 0, 1 or 2"),
    ([], "expected an object"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path, body, words):
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps(body))
    with pytest.raises(ValueError, match="generation_config.json") as e:
        GenerationConfig.load(tmp_path)
    assert words in str(e.value)


def test_replace_routes_fields_and_keeps_none():
    d = SMALL.text_to_image.replace(guidance=2.0, samples=5, temperature=None, seed=4)
    assert d.sampling.guidance == 2.0 and d.samples == 5 and d.sampling.seed == 4
    assert d.sampling.temperature == 0.5  # None keeps the stored value
    with pytest.raises(ValueError, match="unknown decoding settings"):
        SMALL.text_to_image.replace(cfg=2.0)


def test_the_pipeline_decodes_with_the_model_defaults(model_dir, tmp_path):
    """A model directory with generation_config.json: every task's defaults are its values,
    and the images equal an explicit call with the same values."""
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    SMALL.save(d)
    pipe = CM3Leon.from_pretrained(d)
    assert pipe.generation_config == SMALL
    res = pipe.generate_image("a red circle", seed=2)
    assert len(res.images) == 3 and res.scores is not None  # samples=3, re-ranked
    plain = CM3Leon.from_pretrained(model_dir)  # no file: paper defaults
    assert plain.generation_config is PAPER_DEFAULTS
    same = plain.generate_image("a red circle", n=3, guidance=1.5, temperature=0.5, top_p=1.0, rerank=True, seed=2)
    assert torch.equal(res.codes, same.codes)
    assert len(pipe.generate_image("a red circle", n=1, rerank=False, seed=2).images) == 1  # arguments override
    img = res.images[0]
    edited = pipe.edit(img, "make it blue", seed=1)[0]
    explicit = plain.edit(img, "make it blue", image_guidance=1.25, text_guidance=1.25, temperature=0.5, top_p=1.0,
                          seed=1)[0]
    assert list(edited.getdata()) == list(explicit.getdata())


def test_cli_generate_uses_the_model_defaults(model_dir, tmp_path, capsys):
    """`cm3leon generate` without decoding flags decodes with generation_config.json."""
    from cm3leon.cli import main

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    SMALL.save(d)
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(d), "a red circle", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CLIP scores" in printed and "3 images" in printed  # rerank and samples from the file
    assert main(["generate", "--model", str(d), "a red circle", "--n", "1", "--no-rerank", "--out",
                 str(tmp_path / "one.png")]) == 0
    assert "CLIP scores" not in capsys.readouterr().out


def test_server_and_page_default_to_the_model_defaults(model_dir, tmp_path):
    """The HTTP API fills every decoding field a request leaves out from generation_config.json,
    and /v1/info gives the page the same values."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from cm3leon.serve.app import ServeConfig, create_app

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    SMALL.save(d)
    pipe = CM3Leon.from_pretrained(d)
    with TestClient(create_app(pipe, ServeConfig(threads=1))) as client:
        info = client.get("/v1/info").json()
        assert info["defaults"] == SMALL.to_dict()
        r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 7})
        assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert all("clip_score" in x for x in data)  # re-ranked, as the file says
    ref = CM3Leon.from_pretrained(model_dir).generate_image("a red circle", n=2, guidance=1.5, temperature=0.5,
                                                            top_p=1.0, rerank=True, seed=7)
    got = [Image.open(io.BytesIO(base64.b64decode(x["b64_json"]))).convert("RGB") for x in data]
    assert [list(g.getdata()) for g in got] == [list(im.convert("RGB").getdata()) for im in ref.images]
