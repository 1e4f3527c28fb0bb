"""HTTP API and web page over the pipeline (thin: every model call is a ``CM3Leon`` method).

Endpoints (see ``docs/serving.md``), shaped like the OpenAI Images API where OpenAI has one:

- ``POST /v1/images/generations`` JSON; ``.../stream`` the same body answered with
  server-sent events (partial images, then the result);
- ``POST /v1/images/edits``, ``/v1/images/variations``, ``/v1/captions``, ``/v1/answers``:
  multipart/form-data with an ``image`` file field plus text fields;
- ``GET /v1/models``, ``GET /v1/models/{id}``: the served model in OpenAI's shape;
- ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /v1/info``, ``GET /`` (the page),
  ``/openapi.json``, ``/docs`` (Swagger UI from local files: no CDN), ``/favicon.ico``.

Every model call goes through one :class:`~cm3leon.serve.batcher.DynamicBatcher` (one
worker thread): concurrent requests with the same settings become one batched pipeline
call. Errors are OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}`` with a
message that says what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import fastapi_offline
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from cm3leon.pipeline import MAX_PROMPT_CHARS, CM3Leon
from cm3leon.serve.batcher import BatchCancelled, BatcherConfig, DynamicBatcher, Job, QueueFullError
from cm3leon.tokenize.image_vq_preprocess import check_pixel_limit

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI's files, served at /docs-assets
MAX_N = 16  # images per request
MAX_SIDE = 2048  # the largest upscaled size (pixels per side) a request may ask for
MAX_FORM_FILES = 16  # file parts read from one form (more than one image is refused with a message)
VARIATION_CAPTION_TOKENS = 64  # the caption of a variation: /v1/captions' default, so they share batches
_FORM_SLACK = 64 * 1024  # multipart boundaries and text fields on top of the image


@dataclass(frozen=True)
class ServeConfig:
    """Server limits and batching.

    - ``max_batch`` rows (images) per model call (1 = no batching), ``batch_wait_ms`` the
      window the oldest request waits for companions, ``queue_size`` waiting requests
      before 429, ``timeout_s`` per request before 504.
    - ``max_upload_bytes`` per uploaded image (413 above), ``max_image_pixels`` (400 above).
    - ``threads``: torch intra-op threads of the model worker (None = torch's default).
    """

    max_batch: int = 16
    batch_wait_ms: float = 20.0
    queue_size: int = 64
    timeout_s: float = 120.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    threads: int | None = None
    model_name: str = "cm3leon"

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_upload_bytes < 1024:
            raise ValueError(f"max_upload_bytes must be >= 1024, got {self.max_upload_bytes}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        BatcherConfig(self.max_batch, self.batch_wait_ms, self.queue_size)  # validates those three


# ============================================================================ errors
class APIError(StarletteHTTPException):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``status``.

    ``param`` names the request field at fault (None when no one field is), ``code`` is a short
    machine-readable reason (None when the status and type say it all).
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.kind, self.param, self.code = kind, param, code


class PayloadTooLarge(APIError):
    """The request body is over the upload limit (raised while it is being read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the upload limit of {limit / 2**20:.1f} MiB; "
                         "upload a smaller image (downscale or re-encode it as JPEG/WebP)", "payload_too_large")


_STATUS_KIND = {400: "invalid_request_error", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "invalid_request_error", 429: "rate_limit_exceeded",
                500: "server_error", 503: "server_error", 504: "timeout"}


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: every key always present (``param`` and ``code`` may be null)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, kind: str | None = None, headers: dict[str, str] | None = None, *,
           param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = kind or _STATUS_KIND.get(status, "error")
    return JSONResponse(_error_body(message, kind, param, code), status_code=status, headers=headers)


def _validation_error(errors: Sequence[Any], fields: Sequence[str]) -> APIError:
    """A 422 with one readable sentence per pydantic error (unknown fields list the allowed ones);
    ``param`` and ``code`` describe the first error."""
    parts, params, codes = [], [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        params.append(loc[0] if loc else None)
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}; allowed fields: {', '.join(fields)}")
            codes.append("unknown_parameter")
        elif e.get("type") == "missing":
            parts.append(f"field {where!r} is required")
            codes.append("missing_required_parameter")
        else:
            msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
            codes.append("invalid_value")
    return APIError(422, "; ".join(parts) or "invalid request", param=params[0] if params else None,
                    code=codes[0] if codes else None)


def _json_error_message(error: dict[str, Any], body: Any) -> str:
    """'request body is not valid JSON: <what> at line L column C' for FastAPI's json_invalid error."""
    what = str((error.get("ctx") or {}).get("error") or "JSON decode error")
    loc = error.get("loc") or ()
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    if pos is None or not isinstance(body, str):
        return f"request body is not valid JSON: {what}"
    line = body.count("\n", 0, pos) + 1
    column = pos - body.rfind("\n", 0, pos)
    return f"request body is not valid JSON: {what} at line {line} column {column}"


# ============================================================================ request schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _nonempty(v: str, what: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError(f"{what} is empty; write what you want, e.g. 'a red circle at the top left'")
    return v


def _b64_only(v: str) -> str:
    if v == "url":
        raise ValueError("'url' is not supported: this server stores no files; use response_format='b64_json'")
    if v != "b64_json":
        raise ValueError(f"{v!r} is not a response format; use 'b64_json'")
    return v


_SIZE = r"^(\d+x\d+|auto)$"
_SIZE_HELP = ("'auto', the model's resolution 'RxR' (see /v1/info), or a square integer multiple of it "
              "('2Rx2R', ...), upscaled with nearest-neighbour")
_IGNORED = "accepted for OpenAI clients and ignored"


class _OpenAIFields(_Strict):
    """Fields OpenAI clients send that this server accepts and ignores (one model, one quality)."""

    model: str | None = Field(None, max_length=256, description=f"{_IGNORED}: one model is served (GET /v1/models)")
    quality: str | None = Field(None, max_length=64, description=f"{_IGNORED}: the model has one quality")
    style: str | None = Field(None, max_length=64, description=f"{_IGNORED}: the prompt sets the style")
    user: str | None = Field(None, max_length=256, description=f"{_IGNORED}: nothing is logged per user")


class ImageGenerationRequest(_OpenAIFields):
    """Text-to-image (OpenAI Images API shape plus CM3Leon's decoding options)."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to draw")
    n: int = Field(1, ge=1, le=MAX_N, description="images to generate")
    response_format: str = Field("b64_json", description="only 'b64_json' (PNG, base64)")
    size: str | None = Field(None, pattern=_SIZE, description=_SIZE_HELP)
    guidance: float | None = Field(None, ge=0.0, le=100.0,
                                   description="classifier-free guidance scale "
                                   "(1 = off; default: the model's generation_config.json)")
    temperature: float | None = Field(None, gt=0.0, le=10.0, description="default: the model's generation_config.json")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default: the model's generation_config.json")
    top_k: int | None = Field(None, ge=1)
    cd_k: int | None = Field(None, ge=1, description="contrastive decoding top-K (paper Eq. 3); None = off")
    retrieve: int | None = Field(None, ge=0, le=2,
                                 description="retrieved documents prepended to the prompt "
                                 "(default: the model's generation_config.json)")
    rerank: bool | None = Field(None, description="order the n images by CLIP score, best first "
                                "(default: the model's generation_config.json)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="fixes the result; seeded requests are never merged with others")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str) -> str:
        return _nonempty(v, "prompt")

    @field_validator("response_format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        return _b64_only(v)


class EditForm(_OpenAIFields):
    """Image editing (instruct-CFG over three streams, paper §4.1); sent with one ``image`` file
    (``image[]`` with one file, as the OpenAI SDK sends ``image=[f]``, works too; ``mask`` is refused)."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="the edit instruction")
    n: int = Field(1, ge=1, le=MAX_N)
    response_format: str = "b64_json"
    size: str | None = Field(None, pattern=_SIZE, description=_SIZE_HELP)
    image_guidance: float | None = Field(None, ge=0.0, le=100.0,
                                         description="default: the model's generation_config.json")
    text_guidance: float | None = Field(None, ge=0.0, le=100.0,
                                        description="default: the model's generation_config.json")
    temperature: float | None = Field(None, gt=0.0, le=10.0, description="default: the model's generation_config.json")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default: the model's generation_config.json")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str) -> str:
        return _nonempty(v, "prompt")

    @field_validator("response_format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        return _b64_only(v)


class VariationForm(_OpenAIFields):
    """Variations of an uploaded image: the model captions it, then draws ``n`` images of the caption."""

    n: int = Field(1, ge=1, le=MAX_N)
    response_format: str = "b64_json"
    size: str | None = Field(None, pattern=_SIZE, description=_SIZE_HELP)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="fixes the images (the caption is greedy)")

    @field_validator("response_format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        return _b64_only(v)


class CaptionForm(_Strict):
    """Image captioning; sent with an ``image`` file."""

    detailed: bool = Field(False, description="a long description instead of a short caption")
    max_tokens: int = Field(64, ge=1, le=256)


class AnswerForm(_Strict):
    """Visual question answering; sent with an ``image`` file."""

    question: str = Field(max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(16, ge=1, le=128)

    @field_validator("question")
    @classmethod
    def _check_question(cls, v: str) -> str:
        return _nonempty(v, "question")


# ============================================================================ batched model work
@dataclass(frozen=True)
class GenSettings:
    """Sampling settings of a generation batch: requests share a batch only when these are equal."""

    guidance: float
    temperature: float
    top_p: float
    top_k: int | None
    cd_k: int | None
    retrieve: int
    rerank: bool
    seed: int | None


@dataclass(frozen=True)
class EditSettings:
    """Sampling settings of an edit batch."""

    image_guidance: float
    text_guidance: float
    temperature: float
    top_p: float
    seed: int | None


@dataclass
class ImagesOut:
    """One request's images (base64 PNG), best first when re-ranked."""

    b64: list[str]
    scores: list[float] | None = None
    retrieved: list[str] | None = None


def png_b64(img: Image.Image, scale: int = 1) -> str:
    """Base64 of an image encoded as PNG, first upscaled ``scale`` times with nearest-neighbour.

    Nearest-neighbour because the model's output is VQ tokens at its native resolution: every
    pixel it made becomes a ``scale`` x ``scale`` block, and no detail it did not make is invented.
    """
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class PipelineRunner:
    """The batch function of the server: runs a batch of jobs with one pipeline call.

    Keys are ``("generate", GenSettings, token)``, ``("edit", EditSettings, token)``,
    ``("caption", detailed, max_tokens)`` and ``("answer", max_tokens)``. ``token`` is a
    fresh object for seeded requests, so a seeded request runs alone and equals the
    pipeline's own result for that seed; unseeded batches draw a random seed.
    A request for n images fills n rows: its prompt is repeated n times (n=1 each).
    Payloads: generate ``(prompt, n, scale)``, edit ``(image, instruction, n, scale)``; ``scale``
    is the request's own integer upscale of its PNGs (see :func:`png_b64`), so requests of
    different sizes still share a batch.
    """

    def __init__(self, pipe: CM3Leon) -> None:
        self.pipe = pipe
        self._rng = random.Random()

    def __call__(self, key: Hashable, jobs: Sequence[Job]) -> list[Any]:
        task = key[0]  # type: ignore[index]
        if task == "generate":
            return self._generate(key[1], jobs)  # type: ignore[index]
        if task == "edit":
            return self._edit(key[1], jobs)  # type: ignore[index]
        if task == "caption":
            caps = self.pipe.captions([j.payload for j in jobs], detailed=key[1], max_new_tokens=key[2])  # type: ignore[index]
            return list(caps)
        if task == "answer":
            return list(self.pipe.answers([j.payload[0] for j in jobs], [j.payload[1] for j in jobs],
                                          max_new_tokens=key[1]))  # type: ignore[index]
        raise ValueError(f"unknown task {task!r}")

    def _seed(self, seed: int | None) -> int:
        return seed if seed is not None else self._rng.randrange(2**31)

    def _generate(self, s: GenSettings, jobs: Sequence[Job]) -> list[Any]:
        prompts = [j.payload[0] for j in jobs for _ in range(j.payload[1])]
        spans, lo = [], 0
        for j in jobs:
            spans.append((lo, lo + j.payload[1]))
            lo += j.payload[1]
        L = self.pipe.vocab.image_seq_len

        def callback(n_done: int, codes: torch.Tensor) -> None:
            if all(j.cancelled for j in jobs):
                raise BatchCancelled()
            for j, (a, b) in zip(jobs, spans):
                if j.progress is not None and not j.cancelled:
                    j.progress({"tokens": n_done, "total": L, "images": self._preview(codes[a:b], L)})

        results = self.pipe.generate_images(
            prompts, n=1, guidance=s.guidance, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            cd_k=s.cd_k, retrieve=s.retrieve, rerank=s.rerank, seed=self._seed(s.seed), callback=callback,
        )
        out: list[Any] = []
        for j, (a, b) in zip(jobs, spans):
            mine = results[a:b]
            images = [r.images[0] for r in mine]
            scores = None
            if s.rerank:
                raw = [float(r.scores[0]) for r in mine]  # type: ignore[index]
                order = sorted(range(len(images)), key=lambda i: -raw[i])  # stable, like the pipeline's
                images, scores = [images[i] for i in order], [raw[i] for i in order]
            out.append(ImagesOut([png_b64(im, j.payload[2]) for im in images], scores, mine[0].retrieved))
        return out

    def _preview(self, codes: torch.Tensor, L: int) -> list[str]:
        """Partial codes Long[rows, k] -> PNGs, the missing tokens filled with each row's most common code."""
        if codes.shape[1] < L:
            fill = torch.mode(codes, dim=1).values[:, None].expand(-1, L - codes.shape[1])
            codes = torch.cat([codes, fill], dim=1)
        return [png_b64(im) for im in self.pipe.decode_images(codes)]

    def _edit(self, s: EditSettings, jobs: Sequence[Job]) -> list[Any]:
        images = [j.payload[0] for j in jobs for _ in range(j.payload[2])]
        instructions = [j.payload[1] for j in jobs for _ in range(j.payload[2])]
        got = self.pipe.edits(images, instructions, image_guidance=s.image_guidance, text_guidance=s.text_guidance,
                              temperature=s.temperature, top_p=s.top_p, n=1, seed=self._seed(s.seed))
        out: list[Any] = []
        lo = 0
        for j in jobs:
            out.append(ImagesOut([png_b64(g[0], j.payload[3]) for g in got[lo : lo + j.payload[2]]]))
            lo += j.payload[2]
        return out


# ============================================================================ metrics
class Metrics:
    """Prometheus metrics of one app (its own registry: no process-global state)."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cm3leon_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("cm3leon_request_latency_seconds", "HTTP request latency (streams: until the end)",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.queue = Gauge("cm3leon_queue_depth", "requests waiting for the model", registry=r)
        self.queue.set_function(lambda: batcher.queue_depth)
        self.busy = Gauge("cm3leon_batch_rows_running", "rows of the model call running now", registry=r)
        self.busy.set_function(lambda: batcher.busy_rows)
        buckets = (1, 2, 4, 8, 16, 32, 64, 128)
        self.batch_size = Histogram("cm3leon_batch_size", "requests merged into one model call", ["task"],
                                    registry=r, buckets=buckets)
        self.batch_rows = Histogram("cm3leon_batch_rows", "rows (images/texts) of one model call", ["task"],
                                    registry=r, buckets=buckets)
        self.cancelled = Counter("cm3leon_cancelled", "requests dropped (client gone or timed out) by stage",
                                 ["stage"], registry=r)

    def on_batch(self, key: Hashable, jobs: Sequence[Job]) -> None:
        """Batcher hook: record one model call."""
        task = str(key[0])  # type: ignore[index]
        self.batch_size.labels(task).observe(len(jobs))
        self.batch_rows.labels(task).observe(sum(j.rows for j in jobs))

    def render(self) -> bytes:
        """The exposition in Prometheus text format."""
        return generate_latest(self.registry)


class _Observe:
    """ASGI middleware: request metrics, and the body size limit (413) for every request."""

    def __init__(self, app: Any, metrics: Metrics, upload_limit: int, paths: Any) -> None:
        self.app, self.metrics, self.upload_limit = app, metrics, upload_limit
        self.limit = upload_limit + _FORM_SLACK  # multipart framing and text fields on top of the image
        self.paths = paths  # () -> the app's route paths, to label requests refused before routing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]
        length = dict(scope.get("headers") or []).get(b"content-length")

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        seen = [0]

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise PayloadTooLarge(self.upload_limit)
            return message

        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                await _error(413, PayloadTooLarge(self.upload_limit).detail)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive_limited, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None)
            if endpoint is None:
                endpoint = scope["path"] if scope["path"] in self.paths() else "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


# ============================================================================ request helpers
def decode_upload(data: bytes, name: str, *, max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes, or APIError(400) saying why it cannot be used."""
    if not data:
        raise APIError(400, f"the uploaded file {name!r} is empty; upload a PNG, JPEG or WebP image")
    try:
        img = Image.open(BytesIO(data))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise APIError(400, f"the uploaded file {name!r} is not a readable image ({type(e).__name__}); "
                       "upload a PNG, JPEG or WebP image") from e
    try:
        check_pixel_limit(img, max_pixels=max_pixels, name=f"the uploaded image {name!r}")
    except ValueError as e:
        raise APIError(400, str(e).replace("pass a larger max_pixels", "upload a smaller one")) from e
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise APIError(400, f"the uploaded image {name!r} is truncated or corrupt ({e}); upload the whole file") from e
    return img.convert("RGB")


def _model_fields(model: type[BaseModel]) -> list[str]:
    """The fields of ``model``, the ignored OpenAI ones last."""
    ignored = list(_OpenAIFields.model_fields) if issubclass(model, _OpenAIFields) else []
    return [f for f in model.model_fields if f not in ignored] + ignored


def _multipart_openapi(model: type[BaseModel], image_help: str = "PNG, JPEG or WebP") -> dict[str, Any]:
    """OpenAPI requestBody for a form endpoint (the form is parsed by hand, so FastAPI cannot infer it)."""
    schema = model.model_json_schema()
    schema["properties"] = {"image": {"type": "string", "format": "binary", "description": image_help},
                            **schema.get("properties", {})}
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# ============================================================================ the app
def create_app(pipe: CM3Leon, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving ``pipe``; the batcher's worker starts with the app's lifespan."""
    runner = PipelineRunner(pipe)

    def on_start() -> None:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)  # in the worker: OpenMP thread counts are per thread

    batcher = DynamicBatcher(runner, BatcherConfig(cfg.max_batch, cfg.batch_wait_ms, cfg.queue_size),
                             on_start=on_start)
    metrics = Metrics(batcher)
    batcher.on_batch = metrics.on_batch
    resolution = pipe.image_tokenizer.resolution
    L = pipe.vocab.image_seq_len

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="CM3Leon", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Text-to-image, image editing and variations, captioning and VQA with one CM3Leon "
                  "model, shaped like the OpenAI Images API. Errors are JSON "
                  "{'error': {'message', 'type', 'param', 'code'}}.")
    app.state.batcher, app.state.metrics, app.state.pipe, app.state.cfg = batcher, metrics, pipe, cfg
    app.add_middleware(_Observe, metrics=metrics, upload_limit=cfg.max_upload_bytes,
                       paths=lambda: {getattr(r, "path", None) for r in app.routes})
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    created = int(time.time())  # the "created" of the served model in /v1/models
    max_scale = max(1, MAX_SIDE // resolution)

    # ---- error handlers -------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI validates the JSON bodies (generation requests); forms are validated in read_form
        bad_json = [e for e in exc.errors() if e.get("type") == "json_invalid"]
        if bad_json:
            return _error(422, _json_error_message(bad_json[0], exc.body), code="invalid_json")
        err = _validation_error(exc.errors(), _model_fields(ImageGenerationRequest))
        return _error(422, str(err.detail), param=err.param, code=err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI reading a JSON body
            e = exc.__cause__
            return _error(422, f"request body is not valid JSON: it is not UTF-8 text ({e.encoding} cannot decode "
                          f"byte 0x{e.object[e.start]:02x} at position {e.start}); send UTF-8 encoded JSON",
                          code="invalid_json")
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no endpoint {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
        return _error(exc.status_code, msg, getattr(exc, "kind", None), getattr(exc, "headers", None),
                      param=getattr(exc, "param", None), code=getattr(exc, "code", None))

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")

    # ---- helpers ----------------------------------------------------------------------
    def submit(key: Hashable, payload: Any, rows: int, progress: Any = None) -> Job:
        try:
            return batcher.submit(key, payload, rows=rows, progress=progress)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_exceeded", {"Retry-After": "1"}) from e
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error") from e

    def job_error(e: BaseException) -> APIError:
        if isinstance(e, (ValueError, FileNotFoundError)):
            return APIError(400, str(e))
        log.error("model call failed", exc_info=e)
        return APIError(500, f"the model call failed ({type(e).__name__}: {e}); see the server log", "server_error")

    async def wait_job(request: Request, job: Job) -> Any:
        """The job's result; 504 after the timeout; drops the job if the client goes away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                metrics.cancelled.labels("queued" if batcher.cancel(job) else "running").inc()
                raise APIError(504, f"the request did not finish within {cfg.timeout_s:g} s (server busy); "
                               "retry later, ask for fewer images, or raise --timeout-s", "timeout")
            done, _ = await asyncio.wait({job.future}, timeout=min(0.2, remaining))
            if done:
                if job.future.cancelled():
                    raise APIError(503, "the request was cancelled (server shutting down)", "server_error")
                exc = job.future.exception()
                if exc is not None:
                    raise job_error(exc)
                return job.future.result()
            if await request.is_disconnected():
                metrics.cancelled.labels("queued" if batcher.cancel(job) else "running").inc()
                log.info("client left; request on %s dropped", request.url.path)
                return None

    def size_scale(size: str | None) -> int:
        """The integer upscale of a request's ``size``: 1 for the native size (or none, or 'auto')."""
        if size is None or size == "auto":
            return 1
        w, h = (int(x) for x in size.split("x"))
        if w == h and w % resolution == 0 and 1 <= w // resolution <= max_scale:
            return w // resolution
        r = resolution
        multiples = ", ".join(f"'{k * r}x{k * r}'" for k in range(2, min(max_scale, 4) + 1))
        largest = f"'{max_scale * r}x{max_scale * r}'"
        accepted = f"'{r}x{r}' (native)"
        if max_scale > 1:
            accepted += f" or a square multiple of it up to {largest}: {multiples}{', ...' if max_scale > 4 else ''}"
            accepted += " (upscaled with nearest-neighbour)"
        raise APIError(422, f"size {size!r} is not available: this model makes {r}x{r} images; "
                       f"pass {accepted}, or omit size", param="size", code="invalid_size")

    def gen_job(req: ImageGenerationRequest, progress: Any = None) -> Job:
        scale = size_scale(req.size)
        d = pipe.defaults("text_to_image", guidance=req.guidance, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, retrieve=req.retrieve)
        rerank = (d.rerank and pipe.reranker is not None) if req.rerank is None else req.rerank
        if req.retrieve and pipe.retriever is None:
            raise APIError(400, "retrieve > 0 needs a retrieval memory in the model directory "
                           "(retrieval/encoder, retrieval/bank, retrieval/memory); use retrieve=0", param="retrieve")
        if req.rerank and pipe.reranker is None:
            raise APIError(400, "rerank needs an encoder in the model directory (reranker/ or retrieval/encoder); "
                           "use rerank=false", param="rerank")
        n_tokens = len(pipe.text_ids(req.prompt)) + 2 + L
        if n_tokens > pipe.model.cfg.max_seq_len:
            raise APIError(422, f"the prompt is {n_tokens - 2 - L} tokens long; with the {L} image tokens it "
                           f"exceeds the model's context of {pipe.model.cfg.max_seq_len}; shorten it",
                           param="prompt", code="context_length_exceeded")
        s = GenSettings(d.sampling.guidance, d.sampling.temperature, d.sampling.top_p, d.sampling.top_k, req.cd_k,
                        d.retrieve if pipe.retriever is not None else 0, rerank, req.seed)
        token = object() if req.seed is not None else None
        return submit(("generate", s, token), (req.prompt, req.n, scale), req.n, progress)

    def images_body(out: ImagesOut) -> dict[str, Any]:
        data = [{"b64_json": b} for b in out.b64]
        if out.scores is not None:
            for d, s in zip(data, out.scores):
                d["clip_score"] = s
        body: dict[str, Any] = {"created": int(time.time()), "data": data}
        if out.retrieved:
            body["retrieved"] = out.retrieved
        return body

    async def read_form(request: Request, model: type[BaseModel], *,
                        refuse_mask: bool = False) -> tuple[Any, Image.Image]:
        """The validated text fields and the one uploaded image of a multipart form.

        The image is the file field ``image``, or ``image[]`` holding one file (the OpenAI SDK's
        list form, ``image=[f]``). With ``refuse_mask`` a ``mask`` (file or text) is a 422 that says
        masks are not supported.
        """
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise APIError(415, f"send multipart/form-data with the image as a file field named 'image', "
                           f"e.g. curl -F image=@photo.png ... (got content-type {ctype or 'none'!r})")
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=32, max_part_size=8 * MAX_PROMPT_CHARS)
        except PayloadTooLarge:
            raise
        except StarletteHTTPException as e:
            raise APIError(400, f"could not read the form ({e.detail}); send one 'image' file and text fields") from e
        fields: dict[str, Any] = {}
        uploads: list[UploadFile] = []
        for k, v in form.multi_items():
            if k == "mask" and refuse_mask:
                raise APIError(422, "mask is not supported: this model edits from instructions; omit mask and "
                               "say in the prompt what to change", param="mask", code="unsupported_parameter")
            if isinstance(v, UploadFile):
                if k not in ("image", "image[]"):
                    raise APIError(422, f"unexpected file field {k!r}; send the image as a file field named 'image'",
                                   param=k, code="unknown_parameter")
                uploads.append(v)
            elif k in ("image", "image[]"):
                raise APIError(422, "field 'image' must be a file upload (curl -F image=@photo.png), not text",
                               param="image", code="invalid_value")
            else:
                fields[k] = v
        if not uploads:
            raise APIError(422, "field 'image' is required: upload the image as a file field named 'image'",
                           param="image", code="missing_required_parameter")
        if len(uploads) > 1:
            raise APIError(422, f"got {len(uploads)} images; this endpoint takes 1 image per request (the model "
                           "conditions on a single image): send one, or one request per image",
                           param="image", code="too_many_images")
        upload = uploads[0]
        try:
            parsed = model.model_validate(fields)
        except ValidationError as e:
            raise _validation_error(e.errors(), ["image", *_model_fields(model)]) from e
        data = await upload.read()
        if len(data) > cfg.max_upload_bytes:
            raise APIError(413, f"the image is {len(data) / 2**20:.1f} MiB; the limit is "
                           f"{cfg.max_upload_bytes / 2**20:.1f} MiB: downscale or re-encode it", "payload_too_large",
                           param="image")
        name = upload.filename or "image"
        img = await asyncio.to_thread(decode_upload, data, name, max_pixels=cfg.max_image_pixels)
        return parsed, img

    def served_model() -> dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "cm3leon"}

    # ---- routes ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        # Swagger UI from the files fastapi-offline ships (no CDN); no validator badge (it would call out).
        # No /redoc: ReDoc loads its logo from a CDN.
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="CM3Leon API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/favicon.ico",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served model, in OpenAI's list shape: ``{"object": "list", "data": [{"id", "object", ...}]}``."""
        return {"object": "list", "data": [served_model()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        """The served model by its id (the model directory's name); 404 for any other id."""
        if model_id != cfg.model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {cfg.model_name!r} "
                           "(GET /v1/models)", "invalid_request_error", param="model", code="model_not_found")
        return served_model()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the worker thread is up; queue depth and busy rows."""
        if not batcher.alive:
            raise APIError(503, "the model worker is not running", "server_error")
        return {"status": "ok", "queue_depth": batcher.queue_depth, "busy_rows": batcher.busy_rows}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """What this server's model can do (the web page reads it)."""
        return {
            "model": cfg.model_name, "size": f"{resolution}x{resolution}", "tokens_per_image": L,
            "max_size": f"{max_scale * resolution}x{max_scale * resolution}",
            "max_n": MAX_N, "retrieval": pipe.retriever is not None, "rerank": pipe.reranker is not None,
            "max_batch": cfg.max_batch, "max_upload_bytes": cfg.max_upload_bytes,
            "context": pipe.model.cfg.max_seq_len, "defaults": pipe.generation_config.to_dict(),
        }

    @app.post("/v1/images/generations")
    async def generations(req: ImageGenerationRequest, request: Request) -> Any:
        """Text-to-image; returns ``{"created", "data": [{"b64_json"}]}`` (PNG, best first if re-ranked)."""
        out = await wait_job(request, gen_job(req))
        return Response(status_code=499) if out is None else images_body(out)

    @app.post("/v1/images/generations/stream")
    async def generations_stream(req: ImageGenerationRequest, request: Request) -> StreamingResponse:
        """Text-to-image as server-sent events: ``queued``, ``progress`` (partial PNGs every few tokens),
        then ``result`` (the body of /v1/images/generations) or ``error``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def progress(ev: Any) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:
                pass

        job = gen_job(req, progress)  # 422/429 are answered before the stream starts

        def sse(event: str, data: Any) -> bytes:
            return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()

        async def stream() -> AsyncIterator[bytes]:
            deadline = loop.time() + cfg.timeout_s
            try:
                yield sse("queued", {"queue_depth": batcher.queue_depth, "total": L})
                while not job.future.done():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        metrics.cancelled.labels("queued" if batcher.cancel(job) else "running").inc()
                        yield sse("error", _error_body(f"not finished within {cfg.timeout_s:g} s", "timeout"))
                        return
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, job.future}, timeout=min(0.25, remaining),
                                       return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield sse("progress", getter.result())
                        continue
                    getter.cancel()
                    if not job.future.done() and await request.is_disconnected():
                        return  # the finally below drops the job
                while not events.empty():
                    yield sse("progress", events.get_nowait())
                if job.future.cancelled():
                    yield sse("error", _error_body("cancelled", "server_error"))
                elif job.future.exception() is not None:
                    err = job_error(job.future.exception())  # type: ignore[arg-type]
                    yield sse("error", _error_body(err.detail, err.kind, err.param, err.code))
                else:
                    yield sse("result", images_body(job.future.result()))
            finally:
                if not job.future.done():  # the client went away mid-stream
                    metrics.cancelled.labels("queued" if batcher.cancel(job) else "running").inc()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images/edits", openapi_extra=_multipart_openapi(
        EditForm, "PNG, JPEG or WebP; also accepted as 'image[]' holding one file"))
    async def edits(request: Request) -> Any:
        """Edit an uploaded image following ``prompt``; returns the generations body. No ``mask``."""
        form, img = await read_form(request, EditForm, refuse_mask=True)
        scale = size_scale(form.size)
        d = pipe.defaults("edit", image_guidance=form.image_guidance, text_guidance=form.text_guidance,
                          temperature=form.temperature, top_p=form.top_p).sampling
        s = EditSettings(d.image_guidance, d.text_guidance, d.temperature, d.top_p, form.seed)
        token = object() if form.seed is not None else None
        out = await wait_job(request, submit(("edit", s, token), (img, form.prompt, form.n, scale), form.n))
        return Response(status_code=499) if out is None else images_body(out)

    @app.post("/v1/images/variations", openapi_extra=_multipart_openapi(VariationForm))
    async def variations(request: Request) -> Any:
        """Variations of an uploaded image: the model captions it (greedy, as ``/v1/captions``), then
        draws ``n`` images of that caption (as ``/v1/images/generations``); each item's
        ``revised_prompt`` is the caption."""
        form, img = await read_form(request, VariationForm)
        size_scale(form.size)  # a bad size is refused before any model work
        caption = await wait_job(request, submit(("caption", False, VARIATION_CAPTION_TOKENS), img, 1))
        if caption is None:
            return Response(status_code=499)
        prompt = fit_prompt(caption)
        if not prompt:
            raise APIError(500, "the model's caption of this image is empty, so there is nothing to draw a variation "
                           "of; use /v1/images/edits with a prompt instead", "server_error", code="empty_caption")
        req = ImageGenerationRequest(prompt=prompt, n=form.n, size=form.size, seed=form.seed)
        out = await wait_job(request, gen_job(req))
        if out is None:
            return Response(status_code=499)
        body = images_body(out)
        for item in body["data"]:
            item["revised_prompt"] = prompt
        return body

    def fit_prompt(caption: str) -> str:
        """``caption`` cut (at the end) until it fits the context with the image tokens."""
        text = caption.strip()[:MAX_PROMPT_CHARS]
        while text and len(pipe.text_ids(text)) + 2 + L > pipe.model.cfg.max_seq_len:
            text = text[: len(text) * 9 // 10].rstrip()
        return text

    @app.post("/v1/captions", openapi_extra=_multipart_openapi(CaptionForm))
    async def captions(request: Request) -> Any:
        """Describe an uploaded image: ``{"created", "caption"}``."""
        form, img = await read_form(request, CaptionForm)
        out = await wait_job(request, submit(("caption", form.detailed, form.max_tokens), img, 1))
        return Response(status_code=499) if out is None else {"created": int(time.time()), "caption": out}

    @app.post("/v1/answers", openapi_extra=_multipart_openapi(AnswerForm))
    async def answers(request: Request) -> Any:
        """Answer ``question`` about an uploaded image: ``{"created", "answer"}``."""
        form, img = await read_form(request, AnswerForm)
        out = await wait_job(request, submit(("answer", form.max_tokens), (img, form.question), 1))
        return Response(status_code=499) if out is None else {"created": int(time.time()), "answer": out}

    return app


def load_app(model_dir: str | Path, cfg: ServeConfig = ServeConfig(), *, device: str = "cpu") -> FastAPI:
    """Load a model directory and build its app."""
    pipe = CM3Leon.from_pretrained(model_dir, device=device)
    return create_app(pipe, dataclasses.replace(cfg, model_name=Path(model_dir).name or cfg.model_name))
