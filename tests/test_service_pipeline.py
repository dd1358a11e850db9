"""The launch/wait pipeline: the next batch is launched while the previous one is still on the
device, answers keep their order, at most ``pipeline_depth`` batches are in flight, a failed
batch fails only its own requests, and staging buffers are reused rather than reallocated."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from fcn_core.inference import InferenceConfig, crop
from fcn_core.weights import LoadedWeights
from service.batcher import DynamicBatcher
from service.metrics import Metrics
from service.runner import Prediction, Runner
from service.staging import HostBuffers
from tests.conftest import predict, random_rgb


class SerialDevice:
    """Stands in for an asynchronous device: ``launch`` returns at once, the batch finishes
    ``device_s`` after the previous one (one batch at a time), and ``wait`` blocks until then.
    Every image's label map is filled with its batch's index, so answers can be traced."""

    def __init__(self, device_s: float, fail_batches: Sequence[int] = ()) -> None:
        self.device_s = device_s
        self.fail_batches = set(fail_batches)
        self.events: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def __call__(self, images: Sequence[np.ndarray]) -> Pending:
        with self._lock:
            index = sum(1 for kind, _ in self.events if kind == "launch")
            self.events.append(("launch", index))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self._free_at = max(time.monotonic(), self._free_at) + self.device_s
            return Pending(self, index, list(images), self._free_at)


class Pending:
    def __init__(
        self, device: SerialDevice, index: int, images: list[np.ndarray], ready_at: float
    ) -> None:
        self.device, self.index, self.images, self.ready_at = device, index, images, ready_at

    def wait(self) -> Prediction:
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        with self.device._lock:
            self.device.in_flight -= 1
            self.device.events.append(("done", self.index))
        if self.index in self.device.fail_batches:
            raise RuntimeError(f"device error in batch {self.index}")
        labels = [np.full(im.shape[:2], self.index, np.uint8) for im in self.images]
        return Prediction(labels, [(len(self.images), self.device.device_s)])


def run(device: SerialDevice, images: int, depth: int) -> tuple[list[object], float]:
    """Submit ``images`` one-image requests at once (batches of 2); results and seconds."""

    async def main() -> tuple[list[object], float]:
        batcher = DynamicBatcher(
            device, Metrics(), max_batch_size=2, max_queue_delay_ms=0, pipeline_depth=depth
        )
        batcher.start()
        start = time.monotonic()
        jobs = [
            batcher.submit([np.full((4, 4, 3), i, np.uint8)], time.monotonic() + 30)[0]
            for i in range(images)
        ]
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        seconds = time.monotonic() - start
        await asyncio.to_thread(batcher.stop, 5.0)
        return list(results), seconds

    return asyncio.run(main())


def test_the_next_batch_is_launched_before_the_previous_one_finishes() -> None:
    device = SerialDevice(device_s=0.3)
    results, _ = run(device, images=6, depth=2)
    # Batch 1 was launched while batch 0 was still running, and so on.
    assert device.events[:3] == [("launch", 0), ("launch", 1), ("done", 0)]
    assert device.most_in_flight == 2
    # Answers keep their order: requests 2k and 2k+1 were batch k.
    assert [int(r.labels[0, 0]) for r in results] == [0, 0, 1, 1, 2, 2]  # type: ignore[union-attr]


def test_depth_one_runs_batches_one_after_another() -> None:
    device = SerialDevice(device_s=0.05)
    results, _ = run(device, images=6, depth=1)
    assert device.events == [(kind, i) for i in range(3) for kind in ("launch", "done")], (
        device.events
    )
    assert device.most_in_flight == 1
    assert [int(r.labels[0, 0]) for r in results] == [0, 0, 1, 1, 2, 2]  # type: ignore[union-attr]


def test_depth_bounds_the_batches_in_flight() -> None:
    device = SerialDevice(device_s=0.1)
    run(device, images=16, depth=3)
    assert device.most_in_flight == 3


def test_a_batch_failing_on_the_device_fails_only_its_own_requests() -> None:
    device = SerialDevice(device_s=0.05, fail_batches=[1])
    results, _ = run(device, images=6, depth=2)
    assert [type(r).__name__ for r in results] == [
        "JobResult",
        "JobResult",
        "RuntimeError",
        "RuntimeError",
        "JobResult",
        "JobResult",
    ]
    assert "batch 1" in str(results[2])


def test_pipeline_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pipeline_depth"):
        DynamicBatcher(SerialDevice(0.0), Metrics(), pipeline_depth=0)


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
