"""``fcn-serve`` / ``python -m service`` as a real process: configured from the environment,
serving a photo, refusing a missing weights file in one clear line, stopping on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fcn_core.weights import LoadedWeights, read_metadata
from service.cli import main
from service.settings import DEFAULT_WEIGHTS, PACKAGE_ROOT, Settings
from tests.conftest import DEMO_PHOTOS, LiveServer, labels_from_png, predict

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCN_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def start(env: dict[str, str], cwd: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"fcn-serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"fcn-serve was not ready in {timeout} s:\n{proc.stdout.read()}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"fcn-serve ignored SIGTERM:\n{out}")
    # uvicorn re-raises the signal it handled once it has shut down cleanly.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
    return out


def test_serves_a_photo_from_the_environment_and_stops_on_sigterm(
    service_weights: Path, reference: LoadedWeights, tmp_path: Path
) -> None:
    photo = DEMO_PHOTOS / "person.jpg"
    if not photo.is_file():
        pytest.skip(f"demo photo not found at {photo}")
    port = free_port()
    env = clean_env(FCN_WEIGHTS=str(service_weights), FCN_WARMUP_SIZES="64x48,100x60")
    proc = start(env, tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
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
        out = stop(proc)
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
        wait_ready(proc, url)
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
        stop(proc)


def test_readme_settings_table_is_the_codes() -> None:
    """The README's settings table is `fcn-serve --settings` verbatim, so it cannot drift."""
    from service.settings import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert Settings.table() in readme


def test_automatic_settings_follow_the_device() -> None:
    from service.settings import usable_cores

    auto = Settings()
    cores = usable_cores()
    assert (auto.resolved_cpu_workers("cpu"), auto.resolved_cpu_workers("cuda")) == (cores, 1)
    assert auto.resolved_max_batch_size("cpu") == cores  # a batch = one image per worker
    assert auto.resolved_max_batch_size("cuda") == 8
    assert auto.resolved_torch_threads("cuda") == 0  # torch's default
    assert auto.resolved_torch_threads("cpu") == (1 if cores > 1 else 0)
    chosen = Settings(cpu_workers=3, max_batch_size=5, torch_threads=2)
    assert chosen.resolved_cpu_workers("cpu") == 3
    assert chosen.resolved_max_batch_size("cuda") == chosen.resolved_max_batch_size("cpu") == 5
    assert chosen.resolved_torch_threads("cpu") == 2


def test_a_default_cpu_server_runs_a_worker_per_core(live: LiveServer) -> None:
    from service.settings import usable_cores

    state = live.state
    assert state.runner is not None and state.batcher is not None
    workers = usable_cores()
    pool = state.runner._pool
    assert (pool._max_workers if pool else 1) == workers
    assert state.batcher.max_batch_size == workers


def test_usable_cores_honour_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    from service.settings import usable_cores

    unlimited = usable_cores(tmp_path / "absent")
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == unlimited
    cpu_max.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert usable_cores(cpu_max) == min(unlimited, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("garbage\n")
    assert usable_cores(cpu_max) == unlimited
