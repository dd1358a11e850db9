"""service/batcher.py: concurrent requests share forward passes (read back from /metrics),
sizes share buckets and stay exact, the batching delay is timed from arrival and paid only
while another request is on its way, the queue is bounded; and the launch/wait pipeline: the next batch is launched while the previous one is
still on the device, answers keep their order, at most ``pipeline_depth`` batches are in
flight, and a failed batch fails only its own requests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fcn_client.sdk import parse_server_timing
from fcn_client.wire import SERVER_TIMING
from fcn_core.weights import LoadedWeights, load_weights
from service.batcher import DynamicBatcher, Job, QueueFull
from service.metrics import Metrics
from service.runner import Prediction
from tests.conftest import (
    InstrumentedModel,
    LiveServer,
    ServeFactory,
    encode,
    labels_from_png,
    predict,
    random_rgb,
)


def burst(live: LiveServer, payloads: list[bytes], workers: int) -> list[httpx.Response]:
    def send(data: bytes) -> httpx.Response:
        return live.client.post("/segment", content=data, headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(send, payloads))


def test_concurrent_requests_are_batched_and_exact(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=0.05)
    # One CPU worker, so the model itself gets the whole batch (as a GPU would).
    live = serve(
        model=model, meta=reference.meta, max_queue_delay_ms=100, max_batch_size=8, cpu_workers=1
    )
    # Three sizes, two buckets: 64x64 (60x50, 64x40) and 96x128 (90x100).
    images = [
        random_rgb(h, w, seed=i) for i, (h, w) in enumerate([(60, 50), (64, 40), (90, 100)] * 6)
    ]
    payloads = [encode(Image.fromarray(im), "PNG") for im in images]
    responses = burst(live, payloads, workers=18)
    for rgb, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text
        labels, _ = labels_from_png(response.content)
        np.testing.assert_array_equal(labels, predict(reference, rgb))
    count = live.metric("fcn_batch_size_count")
    total = live.metric("fcn_batch_size_sum")
    singles = live.metric("fcn_batch_size_bucket", le="1.0")
    assert total == len(images) == live.metric("fcn_images_total")
    assert count < len(images), "concurrent requests should share forward passes"
    assert singles < count, "the batch-size histogram should show batches of more than one"
    assert max(n for n, _ in model.calls) > 1
    assert live.metric("fcn_queue_wait_seconds_count") == len(images)
    assert live.metric("fcn_inference_duration_seconds_count") == count
    assert live.metric("fcn_queue_depth") == 0
    ok = live.metric("fcn_request_duration_seconds_count", endpoint="/segment", status="200")
    assert ok == len(images)


def test_over_http_a_lone_request_does_not_pay_the_delay_and_a_burst_still_batches(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    # A 1.5 s batching delay: a lone request, on /segment and on /v2 infer, is not held for
    # it (its route announced it, and it spent the announcement as it queued); concurrent
    # requests, each announced while the others queue, still share forward passes.
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=0.05)
    live = serve(
        model=model, meta=reference.meta, max_queue_delay_ms=1500, max_batch_size=8, cpu_workers=1
    )
    png = encode(Image.fromarray(random_rgb(40, 40, seed=1)), "PNG")
    lone = live.client.post("/segment", content=png, headers={"Content-Type": "image/png"})
    assert lone.status_code == 200, lone.text
    assert parse_server_timing(lone.headers[SERVER_TIMING])["queue"] < 500, lone.headers
    name = live.client.get("/v1/model").json()["name"]
    body = {"inputs": [{"name": "PIXELS", "shape": [1, 2, 3, 3], "datatype": "UINT8",
                        "data": [0] * 18}]}  # fmt: skip
    v2 = live.client.post(f"/v2/models/{name}/infer", json=body)
    assert v2.status_code == 200, v2.text
    assert parse_server_timing(v2.headers[SERVER_TIMING])["queue"] < 500, v2.headers
    responses = burst(live, [png] * 12, workers=12)
    assert all(r.status_code == 200 for r in responses)
    assert max(n for n, _ in model.calls) > 1, model.calls


def run_batcher(
    predict_fn: Callable[[Sequence[np.ndarray], bool], Prediction],
    jobs_plan: Sequence[tuple[float, tuple[int, int]]],
    scores: Sequence[bool] = (),
    **options: object,
) -> list[tuple[Job, object]]:
    """Submit images of the given (h, w) at the given offsets (s), the i-th wanting scores
    if ``scores[i]``; returns (job, result). Every request is announced (``upcoming``) at
    the start, as requests being read and decoded are, and spent by its submit."""

    async def main() -> list[tuple[Job, object]]:
        batcher = DynamicBatcher(predict_fn, Metrics().for_model("m"), **options)  # type: ignore[arg-type]
        batcher.start()
        submitted: list[Job] = []
        with contextlib.ExitStack() as stack:
            tokens = [stack.enter_context(batcher.upcoming()) for _ in jobs_plan]
            start = time.monotonic()
            for i, (at, (h, w)) in enumerate(jobs_plan):
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                tile = i < len(scores) and scores[i]
                image = np.zeros((h, w, 3), np.uint8)
                (job,) = batcher.submit(
                    [image], time.monotonic() + 30, scores=tile, upcoming=tokens[i]
                )
                submitted.append(job)
        results = await asyncio.gather(*(j.future for j in submitted), return_exceptions=True)
        await asyncio.to_thread(batcher.stop, 5.0)
        return list(zip(submitted, results, strict=True))

    return asyncio.run(main())


class Recorder:
    """A predict function that records each batch's shapes and can take its time."""

    def __init__(self, seconds: Sequence[float] = (0.0,)) -> None:
        self.seconds = list(seconds)
        self.batches: list[list[tuple[int, int]]] = []
        self.kinds: list[bool] = []  # each batch's ``scores``

    def __call__(self, images: Sequence[np.ndarray], scores: bool = False) -> Prediction:
        delay = self.seconds[min(len(self.batches), len(self.seconds) - 1)]
        self.batches.append([im.shape[:2] for im in images])
        self.kinds.append(scores)
        time.sleep(delay)
        return Prediction(
            labels=[np.zeros(im.shape[:2], np.uint8) for im in images],
            passes=[(len(images), delay)],
        )


def test_delay_is_timed_from_arrival_not_from_dequeue() -> None:
    # A full batch (2) runs for 0.8 s; a third request arrives 0.05 s in. It has waited past
    # its 0.3 s delay when the worker frees up, so it goes at once (~0.75 s in the queue),
    # where a delay timed from dequeue would hold it until ~1.05 s.
    recorder = Recorder([0.8, 0.0])
    plan = [(0.0, (32, 32)), (0.0, (32, 32)), (0.05, (32, 32))]
    results = run_batcher(recorder, plan, max_batch_size=2, max_queue_delay_ms=300)
    assert recorder.batches == [[(32, 32)] * 2, [(32, 32)]]
    third = results[2][1]
    assert 0.6 < third.queue_s < 0.95, third.queue_s


def test_tiles_batch_with_tiles_only() -> None:
    # Two label jobs and two tiles of one bucket, queued together: each batch holds one kind
    # (a batch answers either label maps or class scores), full batches of 2 each.
    recorder = Recorder()
    plan = [(0.0, (64, 64))] * 4
    results = run_batcher(
        recorder, plan, scores=[False, True, False, True], max_batch_size=2, max_queue_delay_ms=200
    )
    assert recorder.batches == [[(64, 64)] * 2, [(64, 64)] * 2]
    assert sorted(recorder.kinds) == [False, True]
    assert all(not isinstance(result, BaseException) for _, result in results)


def test_a_lone_request_goes_at_once_when_nobody_else_is_coming() -> None:
    # Announced, then submitted: nothing else is on its way, so the 500 ms delay is not paid.
    recorder = Recorder()
    ((_job, result),) = run_batcher(recorder, [(0.0, (40, 40))], max_queue_delay_ms=500)
    assert result.queue_s < 0.1, result.queue_s
    assert recorder.batches == [[(40, 40)]]


def test_a_request_waits_for_one_on_its_way_up_to_its_delay() -> None:
    # Two announced, one submits at 0 and the other at 0.15 s: they share a batch (the first
    # waited for the second). With the second late past the 0.3 s delay, the first goes alone
    # after its delay.
    recorder = Recorder()
    results = run_batcher(recorder, [(0.0, (40, 40)), (0.15, (40, 40))], max_queue_delay_ms=300)
    assert recorder.batches == [[(40, 40)] * 2]
    assert 0.1 < results[0][1].queue_s < 0.28, results[0][1].queue_s
    recorder = Recorder()
    results = run_batcher(recorder, [(0.0, (40, 40)), (0.6, (40, 40))], max_queue_delay_ms=300)
    assert recorder.batches == [[(40, 40)], [(40, 40)]]
    assert 0.29 < results[0][1].queue_s < 0.55, results[0][1].queue_s


def test_a_request_that_never_submits_stops_the_wait_when_it_ends() -> None:
    # The second announced request ends 0.15 s in without submitting (its image was bad, its
    # client left): the queued one goes then, not at its 1 s delay.
    async def main() -> float:
        recorder = Recorder()
        batcher = DynamicBatcher(recorder, Metrics().for_model("m"), max_queue_delay_ms=1000)
        batcher.start()
        with batcher.upcoming() as first:
            with batcher.upcoming():
                (job,) = batcher.submit(
                    [np.zeros((8, 8, 3), np.uint8)], time.monotonic() + 30, upcoming=first
                )
                await asyncio.sleep(0.15)
            result = await job.future
        await asyncio.to_thread(batcher.stop, 5.0)
        return result.queue_s

    queue_s = asyncio.run(main())
    assert 0.14 < queue_s < 0.5, queue_s


def test_batches_hold_one_bucket_within_the_size_and_pixel_budgets() -> None:
    recorder = Recorder([0.6, 0.0])
    # While the first batch runs, queue 3 images of bucket 64x64 and 5 of bucket 32x32.
    plan = [(0.0, (10, 10))] + [(0.3, (60, 33)), (0.3, (20, 20))] * 3 + [(0.3, (32, 1))] * 2
    results = run_batcher(
        recorder,
        plan,
        max_batch_size=4,
        max_batch_pixels=2 * 64 * 64,  # 2 images of 64x64, 8 of 32x32 (capped at 4)
        max_queue_delay_ms=50,
    )
    assert all(not isinstance(r, BaseException) for _, r in results)
    assert recorder.batches[0] == [(10, 10)]
    buckets = [{(-(-h // 32) * 32, -(-w // 32) * 32) for h, w in b} for b in recorder.batches]
    assert all(len(b) == 1 for b in buckets), recorder.batches
    sizes = {next(iter(b)): [] for b in buckets}
    for bucket, batch in zip(buckets, recorder.batches, strict=True):
        sizes[next(iter(bucket))].append(len(batch))
    assert max(sizes[(64, 64)]) == 2 and sum(sizes[(64, 64)]) == 3
    assert max(sizes[(32, 32)]) == 4 and sum(sizes[(32, 32)]) == 6
    # Oldest first: the 64x64 image queued first runs before any later 32x32 batch would
    # have starved it.
    assert buckets[1] == {(64, 64)}


def test_queue_is_bounded_and_all_or_nothing() -> None:
    async def main() -> None:
        batcher = DynamicBatcher(
            Recorder([0.5]), Metrics().for_model("m"), max_queue_size=3, max_queue_delay_ms=1000
        )
        batcher.start()
        with batcher.upcoming():  # a request on its way: the queued images wait (1 s) for it
            first = batcher.submit([np.zeros((8, 8, 3), np.uint8)] * 2, time.monotonic() + 30)
            with pytest.raises(QueueFull) as caught:
                batcher.submit([np.zeros((8, 8, 3), np.uint8)] * 2, time.monotonic() + 30)
            assert caught.value.retry_after_s >= 1
            last = batcher.submit([np.zeros((8, 8, 3), np.uint8)], time.monotonic() + 30)
        await asyncio.gather(*(j.future for j in first + last))
        await asyncio.to_thread(batcher.stop, 5.0)

    asyncio.run(main())


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

    def __call__(self, images: Sequence[np.ndarray], scores: bool = False) -> Pending:
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
            device,
            Metrics().for_model("m"),
            max_batch_size=2,
            max_queue_delay_ms=0,
            pipeline_depth=depth,
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
        DynamicBatcher(SerialDevice(0.0), Metrics().for_model("m"), pipeline_depth=0)
