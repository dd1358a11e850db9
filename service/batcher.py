"""DynamicBatcher: a bounded queue in front of one device worker thread.

Policy (all of it configuration):
- A request's wait for batch-mates is timed from its *arrival*, so time spent queued behind a
  running batch counts; a request that already waited its delay is dispatched at once.
- Batch-mates are waited for only while some are on their way: requests that hold an
  :class:`Upcoming` (being read or decoded) and have not submitted yet. With none, a queued
  image goes at once: a lone client does not pay the delay for company that is not coming.
- A batch holds one size bucket (padded sizes, multiples of 32), up to ``max_batch_size``
  images and ``max_batch_pixels`` padded pixels, and one kind of output: label maps, or
  the class scores of tiles (``fcn_core.tiling``) that the request then blends; the
  oldest request's bucket goes first, and a bucket that is already full goes instead of
  idling.
- The queue is bounded (``QueueFull`` -> 503); requests past their deadline or cancelled
  (client gone) are dropped before compute.

The event loop only appends and is woken through ``call_soon_threadsafe``. Two plain threads
do the rest: the *launcher* forms a batch and launches it on the device, the *collector* waits
for each launched batch in order and answers its requests. Up to ``pipeline_depth`` batches
are in flight, so on a GPU the next batch is padded, copied and queued while the current one
runs, and the device never idles between batches; a new batch is formed only when a slot is
free, so batches still fill up while the device is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fcn_core.inference import DEFAULT_GPU_BATCH, InferenceConfig, batch_capacity, bucket_of
from service.metrics import ModelMetrics
from service.runner import InFlight, ModelInput, Prediction

if TYPE_CHECKING:
    from service.runner import Runner
    from service.settings import Settings

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the queue is full")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The batcher no longer accepts work (stopping, or never started)."""


class DeadlineExceeded(Exception):
    """Dropped before compute: the request's deadline passed while it was queued."""


@dataclass
class JobResult:
    labels: np.ndarray
    """The image's H x W label map; for a tile (``Job.scores``), its C x H x W class scores."""
    queue_s: float
    infer_s: float
    batch_size: int


@dataclass(eq=False)
class Job:
    image: ModelInput
    bucket: tuple[int, int]
    arrival: float
    deadline: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    scores: bool = False  # a tile: its class scores are wanted, to be blended
    cancelled: bool = field(default=False)

    @property
    def group(self) -> tuple[tuple[int, int], bool]:
        """Jobs batch with jobs of the same bucket that want the same output."""
        return self.bucket, self.scores

    def resolve(self, result: JobResult | BaseException) -> None:
        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, result)


def _settle(future: asyncio.Future, result: JobResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Upcoming:
    """A request on its way to a batcher's queue (its images being read or decoded): while it
    has not submitted, queued images may wait for it. Taken with
    :meth:`DynamicBatcher.upcoming`, spent by :meth:`DynamicBatcher.submit`."""

    def __init__(self) -> None:
        self.pending = True


@dataclass(frozen=True)
class QueuePolicy:
    """The queue's knobs (the server's settings document each and take these defaults)."""

    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 64
    pipeline_depth: int = 2


_QUEUE = QueuePolicy()
_INFERENCE = InferenceConfig()


class DynamicBatcher:
    def __init__(
        self,
        launch: Callable[[Sequence[ModelInput], bool], Prediction | InFlight],
        metrics: ModelMetrics,
        *,
        max_batch_size: int = DEFAULT_GPU_BATCH,
        max_batch_pixels: int = _INFERENCE.max_batch_pixels,
        max_queue_delay_ms: float = _QUEUE.max_queue_delay_ms,
        max_queue_size: int = _QUEUE.max_queue_size,
        bucket_multiple: int = _INFERENCE.bucket_multiple,
        pipeline_depth: int = _QUEUE.pipeline_depth,
    ) -> None:
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self._launch = launch
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.bucket_multiple = bucket_multiple
        self._queue: list[Job] = []
        self._upcoming = 0  # Upcoming tokens not yet spent
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 0.05  # running estimate, for Retry-After
        self.pipeline_depth = pipeline_depth
        self._slots = threading.Semaphore(pipeline_depth)
        self._launched: queue.SimpleQueue[tuple[list[Job], float, Prediction | InFlight] | None]
        self._launched = queue.SimpleQueue()

    @classmethod
    def from_settings(
        cls, settings: Settings, runner: Runner, metrics: ModelMetrics
    ) -> DynamicBatcher:
        """The batcher for ``runner``: batch limits as its predictor resolves them for its
        device, queue policy from the settings."""
        p = runner.predictor
        return cls(
            runner.launch,
            metrics,
            max_batch_size=p.max_batch_size(),
            max_batch_pixels=p.config.max_batch_pixels,
            bucket_multiple=p.bucket_multiple,
            **dataclasses.asdict(settings.queue_policy()),
        )

    # -- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="fcn-batcher", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def capacity(self, bucket: tuple[int, int]) -> int:
        """Images of this bucket per batch: the size limit, cut by the pixel budget."""
        return batch_capacity(bucket, self.max_batch_size, self.max_batch_pixels)

    @contextlib.contextmanager
    def upcoming(self) -> Iterator[Upcoming]:
        """Announce a request that will submit images here (hold it from before the request
        reads its body until it submits); a request that ends without submitting (bad input,
        client gone) is withdrawn when the block exits."""
        token = Upcoming()
        with self._cond:
            self._upcoming += 1
        try:
            yield token
        finally:
            self.withdraw(token)

    def withdraw(self, upcoming: Upcoming | None) -> None:
        """The request of ``upcoming`` will submit nothing more worth waiting for (repeating
        this, or calling it after the submit, is harmless)."""
        with self._cond:
            if self._spend(upcoming):
                self._cond.notify_all()  # queued images need no longer wait for it

    def _spend(self, token: Upcoming | None) -> bool:
        """(Under the lock) the request of ``token`` is no longer on its way."""
        if token is None or not token.pending:
            return False
        token.pending = False
        self._upcoming -= 1
        return True

    def submit(
        self,
        images: Sequence[ModelInput],
        deadline: float,
        scores: bool = False,
        upcoming: Upcoming | None = None,
    ) -> list[Job]:
        """Queue all of the images or none of them (a request is answered whole).

        The batching delay and the queue wait are timed from now, the jobs' arrival in the
        queue; ``deadline`` (monotonic) is the request's own, counted from its arrival at
        the server. With ``scores`` (tiles) the jobs' results are class scores, not labels.
        ``upcoming``, the request's announcement, is spent as its images join the queue (in
        one step, so the worker never sees the request neither coming nor queued).
        """
        loop = asyncio.get_running_loop()
        arrival = time.monotonic()
        jobs = [
            Job(
                image=im,
                bucket=bucket_of(im.shape[0], im.shape[1], self.bucket_multiple),
                arrival=arrival,
                deadline=deadline,
                future=loop.create_future(),
                loop=loop,
                scores=scores,
            )
            for im in images
        ]
        with self._cond:
            if not self.running:
                raise ShuttingDown()
            if len(self._queue) + len(jobs) > self.max_queue_size:
                raise QueueFull(self._retry_after(len(self._queue)))
            self._spend(upcoming)
            self._queue.extend(jobs)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return jobs

    def cancel(self, jobs: Sequence[Job]) -> int:
        """Withdraw jobs nobody waits for; returns how many were still queued (not computed)."""
        with self._cond:
            for job in jobs:
                job.cancelled = True
            before = len(self._queue)
            self._queue = [j for j in self._queue if not j.cancelled]
            removed = before - len(self._queue)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return removed

    def stop(self, timeout_s: float) -> None:
        """Stop accepting, give queued work ``timeout_s`` to run, fail what is left (blocks)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            while self._queue and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
            leftover, self._queue = self._queue, []
            self._stopping = True
            self._metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in leftover:
            job.resolve(ShuttingDown())
        if self._thread is not None:
            self._thread.join(max(0.0, end - time.monotonic()) + 1.0)

    def _retry_after(self, depth: int) -> int:
        return max(1, math.ceil(depth * self._seconds_per_image))

    # -- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        collector = threading.Thread(target=self._collect, name="fcn-collector", daemon=True)
        collector.start()
        try:
            while True:
                self._slots.acquire()  # at most pipeline_depth batches in flight
                batch = self._next_batch()
                if batch is None:
                    return
                self._launch_batch(batch)
        finally:
            self._launched.put(None)
            collector.join()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                self._drop_expired(now)
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                batch, wait_s = self._choose(now)
                if batch:
                    taken = set(map(id, batch))
                    self._queue = [j for j in self._queue if id(j) not in taken]
                    self._metrics.queue_depth.set(len(self._queue))
                    self._cond.notify_all()  # stop() may be waiting for the queue to drain
                    return batch
                self._cond.wait(wait_s)

    def _drop_expired(self, now: float) -> None:
        expired = [j for j in self._queue if j.deadline <= now]
        if expired:
            self._queue = [j for j in self._queue if j.deadline > now]
            self._metrics.queue_depth.set(len(self._queue))
            for job in expired:
                job.resolve(DeadlineExceeded())

    def _choose(self, now: float) -> tuple[list[Job], float]:
        groups: dict[tuple[tuple[int, int], bool], list[Job]] = {}
        for job in self._queue:
            groups.setdefault(job.group, []).append(job)
        oldest = self._queue[0]
        first = groups[oldest.group]
        cap = self.capacity(oldest.bucket)
        due = oldest.arrival + self.max_queue_delay_s
        if len(first) >= cap or now >= due or not self._accepting or not self._upcoming:
            return first[:cap], 0.0
        for (bucket, _), jobs in groups.items():
            if len(jobs) >= self.capacity(bucket):
                return jobs[: self.capacity(bucket)], 0.0
        return [], due - now

    def _launch_batch(self, batch: list[Job]) -> None:
        dispatched = time.monotonic()
        for job in batch:
            self._metrics.queue_wait.observe(dispatched - job.arrival)
        try:
            launched = self._launch([job.image for job in batch], batch[0].scores)
        except Exception as exc:
            self._fail(batch, exc)
            self._slots.release()
            return
        self._launched.put((batch, dispatched, launched))

    def _collect(self) -> None:
        """The collector thread: answers launched batches in launch order."""
        while (item := self._launched.get()) is not None:
            batch, dispatched, launched = item
            try:
                self._answer(batch, dispatched, launched.wait())
            except Exception as exc:
                self._fail(batch, exc)  # requests already answered keep their answer
            finally:
                self._slots.release()

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        log.exception("batch of %d failed", len(batch), exc_info=exc)
        for job in batch:
            job.resolve(exc)

    def _answer(self, batch: list[Job], dispatched: float, prediction: Prediction) -> None:
        infer_s = sum(seconds for _, seconds in prediction.passes)
        for size, seconds in prediction.passes:
            self._metrics.batch_size.observe(size)
            self._metrics.inference_duration.observe(seconds)
        if not batch[0].scores:  # tiles are parts of an image: neither images nor a guide
            # to how long a queued image waits (Retry-After)
            self._metrics.images.inc(sum(isinstance(x, np.ndarray) for x in prediction.labels))
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * infer_s / len(batch)
        for job, labels in zip(batch, prediction.labels, strict=True):
            if isinstance(labels, Exception):  # this image alone failed (its decoding)
                job.resolve(labels)
                continue
            job.resolve(
                JobResult(
                    labels=labels,
                    queue_s=dispatched - job.arrival,
                    infer_s=infer_s,
                    batch_size=len(batch),
                )
            )
