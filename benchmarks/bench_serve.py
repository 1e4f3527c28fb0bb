"""Serving under load: dynamic batching on (``--max-batch 16``) vs off (``--max-batch 1``).

For each setting, starts the real server (``cm3leon serve`` in a subprocess on a loopback
port), then ``--clients`` concurrent clients each send ``--requests`` text-to-image
requests (n=1, CFG 3, no seed) one after another. Reports throughput (images/s), p50/p95
latency, the mean batch size the server's /metrics saw, and any lost or failed request
(there must be none: the script exits 1 otherwise).

Prints ONE JSON line with both settings and the ratios batched/unbatched (throughput) and
unbatched/batched (p50, p95 latency). Default model: a tiny random one (16x16 images, 64
tokens; ~1-2 minutes on a busy 2-core CPU); ``--model DIR`` serves your own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model fixture lives with the tests
from helpers import build_tiny_model_dir, free_port  # noqa: E402


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _start_server(model: Path, max_batch: int, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cm3leon.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--batch-wait-ms", str(args.wait_ms), "--queue-size", "1024",
           "--timeout-s", str(args.timeout), "--device", args.device, "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start in 120 s:\n{log.read_text()}")
        time.sleep(0.2)


async def _load(url: str, clients: int, per_client: int, timeout: float) -> dict:
    """``clients`` coroutines x ``per_client`` sequential requests; latencies and failures."""
    latencies: list[float] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def client(c: int) -> None:
            for r in range(per_client):
                t0 = time.perf_counter()
                try:
                    resp = await http.post("/v1/images/generations", json={"prompt": f"a red circle {c} {r}"})
                    ok = resp.status_code == 200 and len(resp.json()["data"]) == 1
                    if not ok:
                        failures.append(f"{resp.status_code}: {resp.text[:200]}")
                        continue
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(clients))), timeout)
        except asyncio.TimeoutError:
            failures.append(f"load round did not finish in {timeout} s")
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "failures": failures, "wall": wall}


def _mean_batch(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    got = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
           for s in f.samples if s.name.startswith("cm3leon_batch_rows") and s.labels.get("task") == "generate"}
    return got["cm3leon_batch_rows_sum"] / max(got["cm3leon_batch_rows_count"], 1)


def run_setting(model: Path, max_batch: int, args: argparse.Namespace, workdir: Path) -> dict:
    proc, url = _start_server(model, max_batch, args, workdir / f"server-{max_batch}.log")
    try:
        httpx.post(url + "/v1/images/generations", json={"prompt": "warm up"}, timeout=args.timeout)
        rounds = [asyncio.run(_load(url, args.clients, args.requests, args.timeout)) for _ in range(args.rounds)]
        mean_batch = _mean_batch(url)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = [x for r in rounds for x in r["latencies"]]
    failures = [x for r in rounds for x in r["failures"]]
    sent = args.clients * args.requests * args.rounds
    return {
        "max_batch": max_batch,
        "throughput_img_s": round(statistics.median(len(r["latencies"]) / r["wall"] for r in rounds), 3),
        "p50_s": round(_percentile(lat, 0.5), 4) if lat else None,
        "p95_s": round(_percentile(lat, 0.95), 4) if lat else None,
        "mean_batch_rows": round(mean_batch, 2),
        "ok": len(lat),
        "lost_or_failed": sent - len(lat),
        "failures": failures[:3],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: a tiny random one)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="sequential requests per client")
    p.add_argument("--rounds", type=int, default=1, help="load rounds per setting (throughput: median)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--wait-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=120.0, help="per request and per load round, seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's model worker")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or build_tiny_model_dir(tmp / "tiny-random", resolution=16)
        batched = run_setting(model, args.max_batch, args, tmp)
        unbatched = run_setting(model, 1, args, tmp)
    out = {
        "bench": "serve",
        "model": str(args.model) if args.model else "tiny-random-16px (64 tokens, CFG)",
        "clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds,
        "batched": batched, "unbatched": unbatched,
        "throughput_speedup": round(batched["throughput_img_s"] / unbatched["throughput_img_s"], 2),
        "p50_latency_ratio": round(unbatched["p50_s"] / batched["p50_s"], 2) if batched["p50_s"] else None,
        "p95_latency_ratio": round(unbatched["p95_s"] / batched["p95_s"], 2) if batched["p95_s"] else None,
    }
    print(json.dumps(out))
    return 0 if batched["lost_or_failed"] == 0 and unbatched["lost_or_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
