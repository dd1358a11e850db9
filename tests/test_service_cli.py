"""``fcn-serve`` / ``python -m service`` as a real process: configured from the environment,
serving a photo, refusing a missing weights file in one clear line, stopping on SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fcn_core.weights import LoadedWeights, read_metadata
from service.cli import main
from service.settings import DEFAULT_WEIGHTS, PACKAGE_ROOT, Settings
from tests.conftest import DEMO_PHOTOS, LiveServer, labels_from_png, predict
from tests.helpers import free_port, start_server, stop_server, wait_for_http

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCN_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def start(env: dict[str, str], cwd: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    return start_server(cmd, env, cwd)


def test_serves_a_photo_from_the_environment_and_stops_on_sigterm(
    service_weights: Path, reference: LoadedWeights, tmp_path: Path
) -> None:
    photo = DEMO_PHOTOS / "person.jpg"
    if not photo.is_file():
        pytest.skip(f"demo photo not found at {photo}")
    port = free_port()
    # torch, whose labels the reference is (another runtime may flip the untrained model's
    # near-ties: the backends have tests of their own).
    env = clean_env(
        FCN_WEIGHTS=str(service_weights), FCN_WARMUP_SIZES="64x48,100x60", FCN_BACKEND="torch"
    )
    proc = start(env, tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", 120, proc=proc, output=proc.stdout.read)
        # What the README's curl does: the raw photo, labels back.
        response = httpx.post(
            f"{url}/segment",
            content=photo.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        labels, _ = labels_from_png(response.content)
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        np.testing.assert_array_equal(labels, predict(reference, rgb))
        assert httpx.get(f"{url}/v1/model").json()["sha256"] == reference.meta.sha256
    finally:
        out = stop_server(proc)
    assert "warm-up of 64x48,100x60" in out
    assert "Application shutdown complete" in out


def test_missing_weights_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FCN_WEIGHTS", str(tmp_path / "nope.safetensors"))
    assert main(["--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "weights file not found" in err and "nope.safetensors" in err and "FCN_WEIGHTS" in err
    assert "Traceback" not in err


def test_bad_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FCN_PRECISION", "fp8")
    monkeypatch.setenv("FCN_MAX_BATCH_SIZE", "-1")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "max_batch_size" in err


def test_settings_table_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings"]) == 0
    out = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert f"`FCN_{name.upper()}`" in out
        assert field.description, f"{name} has no description"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCN_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("FCN_API_KEY", "k")
    monkeypatch.setenv("FCN_WARMUP_SIZES", "480x360, 64x32")
    s = Settings()
    assert s.max_batch_size == 3
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert s.warmup_shapes() == [(360, 480), (32, 64)]
    assert "k" not in repr(s.api_key)
    # A compiled model warms a whole tile too, unless tiling is off.
    monkeypatch.setenv("FCN_COMPILE", "true")
    assert Settings().warmup_shapes() == [(360, 480), (32, 64), (1536, 1536)]
    monkeypatch.setenv("FCN_TILE", "off")
    assert Settings().warmup_shapes() == [(360, 480), (32, 64)]


def test_relative_weights_path_resolves_from_cwd_then_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    local = tmp_path / "weights" / "mine.safetensors"
    local.write_bytes(b"x")
    assert Settings(weights=Path("weights/mine.safetensors")).resolved_weights() == Path(
        "weights/mine.safetensors"
    )
    assert Settings().weights == DEFAULT_WEIGHTS
    shipped = PACKAGE_ROOT / DEFAULT_WEIGHTS
    if shipped.is_file():
        assert Settings().resolved_weights() == shipped
    else:
        assert Settings().resolved_weights() == DEFAULT_WEIGHTS  # named as given, in the error


def test_no_configuration_serves_the_shipped_weights(tmp_path: Path) -> None:
    """`fcn-serve` with no FCN_* variables, started outside the repository, on the CPU."""
    shipped = PACKAGE_ROOT / DEFAULT_WEIGHTS
    if not shipped.is_file():
        pytest.skip(f"the shipped weights are not there yet: {shipped}")
    port = free_port()
    proc = start(clean_env(CUDA_VISIBLE_DEVICES=""), tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", 120, proc=proc, output=proc.stdout.read)
        info = httpx.get(f"{url}/v1/model").json()
        assert info["sha256"] == read_metadata(shipped).sha256
        assert info["device"] == "cpu"
        photo = DEMO_PHOTOS / "dog.jpg"
        if photo.is_file():
            response = httpx.post(
                f"{url}/segment",
                files={"image": ("dog.jpg", photo.read_bytes())},
                params={"output": "json"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            assert (response.json()["width"], response.json()["height"]) == (768, 576)
    finally:
        stop_server(proc)


def test_readme_settings_table_is_the_codes() -> None:
    """The README's settings table is `fcn-serve --settings` verbatim, so it cannot drift."""
    from service.settings import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert Settings.table() in readme


def test_a_default_cpu_server_runs_a_worker_per_core(live: LiveServer) -> None:
    from fcn_core.inference import usable_cores

    state = live.state
    assert state.runner is not None and state.batcher is not None
    workers = usable_cores()
    pool = state.runner.predictor._pool
    assert (pool._max_workers if pool else 1) == workers
    assert state.batcher.max_batch_size == workers
