"""The web page in a real headless Chromium against the real server (`cm3leon serve` in a
subprocess): type a prompt, generate, see the progressive preview and the gallery; caption
and edit an uploaded image. Skips when Chromium or Playwright is not installed.

Chromium comes from Debian (``apt-get install -y chromium``); Playwright only drives it
(``executable_path``): nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import build_tiny_model_dir, free_port

CHROMIUM = os.environ.get("CM3LEON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
RES = 16

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed: apt-get install -y chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright not installed: pip install playwright")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`cm3leon serve` on a free loopback port with a tiny random model."""
    model = build_tiny_model_dir(tmp_path_factory.mktemp("browser") / "model", resolution=RES)
    port = free_port()
    log = tmp_path_factory.mktemp("browser-log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cm3leon.cli", "serve", "--model", str(model), "--port", str(port),
             "--threads", "1", "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cm3leon serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not come up:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_page_generates_captions_and_edits(server: str, tmp_path: Path) -> None:
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=FLAGS, viewport={"width": 1100, "height": 820})
        try:
            page = ctx.new_page()
            page.on("request", lambda r: requests.append(r.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            sync_api.expect(page.locator("#model-info")).to_contain_text(f"{RES}x{RES}")
            # record every preview image the SSE stream shows, even if replaced right after
            page.evaluate("""() => { window.previews = 0; new MutationObserver((ms) => { for (const m of ms)
                for (const n of m.addedNodes) if (n.querySelector && n.querySelector('img')) window.previews++; })
                .observe(document.querySelector('#preview'), {childList: true}); }""")
            page.fill("#prompt", "a red circle at the top left")
            page.fill("#n", "2")
            page.click("#generate-button")
            gallery = page.locator("#gallery img")
            sync_api.expect(gallery).to_have_count(2, timeout=60_000)
            sync_api.expect(page.locator("#generate-status")).to_contain_text("done")
            assert page.evaluate("window.previews") >= 2  # one preview per image at least once
            widths = page.evaluate("() => [...document.querySelectorAll('#gallery img')].map(i => i.naturalWidth)")
            assert widths == [RES, RES]
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)

            # server-side validation surfaces in the page
            page.fill("#prompt", "zq " * 650)
            page.click("#generate-button")
            sync_api.expect(page.locator("#generate-status")).to_contain_text("422", timeout=30_000)

            upload = tmp_path / "shape.png"
            rng = np.random.default_rng(0)
            Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(upload)
            page.click("#tab-caption")
            page.set_input_files("#caption-image", str(upload))
            page.click("#caption-form button[type=submit]")
            sync_api.expect(page.locator("#caption-status")).to_have_text("done", timeout=60_000)
            page.click("#tab-edit")
            page.set_input_files("#edit-image", str(upload))
            page.fill("#instruction", "make the square yellow")
            page.click("#edit-form button[type=submit]")
            sync_api.expect(gallery).to_have_count(3, timeout=60_000)
            assert errors == []
        finally:
            ctx.close()
    shot = Image.open(io.BytesIO((tmp_path / "serve.png").read_bytes()))
    assert shot.format == "PNG" and shot.size[0] >= 1000
    # nothing left loopback: no CDN, fonts or telemetry
    assert requests and all(u.startswith(server) or u.startswith("data:") for u in requests), requests
