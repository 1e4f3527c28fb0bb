"""The server driven by the real ``openai`` Python SDK, as client code written for OpenAI's Images
API calls it (docs/serving.md, "OpenAI clients"): generations and edits with the fields clients
set (``model``, ``size``, ``quality``, ``style``, ``user``), sizes that are integer multiples of
the native one, list-form ``image``, ``mask`` (refused), variations, ``models.list`` /
``models.retrieve``, and errors in OpenAI's shape. Also ``/docs`` served from local files only
(and no ``/redoc``: ReDoc fetches its logo from a CDN), and ``/favicon.ico``.

The SDK's exceptions carry the unwrapped error object: ``e.body`` is ``{"message", "type",
"param", "code"}`` (the SDK strips the outer ``"error"``), ``e.param`` and ``e.code`` its fields;
the raw body is ``e.response.json()``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from cm3leon.pipeline import CM3Leon  # noqa: E402
from cm3leon.serve.app import ServeConfig, create_app  # noqa: E402
from helpers import build_tiny_model_dir, live_server  # noqa: E402

RES = 16  # the tiny model's native image size
MODEL_ID = "tiny-model"  # the served model's id: the model directory's name
ERROR_KEYS = {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CM3Leon]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared box: one thread is fastest
    d = build_tiny_model_dir(tmp_path_factory.mktemp("openai-sdk") / MODEL_ID, resolution=RES, encoder=False)
    yield CM3Leon.from_pretrained(d)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_url(pipe: CM3Leon) -> Iterator[str]:
    with live_server(create_app(pipe, ServeConfig(threads=1, model_name=MODEL_ID))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def photo() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def upscaled(img: Image.Image, k: int) -> Image.Image:
    return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def assert_openai_error(e: Any, status: int, needle: str, param: str | None = None,
                        code: str | None = None) -> None:
    """``e`` (an ``openai.APIStatusError``) is ``status`` with OpenAI's error object naming the problem."""
    assert e.status_code == status
    raw = e.response.json()
    assert set(raw) == {"error"} and set(raw["error"]) == ERROR_KEYS, raw
    assert e.body == raw["error"]
    assert needle in e.body["message"], e.body
    assert e.body["message"] in str(e)
    assert e.param == param and e.code == code


# ---------------------------------------------------------------------------- generations
def test_generate_with_the_fields_clients_set(client: Any, pipe: CM3Leon) -> None:
    r = client.images.generate(model="dall-e-3", prompt="a red circle at the top left", n=2, size=f"{RES}x{RES}",
                               quality="hd", style="vivid", user="user-1234", response_format="b64_json",
                               extra_body={"seed": 3})
    ref = pipe.generate_image("a red circle at the top left", n=2, seed=3)
    got = [decode(d.b64_json) for d in r.data]
    assert len(got) == 2 and all(im.size == (RES, RES) for im in got)
    assert all(same_pixels(a, b) for a, b in zip(got, ref.images))  # the ignored fields change nothing
    r = client.images.generate(prompt="a blue square", quality="standard", style="natural", size="auto")
    assert len(r.data) == 1 and decode(r.data[0].b64_json).size == (RES, RES)


@pytest.mark.parametrize("k", [2, 3])
def test_generate_at_a_multiple_of_the_native_size_is_nearest_upscaled(client: Any, pipe: CM3Leon, k: int) -> None:
    size = f"{k * RES}x{k * RES}"
    r = client.images.generate(model="gpt-image-1", prompt="a blue square in the middle", n=2, size=size,
                               quality="high", extra_body={"seed": 5})
    ref = pipe.generate_image("a blue square in the middle", n=2, seed=5)
    got = [decode(d.b64_json) for d in r.data]
    assert [im.size for im in got] == [(k * RES, k * RES)] * 2
    for im, native in zip(got, ref.images):
        assert same_pixels(im, upscaled(native, k))  # every native pixel is a k x k block


def test_the_stream_endpoint_upscales_its_result(base_url: str, pipe: CM3Leon) -> None:
    body = {"prompt": "a red circle", "size": f"{2 * RES}x{2 * RES}", "seed": 2, "quality": "low"}
    with httpx.stream("POST", f"{base_url}/v1/images/generations/stream", json=body, timeout=120) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    events = re.findall(r"event: (\w+)\ndata: (.*)\n\n", text)
    assert events[-1][0] == "result"
    result = json.loads(events[-1][1])
    ref = pipe.generate_image("a red circle", seed=2)
    assert same_pixels(decode(result["data"][0]["b64_json"]), upscaled(ref.images[0], 2))
    previews = [json.loads(d) for e, d in events if e == "progress"]
    assert previews and decode(previews[-1]["images"][0]).size == (RES, RES)  # previews stay native


@pytest.mark.parametrize("size", ["100x100", "256x128", "4096x4096", "0x0"])
def test_a_size_the_model_cannot_make_is_422_naming_the_native_size_and_multiples(client: Any, size: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="a red circle", size=size)
    assert_openai_error(e.value, 422, f"size {size!r} is not available: this model makes {RES}x{RES} images",
                        param="size", code="invalid_size")
    msg = e.value.body["message"]
    assert f"'{2 * RES}x{2 * RES}'" in msg and "'2048x2048'" in msg and "nearest-neighbour" in msg


# ---------------------------------------------------------------------------- edits
def test_edit_with_model_size_and_list_form_image(client: Any, pipe: CM3Leon, photo: bytes) -> None:
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    ref = pipe.edit(img, "make the square yellow", n=2, seed=4)
    r = client.images.edit(image=[("photo.png", photo, "image/png")], prompt="make the square yellow", n=2,
                           model="gpt-image-1", size=f"{2 * RES}x{2 * RES}", quality="medium", user="user-1",
                           response_format="b64_json", extra_body={"seed": 4})
    got = [decode(d.b64_json) for d in r.data]
    assert len(got) == 2
    assert all(same_pixels(a, upscaled(b, 2)) for a, b in zip(got, ref))
    # the single-file form, native size
    r = client.images.edit(image=("photo.png", photo, "image/png"), prompt="make the square yellow", n=2,
                           model="dall-e-2", size=f"{RES}x{RES}", extra_body={"seed": 4})
    assert all(same_pixels(decode(a.b64_json), b) for a, b in zip(r.data, ref))


def test_edit_with_several_images_is_422_naming_the_limit(client: Any, photo: bytes) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=[("a.png", photo, "image/png"), ("b.png", photo, "image/png")], prompt="x")
    assert_openai_error(e.value, 422, "got 2 images; this endpoint takes 1 image per request", param="image",
                        code="too_many_images")


def test_edit_with_a_mask_is_422_saying_masks_are_not_supported(client: Any, photo: bytes) -> None:
    mask = png_bytes(Image.new("RGBA", (RES, RES), (0, 0, 0, 0)))
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=("p.png", photo, "image/png"), mask=("m.png", mask, "image/png"),
                           prompt="make the square yellow", model="dall-e-2", size=f"{RES}x{RES}")
    assert_openai_error(e.value, 422, "mask is not supported: this model edits from instructions; omit mask",
                        param="mask", code="unsupported_parameter")


def test_edit_size_is_checked_like_generations(client: Any, photo: bytes) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=("p.png", photo, "image/png"), prompt="x", size="1024x1536")
    assert_openai_error(e.value, 422, f"this model makes {RES}x{RES} images", param="size", code="invalid_size")


# ---------------------------------------------------------------------------- variations
def test_create_variation_captions_the_image_then_draws_the_caption(client: Any, pipe: CM3Leon,
                                                                    photo: bytes) -> None:
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    r = client.images.create_variation(image=("photo.png", photo, "image/png"), n=2, model="dall-e-2",
                                       size=f"{2 * RES}x{2 * RES}", user="user-1", response_format="b64_json",
                                       extra_body={"seed": 7})
    assert len(r.data) == 2
    prompt = r.data[0].revised_prompt
    assert prompt and all(d.revised_prompt == prompt for d in r.data)
    assert pipe.caption(img).strip().startswith(prompt)  # the caption, cut to fit the context if need be
    ref = pipe.generate_image(prompt, n=2, seed=7)
    assert all(same_pixels(decode(a.b64_json), upscaled(b, 2)) for a, b in zip(r.data, ref.images))


def test_a_variation_of_an_image_the_model_cannot_caption_is_an_error(pipe: CM3Leon, photo: bytes) -> None:
    class Mute:
        def __init__(self, inner: CM3Leon) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def captions(self, images: list, **kw: Any) -> list[str]:
            return [" " for _ in images]

    with live_server(create_app(Mute(pipe), ServeConfig(threads=1))) as url:  # type: ignore[arg-type]
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as e:
            c.images.create_variation(image=("p.png", photo, "image/png"))
    assert_openai_error(e.value, 500, "the model's caption of this image is empty", code="empty_caption")


# ---------------------------------------------------------------------------- models
def test_models_list_and_retrieve(client: Any, base_url: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    m = models.data[0]
    assert m.object == "model" and m.owned_by == "cm3leon" and isinstance(m.created, int)
    raw = httpx.get(f"{base_url}/v1/models").json()
    assert raw == {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": m.created,
                                              "owned_by": "cm3leon"}]}
    got = client.models.retrieve(MODEL_ID)
    assert (got.id, got.object, got.created, got.owned_by) == (MODEL_ID, "model", m.created, "cm3leon")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-3")
    assert_openai_error(e.value, 404, f"model 'dall-e-3' is not served here; this server serves {MODEL_ID!r}",
                        param="model", code="model_not_found")


# ---------------------------------------------------------------------------- errors
def test_sdk_errors_name_the_problem(client: Any) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="a red circle", extra_body={"colour": "red"})
    assert_openai_error(e.value, 422, "unknown field 'colour'; allowed fields: prompt, n,", param="colour",
                        code="unknown_parameter")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="a red circle", response_format="url")
    assert_openai_error(e.value, 422, "'url' is not supported", param="response_format", code="invalid_value")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="   ")
    assert_openai_error(e.value, 422, "prompt is empty", param="prompt", code="invalid_value")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", extra_body={"retrieve": 1})
    assert_openai_error(e.value, 400, "retrieve > 0 needs a retrieval memory", param="retrieve")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.edit(image=("p.png", b"", "image/png"), prompt="x", extra_body={"strength": "0.5"})
    assert_openai_error(e.value, 422, "unknown field 'strength'", param="strength", code="unknown_parameter")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("cat.png", b"GIF89a not really", "image/png"), prompt="x")
    assert_openai_error(e.value, 400, "'cat.png' is not a readable image")


def test_every_error_status_has_the_openai_shape(base_url: str, photo: bytes) -> None:
    cases = [
        ("GET", "/v1/nothing", {}, 404),
        ("GET", "/v1/images/generations", {}, 405),
        ("POST", "/v1/images/generations", {"content": b"{not json", "headers": {"content-type": "application/json"}},
         422),
        ("POST", "/v1/captions", {"json": {"image": "aGVsbG8="}}, 415),
        ("POST", "/v1/images/edits", {"files": {"image": ("h.png", b"\0" * (11 * 2**20), "image/png")},
                                      "data": {"prompt": "x"}}, 413),
        ("POST", "/v1/images/variations", {"files": {"image": ("p.png", photo, "image/png")},
                                           "data": {"n": "99"}}, 422),
        ("GET", "/v1/models/other", {}, 404),
    ]
    for method, path, kw, status in cases:
        r = httpx.request(method, base_url + path, timeout=60, **kw)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, (path, body)
        assert body["error"]["message"] and body["error"]["type"], (path, body)


# ---------------------------------------------------------------------------- /docs, /redoc, /favicon.ico
URL_ATTR = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def test_docs_page_references_only_this_server(base_url: str) -> None:
    r = httpx.get(base_url + "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    refs = [a or b for a, b in URL_ATTR.findall(r.text)]
    assert "/openapi.json" in refs and "/favicon.ico" in refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
        got = httpx.get(base_url + ref)
        assert got.status_code == 200 and got.content, ref
    scripts = [x for x in refs if x.endswith(".js")]
    assert scripts and all(len(httpx.get(base_url + x).content) > 100_000 for x in scripts)  # the real bundle
    assert httpx.get(f"{base_url}/redoc").status_code == 404


def test_favicon(base_url: str) -> None:
    r = httpx.get(f"{base_url}/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    icon = Image.open(io.BytesIO(r.content))
    assert icon.format == "ICO" and icon.size == (32, 32)


CHROMIUM = os.environ.get("CM3LEON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed: apt-get install -y chromium")
def test_docs_render_in_a_browser_without_external_requests(base_url: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright not installed")
    spec = httpx.get(f"{base_url}/openapi.json").json()
    n_ops = sum(len(ops) for ops in spec["paths"].values())
    outside: list[str] = []

    def guard(route: Any) -> None:  # every request outside the server is recorded and refused
        if route.request.url.startswith(base_url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                   args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                         "--disable-background-networking",
                                                         "--disable-component-update", "--disable-sync"])
        try:
            page = ctx.new_page()
            page.route("**/*", guard)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base_url}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() == n_ops
            assert page.locator(".opblock-summary-path", has_text="/v1/images/variations").count() == 1
            page.locator(".opblock-summary-path", has_text="/v1/images/edits").click()  # expand: the form fields
            page.wait_for_selector(".opblock.is-open .parameters-col_description, .opblock.is-open .model-box",
                                   timeout=10_000)
            opened = page.locator(".opblock.is-open").inner_text()
            assert "multipart/form-data" in opened and "image_guidance" in opened  # the form schema is rendered
            assert errors == []
        finally:
            ctx.close()
    assert outside == []
