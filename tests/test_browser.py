"""The demo page in real headless Chromium against a real ``fcn-serve`` on loopback.

Debian's ``chromium`` driven by Playwright (never ``playwright install``: no download at test
time). The server is the console script in a subprocess, with a small real weights file and
an API key, so the page is exercised exactly as a user meets it: key, upload, overlay, legend,
opacity, errors. What the page draws is compared with what the server itself renders.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_port, wait_for_http

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PHOTO = DATA / "demo-photos" / "dog.jpg"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "front-door-test-key"
MAX_BODY_BYTES = 2 * 1024 * 1024
ARTIFACTS = Path(os.environ.get("FCN_TEST_ARTIFACTS", REPO / "artifacts")) / "browser"
WAIT_MS = 120_000  # a cold CPU forward pass on a shared 2-core machine can take seconds


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright for Python is not installed (pip install playwright)",
    )
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(service_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fcn-serve`` as a user starts it, on a free loopback port, with an API key."""
    exe = shutil.which("fcn-serve")
    port = free_port()
    cmd = [exe] if exe else [sys.executable, "-m", "service"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {
        **os.environ,
        "FCN_WEIGHTS": str(service_weights),
        "FCN_API_KEY": API_KEY,
        "FCN_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "FCN_WARMUP": "false",
        "FCN_DEVICE": "cpu",
    }
    log_path = tmp_path_factory.mktemp("fcn-serve") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"{url}/readyz", 120, proc=proc, output=log_path.read_text)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_json(url: str, photo: Path) -> dict:
    r = httpx.post(
        f"{url}/segment",
        params={"output": "json"},
        files={"image": (photo.name, photo.read_bytes())},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def palette_rgb(url: str) -> list[list[int]]:
    r = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["palette"]


def share_text(fraction: float) -> str:
    """What the legend must show: one decimal, and a present class never as 0.0 %."""
    return "< 0.1 %" if 0 < fraction < 0.0005 else f"{100 * fraction:.1f} %"


def canvas_rgb(page: object) -> np.ndarray:
    """The canvas's pixels as H x W x 3, read through the page's own PNG export."""
    data_url = page.evaluate("() => document.getElementById('canvas').toDataURL('image/png')")  # type: ignore[attr-defined]
    png = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    print(f"screenshot: {path}")
    return path


def test_page_segments_a_real_photo(browser: object, server: str) -> None:
    if not PHOTO.is_file():
        pytest.skip(f"demo photo not found at {PHOTO}")
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")

    # Without the key the server refuses, and the page says what to do.
    info = page.locator("#model-info")
    page.wait_for_function(
        "() => !document.getElementById('model-info').textContent.startsWith('Loading')"
    )
    assert "API key" in info.inner_text()
    page.set_input_files("#file", str(PHOTO))
    page.wait_for_selector("body[data-state=error]", timeout=WAIT_MS)
    assert "needs an API key" in page.locator("#error").inner_text()

    # The key box was opened for the user; with the key (kept in localStorage), the model is
    # described and the photo segmented.
    assert page.locator("#api-key").is_visible()
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function(
        "() => document.getElementById('model-info').textContent.includes('fcn8s')"
    )
    assert "11 classes" in info.inner_text()
    assert page.evaluate("() => localStorage.getItem('fcn.apiKey')") == API_KEY
    page.set_input_files("#file", str(PHOTO))
    page.wait_for_selector("body[data-state=done]", timeout=WAIT_MS)
    assert page.locator("#error").is_hidden()

    # The legend is the server's own summary of this photo, with each class's colour.
    expected = server_json(server, PHOTO)
    palette = palette_rgb(server)
    rows = page.locator("#legend tbody tr")
    assert rows.count() == len(expected["classes"]) >= 2
    for i, cls in enumerate(expected["classes"]):
        row = rows.nth(i)
        cells = row.locator("td")
        assert cells.nth(1).inner_text() == cls["name"]
        assert cells.nth(2).inner_text() == share_text(cls["fraction"])
        swatch = row.locator(".swatch").evaluate("e => getComputedStyle(e).backgroundColor")
        r, g, b = palette[cls["index"]]
        assert swatch == f"rgb({r}, {g}, {b})"
    assert sum(c["pixels"] for c in expected["classes"]) == expected["width"] * expected["height"]

    # The latency split comes from Server-Timing.
    for stage in ("queue", "inference", "encode", "total"):
        text = page.locator(f"#timing dd[data-metric={stage}]").inner_text()
        assert text.endswith(" ms") and float(text.split()[0]) >= 0
    assert float(page.locator("#timing dd[data-metric=inference]").inner_text().split()[0]) > 0

    # The overlay: the photo under the class colours, as the server's output=overlay blends.
    width, height = Image.open(PHOTO).size
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(expected["labels_png_base64"]))))
    colours = np.asarray(palette, dtype=np.uint8)[labels]
    overlay = httpx.post(
        f"{server}/segment",
        params={"output": "overlay", "alpha": "0.5"},
        files={"image": (PHOTO.name, PHOTO.read_bytes())},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert overlay.status_code == 200, overlay.text
    server_overlay = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGB"))
    drawn = canvas_rgb(page)
    assert page.locator("#canvas").get_attribute("data-view") == "overlay"
    assert drawn.shape == (height, width, 3)
    diff = np.abs(drawn.astype(int) - server_overlay.astype(int))
    # Chromium's and Pillow's JPEG decoders may differ by a level or two; a wrong blend,
    # a shifted map or a missing photo would differ by tens.
    assert diff.mean() < 2.0, diff.mean()
    assert np.abs(drawn.astype(int) - colours.astype(int)).mean() > 10  # the photo shows through
    screenshot(page, "overlay.png")

    # Opacity 1 shows the class colours alone; the label-map view shows them exactly.
    page.locator("#alpha").fill("1")
    assert page.locator("#alpha-value").inner_text() == "1.00"
    np.testing.assert_array_equal(canvas_rgb(page), colours)
    page.locator("#alpha").fill("0.3")
    page.check("input[name=view][value=labels]")
    assert page.locator("#alpha").is_disabled()
    assert page.locator("#canvas").get_attribute("data-view") == "labels"
    np.testing.assert_array_equal(canvas_rgb(page), colours)
    assert errors == [], errors
    page.close()


def test_page_explains_bad_uploads(browser: object, server: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 700})  # type: ignore[attr-defined]
    page.goto(server + "/")
    page.evaluate(f"() => localStorage.setItem('fcn.apiKey', {API_KEY!r})")
    page.reload()
    page.wait_for_function(
        "() => document.getElementById('model-info').textContent.includes('fcn8s')"
    )

    # Dropped onto the drop zone, as a user drags a file from their desktop.
    dropped = page.evaluate_handle(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["not a picture\\n"], "notes.txt", {type: "text/plain"}));
            return dt;
        }"""
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("body[data-state=error]", timeout=WAIT_MS)
    message = page.locator("#error")
    assert message.is_visible()
    assert "not an image" in message.inner_text()
    assert "recognised image" in message.inner_text()  # the server's own detail, passed on
    assert page.locator("#result").is_hidden()
    screenshot(page, "error-not-an-image.png")

    # A body past FCN_MAX_BODY_BYTES: 413, said in words.
    big = np.random.default_rng(0).integers(0, 256, MAX_BODY_BYTES + 1024, dtype=np.uint8)
    page.set_input_files(
        "#file", files=[{"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": big.tobytes()}]
    )
    page.wait_for_function(
        "() => document.getElementById('error').textContent.includes('too large')",
        timeout=WAIT_MS,
    )
    assert message.is_visible()
    assert str(MAX_BODY_BYTES) in message.inner_text()
    page.close()


def test_the_model_picker_segments_with_the_chosen_model(
    browser: object, service_weights: Path, tmp_path: Path
) -> None:
    """Two models (the test CamVid model and the shipped 21-class VOC one): the picker lists
    both, describes the chosen one, and its legend is that model's answer for the photo."""
    voc = REPO / "weights" / "fcn8s-mnv2-voc.safetensors"
    if not PHOTO.is_file() or not voc.is_file():
        pytest.skip("needs the demo photo and the shipped VOC weights")
    exe = shutil.which("fcn-serve")
    port = free_port()
    cmd = [exe] if exe else [sys.executable, "-m", "service"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCN_")}
    env |= {
        "FCN_MODELS": f"street={service_weights},voc={voc}",
        "FCN_DEFAULT_MODEL": "street",
        "FCN_WARMUP": "false",
        "FCN_DEVICE": "cpu",
        "FCN_BACKEND": "torch",
    }
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"{url}/readyz", 120, proc=proc, output=log_path.read_text)
            page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
            page.goto(url + "/")
            page.wait_for_function(
                "() => document.getElementById('model-picker').options.length == 2"
            )
            assert page.locator("#model-picker").input_value() == "street"
            assert "11 classes" in page.locator("#model-info").inner_text()
            page.select_option("#model-picker", "voc")
            assert "21 classes" in page.locator("#model-info").inner_text()
            page.set_input_files("#file", str(PHOTO))
            page.wait_for_selector("body[data-state=done]", timeout=WAIT_MS)
            expected = httpx.post(
                f"{url}/segment",
                params={"output": "json", "model": "voc"},
                files={"image": (PHOTO.name, PHOTO.read_bytes())},
                timeout=120,
            ).json()
            names = page.locator("#legend tbody tr td:nth-child(2)").all_inner_texts()
            assert names == [c["name"] for c in expected["classes"]]
            assert "dog" in names  # a VOC class: the legend is the chosen model's
            screenshot(page, "model-picker.png")
        finally:
            proc.terminate()
            proc.wait(30)
