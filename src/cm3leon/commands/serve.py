"""``cm3leon serve``: the HTTP API and web page over a model directory (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_EXAMPLES = """examples:
  cm3leon serve --model runs/quickstart/model                 # http://127.0.0.1:8000/
  cm3leon serve --model runs/quickstart/model --port 8080 --max-batch 32 --batch-wait-ms 50
  cm3leon serve --model runs/quickstart/model --max-batch 1   # no batching (one request per model call)

  curl -s http://127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \\
       -d '{"prompt": "a red circle at the top left", "n": 2}'

The page is at /, the OpenAPI schema at /openapi.json (browsable at /docs), Prometheus
metrics at /metrics. See docs/serving.md. There is no authentication: keep the default
loopback address unless a proxy in front of it controls access.
"""


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser("serve", help="serve a model over HTTP (JSON API + web page)",
                       description="Serve a model directory: OpenAI-style image generation, editing, "
                       "captioning and VQA, with dynamic batching of concurrent requests.",
                       epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model directory (see `cm3leon quickstart`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="most images decoded in one model call (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long a request waits for companions to batch with (default 20)")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 429 (default 64)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request time limit before 504 (default 120)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload in MiB (default 10)")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, mps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the model worker")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from cm3leon.cli import CLIError

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    try:
        import uvicorn

        from cm3leon.serve.app import ServeConfig, load_app
    except ModuleNotFoundError as e:
        raise CLIError(f"serving needs the 'serve' extra ({e.name} is missing): pip install -e '.[serve]'") from e
    cfg = ServeConfig(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size,
                      timeout_s=args.timeout_s, max_upload_bytes=int(args.max_upload_mb * 2**20), threads=args.threads)
    if not _is_loopback(args.host):
        log.warning("binding to %s: the server has no authentication; anyone who can reach this address can "
                    "use it", args.host)
    app = load_app(args.model, cfg, device=args.device)
    print(f"serving {args.model} on http://{args.host}:{args.port}/  (API docs: /docs, metrics: /metrics)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
