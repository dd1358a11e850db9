"""The CUDA fast path, on a real GPU: skipped where there is none (CI), and the first thing to
run on a machine that has one (``pytest tests/test_cuda.py``).

Labels are compared with the CPU's as an agreement fraction, not for equality: cuDNN picks
other algorithms (TF32 included) than the CPU, which flips a handful of near-tie pixels. The
bugs these tests are for (a buffer reused while a copy still reads it, a graph output
overwritten by the next replay, a decoded image in the wrong row) scramble whole images, far
below the thresholds.
"""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
import torch

from bench.run import CAMVID_WEIGHTS
from fcn_core.inference import InferenceConfig
from fcn_core.weights import LoadedWeights, load_weights
from service import codecs
from service.app import create_app
from service.device_jpeg import decode_on_device
from service.runner import Runner
from tests.conftest import demo_photos, labels_from_png, run_server, test_settings
from tests.test_client import camvid_frames
from tests.test_device_jpeg import LIMITS, broken_scan

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not CAMVID_WEIGHTS.is_file(), reason="needs the shipped weights"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def shipped() -> LoadedWeights:
    """Trained weights: few near-ties, so agreement is a sharp test."""
    return load_weights(CAMVID_WEIGHTS)


def cuda_runner(loaded: LoadedWeights, **options: object) -> Runner:
    config = InferenceConfig(device=str(CUDA), **options)  # type: ignore[arg-type]
    return Runner(copy.deepcopy(loaded.model), loaded.meta.normalization, config)


def cpu_labels(loaded: LoadedWeights, rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = loaded.model(loaded.meta.normalization(x))
    return logits.argmax(1)[0].to(torch.uint8).numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


def frames(n: int) -> list[np.ndarray]:
    return [np.asarray(codecs.decode(p.read_bytes(), **LIMITS).rgb) for p in camvid_frames(n)]


def test_cuda_labels_agree_with_the_cpu_on_real_photos(shipped: LoadedWeights) -> None:
    runner = cuda_runner(shipped)
    for path in demo_photos():
        rgb = codecs.decode(path.read_bytes(), **LIMITS).rgb
        (labels,) = runner.predict([rgb]).labels
        assert agreement(labels, cpu_labels(shipped, rgb)) >= 0.995, path.name


def test_batches_in_flight_together_keep_their_own_labels(shipped: LoadedWeights) -> None:
    runner = cuda_runner(shipped)
    images = frames(8)
    alone = [runner.predict([im]).labels[0] for im in images]
    for _ in range(3):  # rounds reuse the pinned buffers of the rounds before
        launched = [runner.launch(images[i : i + 2]) for i in range(0, 8, 2)]  # 4 in flight
        labels = [lab for batch in launched for lab in batch.wait().labels]
        for got, want in zip(labels, alone, strict=True):
            assert isinstance(got, np.ndarray) and agreement(got, want) >= 0.999
    assert runner.buffers.allocations <= 10  # reused, not one per batch


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_agrees_with_fp32(shipped: LoadedWeights, precision: str) -> None:
    fp32, reduced = cuda_runner(shipped), cuda_runner(shipped, precision=precision)
    images = frames(4)
    same = [
        agreement(a, b)
        for a, b in zip(fp32.predict(images).labels, reduced.predict(images).labels, strict=True)
    ]  # type: ignore[arg-type]
    assert min(same) >= 0.995, same


def test_nvjpeg_decodes_close_to_pillow_and_isolates_a_broken_file() -> None:
    photos = [p.read_bytes() for p in demo_photos()]
    jpegs = [codecs.probe_jpeg(d, **LIMITS) for d in [*photos, broken_scan(photos[0])]]
    assert all(j is not None for j in jpegs)
    decoded = decode_on_device(jpegs, CUDA)  # type: ignore[arg-type]
    for data, image in zip(photos, decoded, strict=False):
        assert isinstance(image, torch.Tensor) and image.is_cuda
        pillow = codecs.decode(data, **LIMITS).rgb
        # torchvision's own tolerance for nvJPEG against libjpeg.
        assert np.abs(image.cpu().numpy().astype(int) - pillow).mean() < 2
    assert isinstance(decoded[-1], codecs.CodecError) and decoded[-1].status == 422


def test_cuda_graphs_replay_the_eager_labels(shipped: LoadedWeights) -> None:
    eager = cuda_runner(shipped)
    graphs = cuda_runner(shipped, compile=True, compile_mode="reduce-overhead", max_batch_size=4)
    graphs.warmup([(360, 480)])  # batch sizes 1, 2 and 4
    images = frames(6)
    want = [eager.predict([im]).labels[0] for im in images]
    # Two batches in flight: the second replay must not overwrite the first's labels.
    first, second = graphs.launch(images[:3]), graphs.launch(images[3:])  # 3 runs as 4
    got = first.wait().labels + second.wait().labels
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, np.ndarray) and agreement(g, w) >= 0.999


def test_the_service_on_cuda_with_device_decoding(shipped: LoadedWeights) -> None:
    from concurrent.futures import ThreadPoolExecutor

    settings = test_settings(CAMVID_WEIGHTS, device="cuda", decode_on_device=True)
    with run_server(create_app(settings)) as live:
        photos = [p.read_bytes() for p in demo_photos()]

        def post(data: bytes) -> httpx.Response:
            return live.client.post(
                "/segment", content=data, headers={"Content-Type": "image/jpeg"}
            )

        with ThreadPoolExecutor(len(photos)) as pool:
            responses = list(pool.map(post, photos))
        for data, response in zip(photos, responses, strict=True):
            assert response.status_code == 200, response.text
            labels, _ = labels_from_png(response.content)
            rgb = codecs.decode(data, **LIMITS).rgb
            assert agreement(labels, cpu_labels(shipped, rgb)) >= 0.995
        assert live.metric("fcn_gpu_memory_bytes", kind="allocated") > 0
