"""Several models in one service (``service/repository.py``): by name on every route, each with
its own queue (one model's backlog does not hold up another's requests), metrics by model, and
weights replaced, added and removed without downtime, tested with a closed-loop client on a
real server over loopback and real weights files whose labels differ."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core.weights import load_weights
from service.app import create_app
from tests.conftest import encode, labels_from_png, make_test_weights, run_server, test_settings

SIZE = (48, 64)  # (h, w): small real-photo crops keep the CPU passes short


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("variants")
    return {
        f"v{seed}": make_test_weights(
            folder / f"v{seed}.safetensors", seed, std=0.5, note=f"repository tests, seed {seed}"
        )
        for seed in range(4)
    }


@pytest.fixture(scope="module")
def photo() -> bytes:
    from tests.conftest import DEMO_PHOTOS

    rgb = Image.open(DEMO_PHOTOS / "dog.jpg").convert("RGB").resize(SIZE[::-1])
    return encode(rgb, "PNG")


@pytest.fixture(scope="module")
def labels_of(variants: dict[str, Path], photo: bytes) -> dict[str, np.ndarray]:
    """Each variant's own labels for the photo, by its content hash (what the service calls
    the version), computed here, in process."""
    rgb = np.array(Image.open(io.BytesIO(photo)).convert("RGB"))
    out = {}
    for path in variants.values():
        loaded = load_weights(path)
        x = loaded.meta.normalization(torch.from_numpy(rgb).permute(2, 0, 1)[None])
        with torch.inference_mode():
            out[loaded.meta.sha256[:12]] = loaded.model(x).max(1).indices[0].numpy()
    assert len({lab.tobytes() for lab in out.values()}) == len(out), "variants must differ"
    return out


def serve_folder(folder: Path, **overrides: object):
    """A live server of the repository ``folder`` (no FCN_WEIGHTS: every file in it)."""
    return run_server(create_app(test_settings(None, model_repository=str(folder), **overrides)))


def test_models_by_name_on_every_route(
    tmp_path: Path, variants: dict[str, Path], photo: bytes, labels_of: dict[str, np.ndarray]
) -> None:
    for name in ("v0", "v1"):
        shutil.copy(variants[name], tmp_path / f"{name}.safetensors")
    with serve_folder(tmp_path, default_model="v1", repository_poll_s=0) as live:
        listing = live.client.get("/v1/models").json()
        assert listing["default"] == "v1"
        assert [m["name"] for m in listing["models"]] == ["v0", "v1"]
        assert all(m["ready"] and m["memory_bytes"] >= 0 for m in listing["models"])
        for name in ("v0", "v1", None):
            params = {"model": name} if name else {}
            answer = live.client.post("/segment", params=params, files={"image": ("p.png", photo)})
            assert answer.status_code == 200
            version = answer.headers["X-Model-Version"]
            assert answer.headers["X-Model"] == (name or "v1")
            np.testing.assert_array_equal(labels_from_png(answer.content)[0], labels_of[version])
        batch = live.client.post(
            "/segment/batch", params={"model": "v0"}, files=[("images", ("p.png", photo))]
        )
        assert batch.status_code == 200 and batch.headers["X-Model"] == "v0"
        missing = live.client.post(
            "/segment", params={"model": "v9"}, files={"image": ("p", photo)}
        )
        assert missing.status_code == 404
        assert "unknown model 'v9'; known: v0, v1" in missing.json()["detail"]
        assert live.client.get("/v1/models/v0").json()["name"] == "v0"
        assert live.client.get("/v1/models/v9").status_code == 404
        assert live.client.get("/v1/model").json()["name"] == "v1"
        assert live.metric("fcn_images_total", model="v0") == 2
        assert live.metric("fcn_model_info", model="v1") == 1


def test_one_models_backlog_does_not_hold_up_another(
    tmp_path: Path, variants: dict[str, Path], photo: bytes
) -> None:
    """Model a gets a backlog of large images; a small request to model b is answered while
    a's queue is still full, because each model has its own queue and worker."""
    for name in ("v0", "v1"):
        shutil.copy(variants[name], tmp_path / f"{name}.safetensors")
    big = encode(Image.new("RGB", (640, 480), (90, 120, 60)), "PNG")
    with serve_folder(tmp_path, repository_poll_s=0, max_queue_size=64) as live:
        a_done: list[float] = []

        def flood() -> None:
            with httpx.Client(base_url=live.url, timeout=120) as c:
                c.post("/segment", params={"model": "v0"}, files={"image": ("b", big)})
                a_done.append(time.monotonic())

        threads = [threading.Thread(target=flood) for _ in range(16)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while live.metric("fcn_queue_depth", model="v0") < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.metric("fcn_queue_depth", model="v0") >= 4, "no backlog formed"
        start = time.monotonic()
        answer = live.client.post("/segment", params={"model": "v1"}, files={"image": ("p", photo)})
        b_done = time.monotonic()
        assert answer.status_code == 200
        backlog_left = live.metric("fcn_queue_depth", model="v0")
        for t in threads:
            t.join()
        assert backlog_left >= 1, "model b waited until model a's backlog was gone"
        assert b_done < max(a_done)
        assert b_done - start < 0.5 * (max(a_done) - start)


def test_replacing_the_weights_three_times_under_load_fails_no_request(
    tmp_path: Path, variants: dict[str, Path], photo: bytes, labels_of: dict[str, np.ndarray]
) -> None:
    """A closed-loop client keeps requests in flight while the file is replaced three times
    (the poller sees each): no request fails, and every answer's labels are those of the
    weights its X-Model-Version names."""
    live_file = tmp_path / "m.safetensors"
    shutil.copy(variants["v0"], live_file)
    answers: list[tuple[str, np.ndarray | None, int, float]] = []
    stop = threading.Event()
    with serve_folder(tmp_path, repository_poll_s=0.2) as live:

        def client() -> None:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    r = c.post("/segment", params={"model": "m"}, files={"image": ("p", photo)})
                    labels = labels_from_png(r.content)[0] if r.status_code == 200 else None
                    answers.append(
                        (
                            r.headers.get("X-Model-Version", ""),
                            labels,
                            r.status_code,
                            time.monotonic() - sent,
                        )
                    )

        workers = [threading.Thread(target=client) for _ in range(3)]
        for w in workers:
            w.start()
        seen = []
        for name in ("v1", "v2", "v3"):
            time.sleep(1.0)
            staged = tmp_path / f".{name}.tmp"  # written beside, then renamed: atomic
            shutil.copy(variants[name], staged)
            staged.rename(live_file)
            want = load_weights(variants[name]).meta.sha256[:12]
            deadline = time.monotonic() + 60
            while live.client.get("/v1/models/m").json()["version"] != want:
                assert time.monotonic() < deadline, f"{name} was not swapped in"
                time.sleep(0.05)
            seen.append(want)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join()
    failed = [a for a in answers if a[2] != 200]
    assert not failed, failed[:3]
    versions = {a[0] for a in answers}
    assert set(seen) <= versions and len(versions) == 4  # all four served at some point
    for version, labels, _, _ in answers:
        np.testing.assert_array_equal(labels, labels_of[version])
    print(f"{len(answers)} requests, 0 failed, 3 swaps, longest {max(a[3] for a in answers):.3f} s")


def test_a_broken_file_leaves_the_old_model_serving_and_says_why(
    tmp_path: Path, variants: dict[str, Path], photo: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(variants["v0"], tmp_path / "m.safetensors")
    with serve_folder(tmp_path, repository_poll_s=0, api_key="k") as live:
        auth = {"Authorization": "Bearer k"}
        before = live.client.get("/v1/models/m", headers=auth).json()["version"]
        (tmp_path / "m.safetensors").write_bytes(b"not a safetensors file")
        refused = live.client.post("/v2/repository/models/m/load", headers=auth)
        assert refused.status_code == 400 and "not loaded" in refused.json()["error"]
        assert f"model m not loaded from {tmp_path / 'm.safetensors'}" in caplog.text
        assert f"m {before} keeps serving" in caplog.text
        assert live.client.post("/v2/repository/models/m/load").status_code == 401  # the key
        ok = live.client.post(
            "/segment", params={"model": "m"}, headers=auth, files={"image": ("p", photo)}
        )
        assert ok.status_code == 200 and ok.headers["X-Model-Version"] == before
        # A new file by the API, then unloaded by the API.
        shutil.copy(variants["v1"], tmp_path / "extra.safetensors")
        loaded = live.client.post("/v2/repository/models/extra/load", headers=auth)
        assert loaded.status_code == 200 and loaded.json()["name"] == "extra"
        index = live.client.post("/v2/repository/index", headers=auth).json()
        assert {m["name"] for m in index} == {"m", "extra"}
        assert (
            live.client.post("/v2/repository/models/extra/unload", headers=auth).status_code == 200
        )
        assert live.client.get("/v1/models/extra", headers=auth).status_code == 404
        assert live.client.get("/v2/models/extra/ready", headers=auth).status_code == 400
        assert live.metric("fcn_model_info", model="extra") == 0  # its series are gone


def test_the_poller_adds_and_removes_models(tmp_path: Path, variants: dict[str, Path]) -> None:
    shutil.copy(variants["v0"], tmp_path / "a.safetensors")
    with serve_folder(tmp_path, repository_poll_s=0.2) as live:
        shutil.copy(variants["v1"], tmp_path / "b.safetensors")
        wait_for(lambda: live.client.get("/v1/models/b").status_code == 200)
        (tmp_path / "b.safetensors").unlink()
        wait_for(lambda: live.client.get("/v1/models/b").status_code == 404)
        assert [m["name"] for m in live.client.get("/v1/models").json()["models"]] == ["a"]


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_fcn_segment_and_the_sdk_name_the_model(
    tmp_path: Path, variants: dict[str, Path], photo: bytes, labels_of: dict[str, np.ndarray]
) -> None:
    from fcn_client.cli import main
    from fcn_client.sdk import SegmentationClient

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("v0", "v1"):
        shutil.copy(variants[name], repo / f"{name}.safetensors")
    image = tmp_path / "photo.png"
    image.write_bytes(photo)
    with serve_folder(repo, repository_poll_s=0, default_model="v0") as live:
        out = tmp_path / "out"
        argv = [str(image), "--server", live.url, "--model", "v1", "-o", str(out)]
        assert main([*argv, "--no-progress"]) == 0
        v1 = load_weights(variants["v1"]).meta.sha256[:12]
        np.testing.assert_array_equal(
            labels_from_png((out / "photo.png").read_bytes())[0], labels_of[v1]
        )
        with SegmentationClient(live.url) as client:
            assert client.models()["default"] == "v0"
            assert client.model("v1")["version"] == v1
            answer = client.segment(photo, model="v1")
            np.testing.assert_array_equal(labels_from_png(answer.content)[0], labels_of[v1])
