"""The HTTP API (issue #9) on a tiny random model: every endpoint, every validation error,
429/504/disconnects, Prometheus metrics, and dynamic batching; plus the batcher alone."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cm3leon.pipeline import CM3Leon  # noqa: E402
from cm3leon.serve.app import ServeConfig, create_app  # noqa: E402
from cm3leon.serve.batcher import BatcherConfig, DynamicBatcher, QueueFullError  # noqa: E402
from helpers import build_tiny_model_dir, live_server  # noqa: E402

RES = 16  # the tiny model's image size


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CM3Leon]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core box: one thread is much faster
    d = build_tiny_model_dir(tmp_path_factory.mktemp("serve") / "model", resolution=RES)
    yield CM3Leon.from_pretrained(d)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(pipe: CM3Leon) -> Iterator[TestClient]:
    with TestClient(create_app(pipe, ServeConfig(threads=1))) as c:
        yield c


class GatedPipeline:
    """The real pipeline behind a gate: ``generate_images`` records its call, then waits until
    the test opens the gate (a slow model on demand)."""

    def __init__(self, pipe: CM3Leon) -> None:
        self._pipe = pipe
        self.gate = threading.Event()
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def generate_images(self, prompts: list[str], **kw: Any) -> Any:
        self.calls.append((list(prompts), kw))
        assert self.gate.wait(30), "test never opened the gate"
        return self._pipe.generate_images(prompts, **kw)


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def metric_samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` parsed by prometheus_client's own parser."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def photo(pipe: CM3Leon) -> bytes:
    """A PNG at the model's resolution (a generated one: any RGB image works)."""
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)))


# ---------------------------------------------------------------------------- happy paths
def test_generation_returns_n_pngs_at_model_size(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a red circle at the top left", "n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["created"] - time.time()) < 120
    assert len(body["data"]) == 3
    for item in body["data"]:
        assert set(item) == {"b64_json"}
        assert decode(item["b64_json"]).size == (RES, RES)
    ok = client.post("/v1/images/generations", json={"prompt": "a blue square", "size": f"{RES}x{RES}",
                                                     "response_format": "b64_json", "model": "anything"})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_seeded_generation_equals_the_pipeline(client: TestClient, pipe: CM3Leon) -> None:
    opts = {"n": 2, "seed": 7, "guidance": 2.0, "temperature": 0.9, "top_p": 0.8}
    r = client.post("/v1/images/generations", json={"prompt": "a blue square in the middle", **opts})
    assert r.status_code == 200, r.text
    ref = pipe.generate_image("a blue square in the middle", **opts)
    got = [decode(d["b64_json"]) for d in r.json()["data"]]
    assert len(got) == 2 and all(same_pixels(a, b) for a, b in zip(got, ref.images))
    cdk = client.post("/v1/images/generations", json={"prompt": "a blue square", "seed": 3, "cd_k": 4, "top_k": 5})
    ref = pipe.generate_image("a blue square", seed=3, cd_k=4, top_k=5)
    assert same_pixels(decode(cdk.json()["data"][0]["b64_json"]), ref.images[0])


def test_rerank_orders_images_by_clip_score(client: TestClient, pipe: CM3Leon) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "two green triangles", "n": 4, "seed": 5,
                                                    "rerank": True})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    scores = [d["clip_score"] for d in data]
    assert scores == sorted(scores, reverse=True)
    ref = pipe.generate_image("two green triangles", n=4, seed=5, rerank=True)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-4, atol=1e-5)
    assert all(same_pixels(decode(d["b64_json"]), im) for d, im in zip(data, ref.images))


def test_caption_answer_and_edit(client: TestClient, pipe: CM3Leon, photo: bytes) -> None:
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    r = client.post("/v1/captions", files={"image": ("p.png", photo, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == pipe.caption(img)
    r = client.post("/v1/captions", files={"image": ("p.png", photo, "image/png")},
                    data={"detailed": "true", "max_tokens": "8"})
    assert r.status_code == 200 and r.json()["caption"] == pipe.caption(img, detailed=True, max_new_tokens=8)
    r = client.post("/v1/answers", files={"image": ("p.png", photo, "image/png")},
                    data={"question": "what color is the circle?"})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == pipe.answer(img, "what color is the circle?")
    r = client.post("/v1/images/edits", files={"image": ("p.png", photo, "image/png")},
                    data={"prompt": "make the square yellow", "n": "2", "seed": "4", "text_guidance": "5"})
    assert r.status_code == 200, r.text
    ref = pipe.edit(img, "make the square yellow", n=2, seed=4, text_guidance=5.0)
    got = [decode(d["b64_json"]) for d in r.json()["data"]]
    assert len(got) == 2 and all(same_pixels(a, b) for a, b in zip(got, ref))


def test_stream_sends_partial_images_then_the_result(client: TestClient, pipe: CM3Leon) -> None:
    events = []
    with client.stream("POST", "/v1/images/generations/stream",
                       json={"prompt": "a red circle", "n": 2, "seed": 11}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    import json

    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "result" and "progress" in names
    L = pipe.vocab.image_seq_len
    progress = [d for e, d in events if e == "progress"]
    assert [p["tokens"] for p in progress] == sorted(p["tokens"] for p in progress) and progress[-1]["tokens"] == L
    assert all(len(p["images"]) == 2 and decode(p["images"][0]).size == (RES, RES) for p in progress)
    ref = pipe.generate_image("a red circle", n=2, seed=11)
    final = [decode(d["b64_json"]) for d in events[-1][1]["data"]]
    assert all(same_pixels(a, b) for a, b in zip(final, ref.images))
    # the last preview has every token: it is the final image
    assert same_pixels(decode(progress[-1]["images"][0]), ref.images[0])


def test_service_endpoints_and_page(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/info").json()
    assert info["size"] == f"{RES}x{RES}" and info["rerank"] is True and info["retrieval"] is False
    spec = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/generations/stream", "/v1/images/edits", "/v1/captions",
                 "/v1/answers", "/healthz"):
        assert path in spec["paths"]
    form = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "prompt"} <= set(form["required"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<textarea" in page.text
    for name in ("index.html", "app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
        # nothing may be fetched from the internet: no absolute URLs in the page
        assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text


# ---------------------------------------------------------------------------- validation
GEN = "/v1/images/generations"


@pytest.mark.parametrize(("body", "needle"), [
    ({"prompt": ""}, "empty"),
    ({"prompt": "   "}, "empty"),
    ({"prompt": "x" * 2001}, "2000"),
    ({}, "'prompt' is required"),
    ({"prompt": "a", "n": 0}, "n:"),
    ({"prompt": "a", "n": 17}, "n:"),
    ({"prompt": "a", "n": "two"}, "n:"),
    ({"prompt": "a", "colour": "red"}, "unknown field 'colour'"),
    ({"prompt": "a", "response_format": "url"}, "b64_json"),
    ({"prompt": "a", "response_format": "png"}, "b64_json"),
    ({"prompt": "a", "size": "big"}, "size"),
    ({"prompt": "a", "size": "100x100"}, f"{RES}x{RES}"),  # not a multiple of the native size
    ({"prompt": "a", "size": f"{2 * RES}x{RES}"}, f"{RES}x{RES}"),  # not square
    ({"prompt": "a", "size": "4096x4096"}, "2048x2048"),  # past the largest upscale
    ({"prompt": "a", "temperature": 0}, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "retrieve": 3}, "retrieve"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "guidance": "NaN"}, "guidance"),
    ({"prompt": "zq " * 650}, "context"),
])
def test_generation_validation_errors_are_422(client: TestClient, body: dict, needle: str) -> None:
    r = client.post(GEN, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]


def test_malformed_json_and_unusable_options(client: TestClient, pipe: CM3Leon) -> None:
    r = client.post(GEN, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = client.post(GEN, json={"prompt": "a", "retrieve": 1})
    assert r.status_code == 400 and "retrieval memory" in r.json()["error"]["message"]
    no_encoder = CM3Leon(pipe.model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer)
    with TestClient(create_app(no_encoder)) as c:
        r = c.post(GEN, json={"prompt": "a", "rerank": True})
        assert r.status_code == 400 and "reranker/ or retrieval/encoder" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found"
    r = client.get(GEN)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


def test_upload_validation(client: TestClient, photo: bytes) -> None:
    def post(url: str, files: Any = None, **kw: Any) -> httpx.Response:
        return client.post(url, files=files, **kw)

    img = {"image": ("p.png", photo, "image/png")}
    r = post("/v1/images/edits", {"image": ("cat.png", b"GIF89a not really", "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400 and "'cat.png' is not a readable image" in r.json()["error"]["message"]
    r = post("/v1/images/edits", {"image": ("cut.png", photo[: len(photo) // 2], "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400 and "cut.png" in r.json()["error"]["message"]
    r = post("/v1/captions", {"image": ("e.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = post("/v1/images/edits", img, data={"prompt": "x", "strength": "0.5"})
    assert r.status_code == 422 and "unknown field 'strength'" in r.json()["error"]["message"]
    r = post("/v1/images/edits", img, data={"prompt": " "})
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    r = post("/v1/images/edits", img, data={"prompt": "x", "n": "99"})
    assert r.status_code == 422 and "n:" in r.json()["error"]["message"]
    r = post("/v1/images/edits", img, data={"prompt": "x", "response_format": "url"})
    assert r.status_code == 422 and "b64_json" in r.json()["error"]["message"]
    r = post("/v1/answers", img)
    assert r.status_code == 422 and "'question' is required" in r.json()["error"]["message"]
    r = client.post("/v1/answers", data={"question": "what?", "image": "not a file"},
                    files={"other": ("o.txt", b"x", "text/plain")})
    assert r.status_code == 422
    r = client.post("/v1/captions", data={"detailed": "true"}, files={"dummy": ("d", b"", "text/plain")})
    assert r.status_code == 422 and "'image'" in r.json()["error"]["message"]
    r = client.post("/v1/captions", json={"image": "aGVsbG8="})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    # a huge image that compresses well: refused by its header size, never decoded
    big = io.BytesIO()
    Image.new("1", (4100, 4100)).save(big, format="PNG")
    r = post("/v1/captions", {"image": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"]


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    blob = b"\0" * (11 * 2**20)
    r = client.post("/v1/images/edits", files={"image": ("huge.png", blob, "image/png")}, data={"prompt": "x"})
    assert r.status_code == 413 and "10.0 MiB" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield b"--b\r\ncontent-disposition: form-data; name=\"image\"; filename=\"h.png\"\r\n\r\n"
        for _ in range(11):
            yield b"\0" * 2**20

    r = client.post("/v1/captions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    r = client.post(GEN, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# ---------------------------------------------------------------------------- batching, queue, timeouts
def test_concurrent_requests_are_merged_into_one_batch(pipe: CM3Leon) -> None:
    gated = GatedPipeline(pipe)
    app = create_app(gated, ServeConfig(max_batch=16, batch_wait_ms=5, threads=1))  # type: ignore[arg-type]
    with TestClient(app) as c, ThreadPoolExecutor(12) as pool:
        blocker = pool.submit(c.post, GEN, json={"prompt": "blocker"})
        wait_until(lambda: len(gated.calls) == 1)  # the worker is busy: the next requests queue up
        same = [pool.submit(c.post, GEN, json={"prompt": f"circle {i}", "n": 1 + i % 2}) for i in range(6)]
        other = [pool.submit(c.post, GEN, json={"prompt": f"square {i}", "guidance": 5.0}) for i in range(2)]
        seeded = [pool.submit(c.post, GEN, json={"prompt": "seeded", "seed": 1}) for _ in range(2)]
        wait_until(lambda: app.state.batcher.queue_depth == 10)
        gated.gate.set()
        responses = [f.result(60) for f in [blocker, *same, *other, *seeded]]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert [len(r.json()["data"]) for r in responses[1:7]] == [1 + i % 2 for i in range(6)]
        # one call for the 6 same-settings requests (9 images), one for the 2 others, one per seeded request
        calls = gated.calls[1:]
        sizes = sorted(len(p) for p, _ in calls)
        assert sizes == [1, 1, 2, 9]
        merged = next(p for p, _ in calls if len(p) == 9)
        assert sorted(set(merged)) == [f"circle {i}" for i in range(6)]
        for prompts, kw in calls:
            assert kw["guidance"] == (5.0 if prompts[0].startswith("square") else 3.0)
            assert kw["n"] == 1
        m = metric_samples(c)
        key = ("cm3leon_batch_size_count", (("task", "generate"),))
        assert m[key] == 5
        assert m[("cm3leon_batch_size_sum", (("task", "generate"),))] == 1 + 6 + 2 + 1 + 1
        assert m[("cm3leon_batch_size_bucket", (("le", "4.0"), ("task", "generate")))] == 4  # all but the merged one
        assert m[("cm3leon_batch_rows_sum", (("task", "generate"),))] == 1 + 9 + 2 + 1 + 1


def test_full_queue_answers_429_and_timeouts_504(pipe: CM3Leon) -> None:
    gated = GatedPipeline(pipe)
    app = create_app(gated, ServeConfig(max_batch=1, batch_wait_ms=0, queue_size=1, timeout_s=4,  # type: ignore[arg-type]
                                        threads=1))
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        running = pool.submit(c.post, GEN, json={"prompt": "first"})
        wait_until(lambda: len(gated.calls) == 1)
        queued = pool.submit(c.post, GEN, json={"prompt": "second"})
        wait_until(lambda: app.state.batcher.queue_depth == 1)
        r = c.post(GEN, json={"prompt": "third"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        assert "queue is full" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
        # nobody opens the gate: both time out; the queued one is dropped without running
        for f in (running, queued):
            r = f.result(30)
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert app.state.batcher.queue_depth == 0
        m = metric_samples(c)
        assert m[("cm3leon_cancelled_total", (("stage", "queued"),))] == 1
        assert m[("cm3leon_cancelled_total", (("stage", "running"),))] == 1
        assert m[("cm3leon_requests_total", (("endpoint", GEN), ("method", "POST"), ("status", "429")))] == 1
        gated.gate.set()
        r = c.post(GEN, json={"prompt": "after"})
        assert r.status_code == 200
        assert [p for p, _ in gated.calls] == [["first"], ["after"]]  # "second" never ran


def test_metrics_exposition(client: TestClient) -> None:
    before = metric_samples(client)
    client.post(GEN, json={"prompt": ""})
    client.post(GEN, json={"prompt": "a circle"})
    after = metric_samples(client)
    bad = ("cm3leon_requests_total", (("endpoint", GEN), ("method", "POST"), ("status", "422")))
    good = ("cm3leon_requests_total", (("endpoint", GEN), ("method", "POST"), ("status", "200")))
    assert after[bad] - before.get(bad, 0) == 1 and after[good] - before.get(good, 0) == 1
    lat = ("cm3leon_request_latency_seconds_count", (("endpoint", GEN),))
    assert after[lat] - before[lat] == 2
    inf = ("cm3leon_request_latency_seconds_bucket", (("endpoint", GEN), ("le", "+Inf")))
    assert after[inf] == after[lat]
    assert after[("cm3leon_queue_depth", ())] == 0
    assert after[("cm3leon_batch_size_count", (("task", "generate"),))] >= 1


def test_client_disconnect_drops_queued_work(pipe: CM3Leon) -> None:
    gated = GatedPipeline(pipe)
    app = create_app(gated, ServeConfig(max_batch=1, batch_wait_ms=0, threads=1))  # type: ignore[arg-type]
    with live_server(app) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url + GEN, json={"prompt": "first"}, timeout=60)
        wait_until(lambda: len(gated.calls) == 1)
        # a client that gives up: a raw request, the connection closed once the job is queued
        body = b'{"prompt": "impatient"}'
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: app.state.batcher.queue_depth == 1)
        with httpx.Client(timeout=30) as h, h.stream("POST", url + GEN + "/stream", json={"prompt": "leaver"}) as r:
            first = next(r.iter_lines())
            assert first == "event: queued"
        wait_until(lambda: app.state.batcher.queue_depth == 0, timeout=10)
        gated.gate.set()
        assert running.result(60).status_code == 200
        assert [p for p, _ in gated.calls] == [["first"]]
        text = httpx.get(url + "/metrics").text
        fam = {s.labels["stage"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "cm3leon_cancelled_total"}
        assert fam["queued"] == 2


def test_serve_cli_help_and_bad_arguments(tmp_path: Path) -> None:
    from cm3leon.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    assert (args.host, args.port, args.max_batch, args.batch_wait_ms, args.queue_size, args.timeout_s) == (
        "127.0.0.1", 8000, 16, 20.0, 64, 120.0)
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 1
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 1


# ---------------------------------------------------------------------------- the batcher alone
def _run_batcher(cfg: BatcherConfig, run: Callable, jobs: list[tuple[Any, Any, int]], *,
                 hold: threading.Event | None = None) -> tuple[list[Any], list[list[Any]]]:
    """Submit ``(key, payload, rows)`` jobs while the worker is held, release, collect results."""
    calls: list[list[Any]] = []
    started = threading.Event()

    def batch_fn(key: Any, batch: list) -> list:
        calls.append([j.payload for j in batch])
        if hold is not None and len(calls) == 1:
            started.set()
            hold.wait(10)
        return run(key, batch)

    async def main() -> list[Any]:
        b = DynamicBatcher(batch_fn, cfg)
        b.start()
        try:
            futs = []
            for i, (key, payload, rows) in enumerate(jobs):
                futs.append(b.submit(key, payload, rows=rows).future)
                if i == 0 and hold is not None:
                    await asyncio.to_thread(started.wait, 10)
            if hold is not None:
                hold.set()
            return await asyncio.gather(*futs, return_exceptions=True)
        finally:
            b.stop()

    return asyncio.run(main()), calls


def test_batcher_groups_by_key_fifo_within_max_rows() -> None:
    jobs = [("k", "hold", 1), ("a", 1, 2), ("b", 2, 1), ("a", 3, 3), ("a", 4, 2), ("a", 5, 9), ("b", 6, 1)]
    results, calls = _run_batcher(BatcherConfig(max_batch=8, wait_ms=0), lambda k, b: [j.payload for j in b],
                                  jobs, hold=threading.Event())
    assert results == ["hold", 1, 2, 3, 4, 5, 6]
    # oldest first; same key only; at most 8 rows unless a single job is bigger
    assert calls == [["hold"], [1, 3, 4], [2, 6], [5]]


def test_batcher_isolates_a_failing_job_and_honours_cancel() -> None:
    def run(key: Any, batch: list) -> list:
        if any(j.payload == "bad" for j in batch):
            raise ValueError("bad payload")
        return [j.payload.upper() for j in batch]

    results, calls = _run_batcher(BatcherConfig(max_batch=4, wait_ms=0), run,
                                  [("k", "hold", 1), ("k", "x", 1), ("k", "bad", 1), ("k", "y", 1)],
                                  hold=threading.Event())
    assert results[:2] == ["HOLD", "X"] and isinstance(results[2], ValueError) and results[3] == "Y"
    assert calls == [["hold"], ["x", "bad", "y"], ["x"], ["bad"], ["y"]]

    async def cancel_and_full() -> None:
        hold = threading.Event()
        ran: list[Any] = []

        def slow(key: Any, batch: list) -> list:
            ran.extend(j.payload for j in batch)
            hold.wait(10)
            return [None] * len(batch)

        b = DynamicBatcher(slow, BatcherConfig(max_batch=1, wait_ms=0, queue_size=2))
        b.start()
        try:
            first = b.submit("k", "first")
            while not ran:
                await asyncio.sleep(0.01)
            second, third = b.submit("k", "second"), b.submit("k", "third")
            with pytest.raises(QueueFullError):
                b.submit("k", "fourth")
            assert b.cancel(second) is True and b.queue_depth == 1
            hold.set()
            await first.future
            await third.future
            assert second.future.cancelled() and ran == ["first", "third"]
        finally:
            b.stop()

    asyncio.run(cancel_and_full())


def test_batcher_config_errors() -> None:
    for bad in (dict(max_batch=0), dict(wait_ms=-1), dict(queue_size=0)):
        with pytest.raises(ValueError):
            BatcherConfig(**bad)
    with pytest.raises(ValueError, match="timeout_s"):
        ServeConfig(timeout_s=0)
