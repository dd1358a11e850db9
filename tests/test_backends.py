"""The backends (``FCN_BACKEND``): ONNX Runtime and OpenVINO give PyTorch's labels on real
photos, alone and in batches, in process and through a real server on loopback, and report
themselves; ``auto`` picks by device; the export cache is used, and a cache that cannot be
written does not stop the service."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fcn_core import backends
from fcn_core.export import read_photos
from fcn_core.inference import InferenceConfig, Segmenter, usable_cores
from fcn_core.shipped import default_weights_dir
from fcn_core.weights import LoadedWeights, load_weights
from tests.conftest import DEMO_PHOTOS, ServeFactory, labels_from_png

WEIGHTS = default_weights_dir() / "fcn8s-lite0-camvid.safetensors"
ONNX_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(bool(backends.missing(name)), reason=f"{name} is not installed"),
    )
    for name in ("onnxruntime", "openvino")
]
MIN_AGREEMENT = 0.999  # the bar for every fp32 backend


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module: each backend reads the same export."""
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="module")
def loaded() -> LoadedWeights:
    return load_weights(WEIGHTS)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    images = read_photos([DEMO_PHOTOS / n for n in ("dog.jpg", "eagle.jpg", "kite.jpg")])
    images.append(images[0][:97, :131].copy())  # an odd size: padded to the bucket
    images.append(images[1][:200, :300].copy())
    return images


@pytest.fixture(scope="module")
def torch_labels(loaded: LoadedWeights, photos: list[np.ndarray]) -> list[np.ndarray]:
    segmenter = Segmenter(loaded.model, loaded.meta.normalization, _config("torch"), loaded.meta)
    return segmenter.segment(photos)


def _config(backend: str, cache: Path | None = None) -> InferenceConfig:
    return InferenceConfig(device="cpu", backend=backend, cache_dir=str(cache or ""))  # type: ignore[arg-type]


def agreement(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    equal = sum(int((a == b).sum()) for a, b in zip(ours, theirs, strict=True))
    return equal / sum(b.size for b in theirs)


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_labels_equal_torchs_alone_and_in_batches(
    backend: str,
    cache: Path,
    photos: list[np.ndarray],
    torch_labels: list[np.ndarray],
) -> None:
    segmenter = Segmenter.from_weights(WEIGHTS, _config(backend, cache))
    assert segmenter.predictor.backend == backend
    batched = segmenter.segment(photos)  # same-bucket images batch: the pool's path
    alone = [segmenter.segment([p])[0] for p in photos]  # a batch of one: every core
    assert agreement(batched, torch_labels) >= MIN_AGREEMENT
    assert agreement(alone, torch_labels) >= MIN_AGREEMENT
    # Not trivially equal: the photos hold several classes each.
    assert all(len(np.unique(lab)) >= 3 for lab in torch_labels[:3])


def test_auto_picks_by_device_and_needs_metadata(loaded: LoadedWeights) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fastest = next(b for b in backends.AUTO_ORDER["cpu"] if not backends.missing(b))
    assert backends.choose_backend("auto", cpu, loaded.meta) == fastest
    assert backends.choose_backend("auto", cpu, None) == "torch"  # nothing to export from
    assert backends.choose_backend("auto", cuda, loaded.meta) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        backends.choose_backend("onnxruntime", cuda, loaded.meta)
    with pytest.raises(ValueError, match="metadata"):
        backends.choose_backend("onnxruntime", cpu, None)
    with pytest.raises(ValueError, match="unknown backend"):
        backends.choose_backend("tensorrt", cpu, loaded.meta)


def test_a_lone_image_gets_every_core_and_batch_members_one_each() -> None:
    config = InferenceConfig()
    assert config.threads_for("cpu", alone=True) == usable_cores()
    assert config.threads_for("cpu", alone=False) == 1


def test_the_export_is_made_once_and_reused(loaded: LoadedWeights, cache: Path) -> None:
    first = Segmenter.from_weights(WEIGHTS, _config("onnxruntime", cache))
    exports = list((cache / "onnx").glob("*.onnx"))
    assert len(exports) == 1
    made = exports[0].stat().st_mtime_ns
    second = Segmenter.from_weights(WEIGHTS, _config("onnxruntime", cache))
    assert exports[0].stat().st_mtime_ns == made
    assert first.predictor._net.path == second.predictor._net.path == exports[0]  # type: ignore[attr-defined]


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, photos: list[np.ndarray]
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache should be")
    segmenter = Segmenter.from_weights(WEIGHTS, _config("onnxruntime", blocked))
    assert "cannot write the export cache" in caplog.text
    path = segmenter.predictor._net.path  # type: ignore[attr-defined]
    assert path.is_file() and not path.is_relative_to(blocked)
    assert segmenter.segment(photos[3:4])[0].shape == photos[3].shape[:2]


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_the_service_serves_with_the_backend_and_reports_it(
    backend: str,
    cache: Path,
    serve: ServeFactory,
    loaded: LoadedWeights,
    torch_labels: list[np.ndarray],
) -> None:
    live = serve(
        model=loaded.model,
        meta=loaded.meta,
        backend=backend,
        cache_dir=str(cache),
        torch_threads=0,  # the backend's own threading, as deployed
    )
    dog = (DEMO_PHOTOS / "dog.jpg").read_bytes()
    answers = [live.client.post("/segment", files={"image": ("dog.jpg", dog)}) for _ in range(2)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        labels, _ = labels_from_png(answer.content)
        assert agreement([labels], torch_labels[:1]) >= MIN_AGREEMENT
    info = live.client.get("/v1/model").json()
    assert (info["backend"], info["device"], info["precision"]) == (backend, "cpu", "fp32")
    assert live.metric("fcn_model_info", backend=backend, weights_hash=loaded.meta.sha256) == 1


def test_openvino_runs_bf16_only_when_asked(loaded: LoadedWeights, cache: Path) -> None:
    """On a CPU with bf16, asked for it, OpenVINO runs it; on one without (no AVX-512 BF16
    nor AMX), the request is refused rather than quietly run in f32; never unasked."""
    if backends.missing("openvino"):
        pytest.skip("openvino is not installed")
    import openvino as ov

    config = dataclasses.replace(_config("openvino", cache), precision="bf16")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ValueError, match="precision bf16: this CPU cannot run it"):
            Segmenter(loaded.model, loaded.meta.normalization, config, loaded.meta)
        default = Segmenter.from_weights(WEIGHTS, _config("openvino", cache))
        hint = default.predictor._net._pool.get_property("INFERENCE_PRECISION_HINT")  # type: ignore[attr-defined]
        assert "float32" in str(hint)
        return
    asked = Segmenter(loaded.model, loaded.meta.normalization, config, loaded.meta)
    default = Segmenter.from_weights(WEIGHTS, _config("openvino", cache))
    assert (asked.predictor.precision, default.predictor.precision) == ("bf16", "fp32")
    asked_hint = asked.predictor._net._pool.get_property("INFERENCE_PRECISION_HINT")  # type: ignore[attr-defined]
    assert "bfloat16" in str(asked_hint)
    hint = default.predictor._net._pool.get_property("INFERENCE_PRECISION_HINT")  # type: ignore[attr-defined]
    assert "float32" in str(hint)


def test_a_bad_backend_setting_is_refused_with_its_name() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="backend"):
        Settings(backend="tensorrt")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_fcn_eval_scores_a_backend_as_torch(backend: str, cache: Path, tmp_path: Path) -> None:
    """fcn-eval --backend: the same mean IU as torch on CamVid's 101 validation images."""
    import json

    from fcn_core import evaluate

    camvid_val = DEMO_PHOTOS.parent / "camvid"
    results = {}
    for name in ("torch", backend):
        out = tmp_path / f"{name}.json"
        args = ["--weights", str(WEIGHTS), "--dataset", "camvid", "--data-root", str(camvid_val)]
        args += ["--device", "cpu", "--backend", name, "--num-workers", "0", "--json", str(out)]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("FCN_CACHE_DIR", str(cache))
            assert evaluate.main(args) == 0
        results[name] = json.loads(out.read_text())
    assert results[backend]["backend"] == backend and results[backend]["images"] == 101
    assert abs(results[backend]["mean_iu"] - results["torch"]["mean_iu"]) < 1e-3
    assert results["torch"]["mean_iu"] > 0.6  # the shipped CamVid model, really scored
