"""The web page in a real headless Chromium against the real server (`cm3leon serve` in a
subprocess): type a prompt, generate, see the progressive preview and the gallery; caption,
ask about and edit an uploaded image, shown beside the result. Skips when Chromium or
Playwright is not installed.

Chromium comes from Debian (``apt-get install -y chromium``); Playwright only drives it
(``executable_path``): nothing is downloaded. With ``CM3LEON_DOCS_SCREENSHOTS=1`` the tab
test writes its screenshots into ``docs/img/`` (serve_generate.png, serve_caption.png,
serve_ask.png, serve_edit.png) instead of a temporary directory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from cm3leon.shapes.dataset import iter_examples
from helpers import build_tiny_model_dir, free_port

CHROMIUM = os.environ.get("CM3LEON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
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
            sync_api.expect(page.locator("#edit-out figure.after img")).to_have_count(1, timeout=60_000)
            sync_api.expect(gallery).to_have_count(2)  # edits have their own result area
            assert errors == []
        finally:
            ctx.close()
    shot = Image.open(io.BytesIO((tmp_path / "serve.png").read_bytes()))
    assert shot.format == "PNG" and shot.size[0] >= 1000
    # nothing left loopback: no CDN, fonts or telemetry (blob: URLs are the page's own upload previews)
    assert requests and all(u.startswith((server, "data:", "blob:" + server)) for u in requests), requests


def _shown(page: Any, selector: str) -> dict[str, Any]:
    """src and natural size of the image ``selector``, once it has loaded."""
    page.wait_for_function("(s) => { const i = document.querySelector(s); "
                           "return i && i.complete && i.naturalWidth > 0; }", arg=selector, timeout=30_000)
    return page.evaluate("(s) => { const i = document.querySelector(s); return {src: i.getAttribute('src'), "
                         "width: i.naturalWidth, visible: i.offsetWidth > 0}; }", selector)


def test_tabs_show_the_upload_beside_the_result(server: str, tmp_path: Path) -> None:
    """Caption, ask and edit show the chosen image at once (an object URL preview) next to the
    answer; an edit lands in the edit tab as before / after; the generate tab's variety controls
    (seed, new seed, new seed each time, temperature) are visible and drive the request."""
    shots = DOCS_IMG if os.environ.get("CM3LEON_DOCS_SCREENSHOTS") else tmp_path
    record = next(iter_examples(1))
    upload = tmp_path / "shapes.png"
    record.image.save(upload)
    sent: list[dict[str, Any]] = []
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=FLAGS, viewport={"width": 1000, "height": 700})
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/stream") else None)
            page.goto(server + "/")
            sync_api.expect(page.locator("#model-info")).to_contain_text(f"{RES}x{RES}")

            # generate: the variety controls are on screen and labelled; "new seed each time" sends a fresh seed
            for sel in ("#seed", "#vary", "#new-seed-each", "#temperature"):
                sync_api.expect(page.locator(sel)).to_be_visible()
            sync_api.expect(page.locator("label", has=page.locator("#seed"))).to_contain_text("blank = random")
            sync_api.expect(page.locator("label", has=page.locator("#temperature"))).to_contain_text("more varied")
            page.click("#vary")
            first = page.input_value("#seed")
            assert first.isdigit()
            page.check("#new-seed-each")
            page.fill("#prompt", record.meta["captions"]["detailed"])
            page.fill("#n", "2")
            page.click("#generate-button")
            sync_api.expect(page.locator("#generate-status")).to_contain_text("done", timeout=60_000)
            seed = page.input_value("#seed")
            assert seed.isdigit() and seed != first
            assert sent[-1]["seed"] == int(seed)
            sync_api.expect(page.locator("#generate-status")).to_contain_text(f"seed {seed}")
            page.screenshot(path=str(shots / "serve_generate.png"))

            page.click("#tab-caption")
            page.set_input_files("#caption-image", str(upload))
            shown = _shown(page, "#caption-preview")
            assert shown["src"].startswith("blob:") and shown["width"] == record.image.width and shown["visible"]
            page.click("#caption-form button[type=submit]")
            sync_api.expect(page.locator("#caption-status")).to_have_text("done", timeout=60_000)
            assert page.text_content("#caption-out").strip()
            page.screenshot(path=str(shots / "serve_caption.png"))

            page.click("#tab-ask")
            page.set_input_files("#ask-image", str(upload))
            assert _shown(page, "#ask-preview")["width"] == record.image.width
            question = record.meta["vqa"][0]["question"]
            page.fill("#question", question)
            page.click("#ask-form button[type=submit]")
            sync_api.expect(page.locator("#ask-status")).to_have_text("done", timeout=60_000)
            sync_api.expect(page.locator("#ask-out")).to_contain_text(f"Q: {question}")
            sync_api.expect(page.locator("#ask-out")).to_contain_text("A: ")
            page.screenshot(path=str(shots / "serve_ask.png"))

            page.click("#tab-edit")
            page.set_input_files("#edit-image", str(upload))
            assert _shown(page, "#edit-preview")["width"] == record.image.width
            page.fill("#instruction", record.meta["edit"]["instruction"])
            page.fill("#edit-form [name=n]", "2")
            page.click("#edit-form button[type=submit]")
            result = page.locator("#edit-out .edit-result").first
            sync_api.expect(result.locator("figure.after img")).to_have_count(2, timeout=60_000)
            sync_api.expect(result.locator("figure.before img")).to_have_count(1)
            sync_api.expect(result).to_contain_text(record.meta["edit"]["instruction"])
            before = _shown(page, "#edit-out .edit-result figure.before img")
            assert before["src"].startswith("blob:") and before["width"] == record.image.width
            after = _shown(page, "#edit-out .edit-result figure.after img")
            assert after["src"].startswith("data:image/png") and after["width"] == RES
            # before and after sit side by side: same row, after to the right
            boxes = [result.locator(sel).first.bounding_box() for sel in ("figure.before", "figure.after")]
            assert boxes[0] and boxes[1] and abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and boxes[1]["x"] > boxes[0]["x"]
            assert page.locator("#gallery img").count() == 2  # only the generated images
            result.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "serve_edit.png"))
            assert errors == []
        finally:
            ctx.close()
    for name in ("serve_generate", "serve_caption", "serve_ask", "serve_edit"):
        assert Image.open(shots / f"{name}.png").size == (1000, 700)
