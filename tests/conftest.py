"""Shared fixtures: a small real weights file, the model's own predictions, live servers.

Servers are the real app under real uvicorn on a loopback port (in a thread of the test
process, so tests can reach the app's state and plug in instrumented models). Expected label
maps come from the weights file loaded on its own: normalisation, forward, argmax.
"""

from __future__ import annotations

import copy
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE
from fcn_core.models import build_model, grouped_upsampling
from fcn_core.preprocess import HALF_RGB
from fcn_core.weights import LoadedWeights, WeightsMetadata, load_weights, save_weights
from service.app import create_app
from service.settings import Settings
from service.state import ServiceState

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO_PHOTOS = SHARED_DATA / "demo-photos"


def make_test_weights(path: Path, seed: int = 0, std: float = 0.05, note: str = "") -> Path:
    """An untrained Lite0 FCN-8s for CamVid's 11 classes, score layers drawn at random (by
    ``seed``) so that its label maps are not all zeros (the paper zero-initialises them) and
    two seeds label a photo differently."""
    torch.manual_seed(seed)
    model = build_model("fcn8s", len(CAMVID_CLASSES), "efficientnet_lite0")
    for name, module in model.named_modules():
        if name.startswith("score"):
            torch.nn.init.normal_(module.weight, std=std)
    meta = WeightsMetadata(
        arch="fcn8s",
        backbone="efficientnet_lite0",
        class_names=list(CAMVID_CLASSES),
        palette=[list(c) for c in CAMVID_PALETTE],
        normalization=HALF_RGB,
        dataset=f"none ({note or 'service tests'})",
        metrics={"mean_iu": 0.0},
        metrics_split="none",
    )
    save_weights(path, model, meta)
    return path


@pytest.fixture(scope="session")
def service_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_weights(tmp_path_factory.mktemp("weights") / "test-fcn8s-lite0.safetensors")


@pytest.fixture(scope="session")
def reference(service_weights: Path) -> LoadedWeights:
    return load_weights(service_weights)


# References run on one torch thread, as the test servers do (``torch_threads=1`` below): the
# untrained test model has near-ties that another thread count can flip.
_ONE_THREAD = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))


_SERVED: dict[int, nn.Module] = {}


def _served(reference: LoadedWeights) -> nn.Module:
    """The network as the service runs it on torch on a CPU by default: upsampling grouped
    and channels-last. Either sums in another order than the module as loaded, which can
    flip a near-tie of the untrained test model (test_models.py and test_runner.py hold the
    forms to each other)."""
    key = id(reference)
    if key not in _SERVED:
        served = grouped_upsampling(copy.deepcopy(reference.model))
        _SERVED[key] = served.to(memory_format=torch.channels_last)
    return _SERVED[key]


def predict(reference: LoadedWeights, rgb: np.ndarray) -> np.ndarray:
    """The model's own label map for one H x W x 3 uint8 image."""
    return _ONE_THREAD.submit(_predict, reference, rgb).result()


def _predict(reference: LoadedWeights, rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = _served(reference)(reference.meta.normalization(x, torch.channels_last))
    return logits.argmax(1)[0].to(torch.uint8).numpy()


# -- live servers ---------------------------------------------------------------------------


@dataclass
class LiveServer:
    url: str
    app: object
    client: httpx.Client
    server: uvicorn.Server

    @property
    def state(self) -> ServiceState:
        return self.app.state.service  # type: ignore[attr-defined]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = self.client.get("/metrics").text
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            value
            for have, value in self.metrics().get(name, [])
            if all(have.get(k) == v for k, v in labels.items())
        )


@contextmanager
def run_server(app: object, startup_timeout: float = 120.0) -> Iterator[LiveServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    end = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/readyz").json()["ready"] is True
        try:
            yield LiveServer(url, app, client, server)
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()


def test_settings(default_weights: Path | None, **overrides: object) -> Settings:
    """The tests' settings: ``default_weights`` served alone (None: leave FCN_WEIGHTS unset,
    for a repository of models)."""
    values: dict[str, object] = {
        "warmup": False,
        "codec_threads": 2,
        "max_queue_delay_ms": 2.0,
        "torch_threads": 1,  # as the references (predict) are computed; workers stay automatic
        # The references are torch's; the ONNX backends are held to them by pixel agreement
        # (tests/test_backends.py), as a runtime's arithmetic may flip near-ties.
        "backend": "torch",
    }
    if default_weights is not None:
        values["weights"] = default_weights
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # a helper, not a test


ServeFactory = Callable[..., LiveServer]


@pytest.fixture
def serve(service_weights: Path) -> Iterator[ServeFactory]:
    """``serve(model=None, meta=None, **settings)``: a live server, stopped after the test."""
    with ExitStack() as stack:

        def start(
            model: nn.Module | None = None, meta: WeightsMetadata | None = None, **overrides: object
        ) -> LiveServer:
            app = create_app(test_settings(service_weights, **overrides), model=model, meta=meta)
            return stack.enter_context(run_server(app))

        yield start


@pytest.fixture(scope="module")
def live(service_weights: Path) -> Iterator[LiveServer]:
    """One default server shared by a module's tests."""
    with run_server(create_app(test_settings(service_weights))) as server:
        yield server


# -- image bytes ----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours (a noise image would be all one class for any model)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img).copy()


def png_16bit_rgb(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no data (a decompression bomb's
    header): only a decoder that trusts the header before decoding can refuse it cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def labels_from_png(data: bytes) -> tuple[np.ndarray, Image.Image]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    assert img.mode == "P", f"label map must be a palette PNG, not {img.mode}"
    return np.asarray(img), img


def demo_photos() -> list[Path]:
    photos = sorted(DEMO_PHOTOS.glob("*.jpg"))
    if not photos:
        pytest.skip(f"demo photos not found at {DEMO_PHOTOS}")
    return photos


class InstrumentedModel(nn.Module):
    """Wraps the real model to slow it down, count its calls, or make it run out of memory,
    the way a loaded GPU would; the forward pass itself is the real one."""

    def __init__(
        self,
        inner: nn.Module,
        delay_s: float = 0.0,
        oom_above: int | None = None,
        oom_wider_than: int | None = None,
    ) -> None:
        super().__init__()
        self.inner = grouped_upsampling(inner)  # as the service would run it unwrapped
        self.delay_s = delay_s
        self.oom_above = oom_above
        self.oom_wider_than = oom_wider_than
        self.calls: list[tuple[int, bool]] = []  # (batch size, ran)
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.entered.set()
        too_many = self.oom_above is not None and n > self.oom_above
        too_wide = self.oom_wider_than is not None and x.shape[-1] > self.oom_wider_than
        if too_many or too_wide:
            self.calls.append((n, False))
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, batch {n})")
        time.sleep(self.delay_s)
        self.calls.append((n, True))
        return self.inner(x)

    @property
    def images_computed(self) -> int:
        return sum(n for n, ran in self.calls if ran)
