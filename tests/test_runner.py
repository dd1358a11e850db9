"""service/runner.py and service/staging.py: staging buffers reused rather than reallocated
and never shared with answers, compiled runners that never compile while serving, and the CPU
fast paths (worker threads, channels-last) giving the model's own labels."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fcn_core.inference import InferenceConfig, crop
from fcn_core.weights import LoadedWeights
from service.runner import Runner
from service.staging import HostBuffers
from tests.conftest import predict, random_rgb


def test_runner_reuses_its_staging_buffer_and_stays_exact(reference: LoadedWeights) -> None:
    runner = Runner(reference.model, reference.meta.normalization, InferenceConfig(device="cpu"))
    sizes = [(60, 50), (64, 40), (33, 17), (64, 64), (60, 50)]
    for i, (h, w) in enumerate(sizes):
        image = random_rgb(h, w, seed=i)
        prediction = runner.launch([image]).wait()
        # Stale bytes of the previous, larger image in the reused buffer must not leak in.
        assert np.array_equal(prediction.labels[0], predict(reference, image))
    assert runner.buffers.allocations == 1


def test_host_buffers_lend_each_buffer_once_and_cap_the_idle_pool() -> None:
    buffers = HostBuffers(pinned=False, max_idle=2)
    a = buffers.take((2, 64, 64, 3))
    b = buffers.take((2, 64, 64, 3))
    assert a.data_ptr() != b.data_ptr()  # both lent at once: never the same memory
    buffers.give(a, b)
    c = buffers.take((1, 32, 32, 3))  # smaller: served from an idle buffer
    assert c.data_ptr() in (a.data_ptr(), b.data_ptr())
    assert c.shape == (1, 32, 32, 3) and c.dtype == torch.uint8
    assert buffers.allocations == 2
    big = [buffers.take((4, 1024, 1024)) for _ in range(3)]
    buffers.give(c, *big)
    assert buffers.idle_bytes == 2 * big[0].numel()  # only the two largest are kept


def test_compiled_runner_rounds_batches_up_to_warmed_sizes_and_never_compiles_serving() -> None:
    """Run in a process of its own: in the full suite's process, after the ONNX Runtime and
    OpenVINO tests, the compiled C++ kernels crashed it (SIGSEGV, no Python frame; not
    reproduced with those runtimes alone). A fresh interpreter is also what a server is."""
    root = Path(__file__).resolve().parents[1]
    code = "from tests.test_runner import compiled_runner_check; compiled_runner_check()"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def compiled_runner_check() -> None:
    from torch._dynamo.utils import counters

    from service.loading import trivial_model

    loaded = trivial_model()
    config = InferenceConfig(device="cpu", compile=True, max_batch_size=4, cpu_workers=1)
    runner = Runner(copy.deepcopy(loaded.model), loaded.meta.normalization, config)
    runner.warmup([(40, 60)])  # batch sizes 1, 2 and 4
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 3
    images = [random_rgb(40, 60 - i, seed=i) for i in range(3)]  # one bucket, a batch of 3
    prediction = runner.predict(images)
    assert counters["stats"]["unique_graphs"] == compiled, "a batch of 3 should run as 4"
    assert prediction.passes[0][0] == 3
    for image, labels in zip(images, prediction.labels, strict=True):
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        with torch.inference_mode():
            expected = loaded.model(loaded.meta.normalization(x)).argmax(1)[0].to(torch.uint8)
        assert np.array_equal(labels, expected.numpy())


def test_buffers_taken_under_inference_mode_are_reused_for_any_shape() -> None:
    # The runner takes its output buffer inside inference_mode (CUDA path).
    buffers = HostBuffers(pinned=False)
    with torch.inference_mode():
        first = buffers.take((8, 384, 480))
        first.fill_(1)
        buffers.give(first)
        second = buffers.take((1, 256, 256))  # another shape out of the same buffer
        assert second.shape == (1, 256, 256) and second.data_ptr() == first.data_ptr()
        buffers.give(second)
    assert buffers.allocations == 1


def test_cropped_labels_never_share_memory_with_the_reused_buffer() -> None:
    batch = np.arange(2 * 4 * 96, dtype=np.uint8).reshape(2, 4, 96) % 11
    # Full bucket width and a single row: the cases where a slice is already contiguous.
    out = crop(batch, [(4, 96), (1, 50)], {})
    assert all(not np.shares_memory(labels, batch) for labels in out)
    assert np.array_equal(out[0], batch[0]) and np.array_equal(out[1], batch[1, :1, :50])


@pytest.mark.parametrize(
    "options",
    [{"cpu_workers": 2, "channels_last": False}, {"cpu_workers": 2, "channels_last": True}],
    ids=["cpu-workers", "cpu-workers+channels-last"],
)
def test_cpu_fast_paths_give_the_models_own_labels(
    reference: LoadedWeights, options: dict[str, object]
) -> None:
    """Parallel single-image forwards and NHWC change the speed, never the labels."""
    # A copy: the runner converts the model it is given in place (channels_last), and the
    # shared reference must stay as other tests expect it.
    model = copy.deepcopy(reference.model)
    config = InferenceConfig(device="cpu", **options)
    runner = Runner(model, reference.meta.normalization, config)
    assert runner.predictor._pool is not None  # the batch really is split across worker threads
    images = [random_rgb(61, 83, seed=s) for s in range(3)]
    prediction = runner.predict(images)
    assert [p[0] for p in prediction.passes] == [3]
    for image, labels in zip(images, prediction.labels, strict=True):
        assert np.array_equal(labels, predict(reference, image))
