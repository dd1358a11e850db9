"""``fcn-segment --local``: the server's settings, batches and bytes, without a server.

Real weights file, real photos, a real server on loopback to compare with; the model that
counts forward passes wraps the real one. Every ``FCN_*`` variable is cleared first, so a
developer's environment cannot leak into what is checked.
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fcn_client.cli import main
from fcn_client.jobs import collect_jobs, run_jobs
from fcn_client.local import LocalBackend
from fcn_client.sdk import SegmentationClient, SegmentationError
from fcn_client.wire import ImageFormat, Output
from fcn_core.inference import Predictor
from fcn_core.weights import LoadedWeights
from service.settings import Settings
from tests.conftest import (
    InstrumentedModel,
    ServeFactory,
    demo_photos,
    labels_from_png,
    predict,
)
from tests.test_client import camvid_frames, rgb


@pytest.fixture
def local_env(monkeypatch: pytest.MonkeyPatch, service_weights: Path) -> Iterator[None]:
    """No inherited FCN_* settings; the test weights; no warm-up unless a test asks for it;
    torch, whose labels the references are (the backends have tests of their own). The torch
    backend sets the calling thread's thread count, so it is put back afterwards."""
    for name in [n for n in os.environ if n.startswith("FCN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FCN_WEIGHTS", str(service_weights))
    monkeypatch.setenv("FCN_WARMUP", "false")
    monkeypatch.setenv("FCN_BACKEND", "torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def segment_one(backend: LocalBackend, photo: Path, output: Output = Output.labels) -> bytes:
    async def one() -> bytes:
        return (await backend.segment(photo, [output], ImageFormat.png, 0.5))[output]

    return asyncio.run(one())


def refuses_large_images(backend: LocalBackend) -> bool:
    try:
        segment_one(backend, demo_photos()[0])
    except SegmentationError as exc:
        return exc.status == 413
    return False


def is_channels_last(backend: LocalBackend) -> bool:
    p = backend.segmenter.predictor
    conv = next(w for w in p.model.parameters() if w.dim() == 4 and w.shape[-1] > 1)
    return p._memory_format is torch.channels_last and conv.is_contiguous(
        memory_format=torch.channels_last
    )


def predictor(backend: LocalBackend) -> Predictor:
    return backend.segmenter.predictor


Check = Callable[[LocalBackend], bool]

# Every setting that changes the labels or the speed: the environment it is set in, and
# what must then be true of the backend (and false without it).
SETTINGS: list[tuple[str, dict[str, str], Check]] = [
    ("device", {"FCN_DEVICE": "cpu"}, lambda b: predictor(b).config.device == "cpu"),
    ("backend", {"FCN_BACKEND": "onnxruntime"}, lambda b: predictor(b).backend == "onnxruntime"),
    (
        "cache_dir",
        {"FCN_CACHE_DIR": "/tmp/fcn-cache"},
        lambda b: predictor(b).config.cache_dir == "/tmp/fcn-cache",
    ),
    ("precision", {"FCN_PRECISION": "bf16"}, lambda b: predictor(b).config.precision == "bf16"),
    # On by default for torch on the CPU (``auto``), so the setting's visible effect is off.
    ("channels_last", {"FCN_CHANNELS_LAST": "false"}, lambda b: not is_channels_last(b)),
    (
        "compile",
        {"FCN_COMPILE": "true"},
        lambda b: predictor(b)._net.module is not predictor(b).model,
    ),
    (
        "compile_mode",
        {"FCN_COMPILE": "true", "FCN_COMPILE_MODE": "max-autotune-no-cudagraphs"},
        lambda b: predictor(b).config.compile_mode == "max-autotune-no-cudagraphs",
    ),
    (
        "cpu_workers",
        {"FCN_CPU_WORKERS": "5"},
        lambda b: getattr(predictor(b)._pool, "_max_workers", 1) == 5,
    ),
    (
        "torch_threads",
        {"FCN_TORCH_THREADS": "3"},
        lambda b: predictor(b)._pool_threads == predictor(b)._alone_threads == 3,
    ),
    (
        "max_batch_size",
        {"FCN_MAX_BATCH_SIZE": "7"},
        lambda b: predictor(b).max_batch_size() == 7 and b.window.size == 7,
    ),
    (
        "max_batch_pixels",
        {"FCN_MAX_BATCH_PIXELS": "250000"},  # one 480x360 frame's bucket, not two
        lambda b: (
            predictor(b).config.max_batch_pixels == 250_000
            and predictor(b).capacity((384, 480)) == 1
        ),
    ),
    (
        "bucket_multiple",
        {"FCN_BUCKET_MULTIPLE": "64"},
        lambda b: predictor(b).bucket_multiple == 64,
    ),
    (
        "cudnn_benchmark",
        {"FCN_CUDNN_BENCHMARK": "false"},
        lambda b: predictor(b).config.cudnn_benchmark is False,
    ),
    (
        "warmup",
        {"FCN_WARMUP": "true", "FCN_WARMUP_SIZES": "64x32"},
        lambda b: (32, 64) in predictor(b)._warmed_batch_sizes,
    ),
    ("codec_threads", {"FCN_CODEC_THREADS": "5"}, lambda b: b._codecs._max_workers == 5),
    ("max_image_pixels", {"FCN_MAX_IMAGE_PIXELS": "1000"}, refuses_large_images),
    ("trivial_model", {"FCN_TRIVIAL_MODEL": "true"}, lambda b: b.meta.arch == "trivial"),
]


@pytest.mark.parametrize(
    ("env", "check"), [pytest.param(env, check, id=name) for name, env, check in SETTINGS]
)
def test_local_honours_every_setting(
    local_env: None, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], check: Check
) -> None:
    default = LocalBackend.from_environment()
    assert not check(default), "the check holds without the setting: it proves nothing"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    configured = LocalBackend.from_environment()
    assert check(configured)
    for backend in (default, configured):
        asyncio.run(backend.aclose())


def test_device_flag_overrides_the_environment(
    local_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.setenv("FCN_DEVICE", "cuda:7")
    backend = LocalBackend.from_environment(device="cpu")
    assert predictor(backend).device == torch.device("cpu")
    asyncio.run(backend.aclose())
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.setenv("FCN_DEVICE", "cpu")
    frame = str(camvid_frames(1)[0])
    code = main([frame, "--local", "--device", "cuda:7", "-o", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "--local: " in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_local_answers_are_the_servers_bytes(
    local_env: None,
    serve: ServeFactory,
    service_weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Downscaled inputs (max side 320) whose label maps are scaled back, a JPEG overlay,
    and JSON: each byte for byte what the server answers with the same settings."""
    server = serve(max_side=320)  # torch_threads=1, as tests/conftest.py sets it
    monkeypatch.setenv("FCN_MAX_SIDE", "320")
    monkeypatch.setenv("FCN_TORCH_THREADS", "1")
    photos = demo_photos()[:3] + camvid_frames(1)
    args = [str(p) for p in photos] + ["--output", "both", "--format", "jpeg", "--alpha", "0.3"]
    assert (
        main([*args, "--server", server.url, "-o", str(tmp_path / "remote"), "--no-progress"]) == 0
    )
    assert main([*args, "--local", "-o", str(tmp_path / "local"), "--no-progress"]) == 0
    remote = sorted((tmp_path / "remote").iterdir())
    assert len(remote) == 2 * len(photos)
    for path in remote:
        assert (tmp_path / "local" / path.name).read_bytes() == path.read_bytes(), path.name
        if path.suffix == ".png":  # at the photo's own size, though computed at 320
            source = next(p for p in photos if p.stem == path.stem)
            assert labels_from_png(path.read_bytes())[0].shape == rgb(source).shape[:2]

    backend = LocalBackend.from_environment()

    async def all_json() -> list[dict[Output, bytes]]:
        return await asyncio.gather(
            *(backend.segment(p, [Output.json], ImageFormat.png, 0.5) for p in photos)
        )

    local_json = asyncio.run(all_json())
    asyncio.run(backend.aclose())
    with SegmentationClient(server.url) as client:
        for photo, local in zip(photos, local_json, strict=True):
            assert local[Output.json] == client.segment(photo, output="json").content, photo.name


def test_local_runs_several_images_per_forward_pass(
    local_env: None, monkeypatch: pytest.MonkeyPatch, reference: LoadedWeights, tmp_path: Path
) -> None:
    """Six frames of one size, batches of three: two forward passes of three images each
    (one CPU worker, so a batch is one pass rather than one pass per image)."""
    monkeypatch.setenv("FCN_CPU_WORKERS", "1")
    monkeypatch.setenv("FCN_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("FCN_TORCH_THREADS", "1")
    model = InstrumentedModel(copy.deepcopy(reference.model))
    backend = LocalBackend(Settings(), LoadedWeights(model, reference.meta))
    frames = camvid_frames(6)
    jobs = collect_jobs([str(f) for f in frames])
    out = tmp_path / "out"
    run = run_jobs(jobs, backend, out, [Output.labels], concurrency=1, progress=False)
    summary = asyncio.run(run)
    asyncio.run(backend.aclose())
    assert summary.done == 6 and not summary.failures
    assert model.calls == [(3, True), (3, True)]
    for frame in frames:
        labels = labels_from_png((out / f"{frame.stem}.png").read_bytes())[0]
        np.testing.assert_array_equal(labels, predict(reference, rgb(frame)))


def test_client_package_imports_neither_torch_nor_the_service() -> None:
    code = (
        "import sys, fcn_client, fcn_client.sdk, fcn_client.jobs, fcn_client.cli, "
        "fcn_client.wire\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'service'})\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_backend_flag_overrides_the_environment(
    local_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--backend reaches the predictor; an unknown one, or one without --local, is refused."""
    backend = LocalBackend.from_environment(backend="onnxruntime")  # FCN_BACKEND is torch
    assert predictor(backend).backend == "onnxruntime"
    asyncio.run(backend.aclose())
    frame = str(camvid_frames(1)[0])
    with pytest.raises(SystemExit) as exit_:
        main([frame, "--local", "--backend", "tensorrt", "-o", str(tmp_path)])
    assert exit_.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a server chooses its own backend
        main([frame, "--backend", "torch", "-o", str(tmp_path)])
    assert "are for --local" in capsys.readouterr().err and not any(tmp_path.iterdir())
