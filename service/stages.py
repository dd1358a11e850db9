"""The stages of a segmentation request, named as LitServe names them: decode, predict, encode.

- ``decode``: uploaded bytes to images, in the codec pool, all images of a request at once.
- ``predict``: images to label maps through the dynamic batcher, within the request's
  deadline, while watching for the client to go away.
- ``encode``: a label map to the answer (label PNG, overlay, JSON), in the codec pool.

Each records its time in the request's context (``Server-Timing``). Failures leave as the
pipeline's own exceptions (``CodecError``, ``QueueFull``, ``DeadlineExceeded``, ...), which
service/errors.py alone turns into statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from fcn_client.wire import ImageFormat, Output
from fcn_core.inference import bucket_of
from fcn_core.tiling import TileBlender, TilePolicy
from fcn_core.weights import WeightsMetadata
from service import codecs
from service.batcher import (
    DeadlineExceeded,
    DynamicBatcher,
    Job,
    JobResult,
    QueueFull,
    ShuttingDown,
    Upcoming,
)
from service.context import RequestContext
from service.repository import ServedModel
from service.runner import ModelInput
from service.schemas import Segmentation
from service.state import ServiceState

Image = codecs.DecodedImage | codecs.EncodedJpeg
T = TypeVar("T")

# -- decode ---------------------------------------------------------------------------------


async def decode(
    state: ServiceState,
    ctx: RequestContext,
    blobs: Sequence[bytes],
    need_pixels: bool,
    tiling: TilePolicy,
) -> list[Image]:
    """Decode in parallel in the codec pool; the first bad image (by position) is the error.

    With ``FCN_DECODE_ON_DEVICE``, JPEGs whose pixels the response does not need (label
    maps, JSON) only have their header checked here and are decoded by the runner. Images
    that ``tiling`` cuts into tiles keep their full resolution.
    """
    s = state.settings
    defer = s.decode_on_device and not need_pixels
    outcomes = await asyncio.gather(
        *(
            state.in_codec_pool(
                codecs.decode_or_defer, b, s.max_image_pixels, s.max_side, defer, tiling
            )
            for b in blobs
        ),
        return_exceptions=True,
    )
    decoded: list[Image] = []
    seconds = 0.0
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, codecs.CodecError):
            raise outcome.at(i, len(blobs))
        if isinstance(outcome, BaseException):
            raise outcome
        decoded.append(outcome[0])
        seconds += outcome[1]
    ctx.record("decode", seconds)
    return decoded


async def decode_pixels(
    state: ServiceState, ctx: RequestContext, arrays: Sequence[np.ndarray], tiling: TilePolicy
) -> list[Image]:
    """Images sent as pixels: the same pixel limit, downscaling and tiling as decoded ones,
    timed as the decode stage."""
    s = state.settings
    done = await asyncio.gather(
        *(
            state.in_codec_pool(codecs.from_pixels, a, s.max_image_pixels, s.max_side, tiling)
            for a in arrays
        )
    )
    ctx.record("decode", sum(seconds for _, seconds in done))
    return [image for image, _ in done]


# -- predict --------------------------------------------------------------------------------


async def predict(
    request: Request,
    state: ServiceState,
    served: ServedModel,
    ctx: RequestContext,
    images: Sequence[Image],
    tiling: TilePolicy,
    upcoming: Upcoming | None,
) -> list[np.ndarray]:
    """The label maps of ``images`` (at the size the model saw them) by ``served``, in order:
    images that ``tiling`` cuts into tiles one after another, after the others, which batch
    as usual. ``upcoming``: the request's announcement to ``served``'s batcher (spent here)."""
    ready, why = state.readiness()
    if not ready:
        # Refused as a stopping batcher refuses: 503 with Retry-After (see errors.py).
        raise ShuttingDown(f"not ready: {why}")
    ctx.model = served.name
    deadline = ctx.arrival + state.settings.request_timeout_s
    tiled = [
        tiling.tiles(*image.model_input.shape[:2], state.settings.max_side) for image in images
    ]
    whole = [image.model_input for image, t in zip(images, tiled, strict=True) if not t]
    if not whole:  # tiles only: they batch among themselves, nobody need wait for them
        served.batcher.withdraw(upcoming)
    results = (
        await submit_and_wait(request, served.batcher, whole, deadline, upcoming) if whole else []
    )
    labels = iter(r.labels for r in results)
    # The request waited for its slowest image: batch-mates share their batch's figures.
    times = [(max(r.queue_s for r in results), max(r.infer_s for r in results))] if results else []
    answers = []
    for image, t in zip(images, tiled, strict=True):
        if not t:
            answers.append(next(labels))
            continue
        assert isinstance(image.model_input, np.ndarray), "tiled images are decoded on the CPU"
        lab, queue_s, infer_s = await predict_tiled(
            request, state, served, image.model_input, tiling, deadline
        )
        answers.append(lab)
        times.append((queue_s, infer_s))
    ctx.record("queue", sum(q for q, _ in times))
    ctx.record("inference", sum(i for _, i in times))
    return answers


async def submit_and_wait(
    request: Request,
    batcher: DynamicBatcher,
    images: Sequence[ModelInput],
    deadline: float,
    upcoming: Upcoming | None = None,
) -> list[JobResult]:
    """Submit ``images`` to ``batcher`` (spending the request's ``upcoming``) and wait for all
    of their label maps."""
    jobs = batcher.submit(images, deadline, upcoming=upcoming)
    return await results_of(request, batcher, jobs, deadline)


async def results_of(
    request: Request, batcher: DynamicBatcher, jobs: list[Job], deadline: float
) -> list[JobResult]:
    """The results of submitted jobs; whatever ends the wait (an error, the client gone, the
    deadline, this task cancelled), nothing is left behind (``abandon``)."""
    try:
        return await wait_for_jobs(request, jobs, deadline)
    finally:
        abandon(batcher, jobs)


def abandon(batcher: DynamicBatcher, jobs: Sequence[Job]) -> None:
    """Jobs nobody will wait for: the queued ones withdrawn before compute, every future
    released (repeating this is harmless)."""
    if not all(job.future.done() for job in jobs):
        batcher.cancel(jobs)
    release(jobs)


TILED_IMAGES_WAITING = 4
"""Tiled images that may wait for their model's tile slot; more get 503. Each waiter holds its
full-resolution image (an 8000 x 6000 photo is 144 MB), so the wait is bounded, not the
queue's 64."""
TILED_RETRY_AFTER_S = 10


async def predict_tiled(
    request: Request,
    state: ServiceState,
    served: ServedModel,
    image: np.ndarray,
    tiling: TilePolicy,
    deadline: float,
) -> tuple[np.ndarray, float, float]:
    """(label map, queue seconds, inference seconds) of one image cut into tiles.

    Tiles go to the batcher as ordinary batch members (a batch's worth at a time, the next
    batch queued while this one computes) and their scores are blended, in the codec pool,
    as they come. One tiled image per model at a time: its blending band is the large part.
    """
    await take_tile_slot(request, served, deadline)
    batcher = served.batcher
    in_flight: list[list[Job]] = []
    try:
        start = time.monotonic()
        blender = TileBlender(*image.shape[:2], tiling.size, tiling.overlap)
        first = blender.tiles[0]
        batches = blender.batches(
            batcher.capacity(bucket_of(first.height, first.width, batcher.bucket_multiple))
        )

        def submit(k: int) -> None:
            tiles = [t.cut(image) for t in batches[k]]
            in_flight.append(batcher.submit(tiles, deadline, scores=True))

        queue_s = 0.0  # the first batch's: later ones are queued while the previous computes
        submit(0)
        for k in range(len(batches)):
            if k + 1 < len(batches):
                submit(k + 1)
            results = await results_of(request, batcher, in_flight.pop(0), deadline)
            for r in results:
                await state.in_codec_pool(blender.add, r.labels)
            queue_s = queue_s or max(r.queue_s for r in results)
        # Inference is the rest of the wall time: tiles computing, and blending beside them.
        return blender.labels, queue_s, time.monotonic() - start - queue_s
    finally:
        for jobs in in_flight:  # an error, the client gone, the deadline: nothing left behind
            abandon(batcher, jobs)
        served.tile_slot.release()


async def take_tile_slot(request: Request, served: ServedModel, deadline: float) -> None:
    """Wait for the model's tile slot, within the deadline, while the client stays; 503 when
    too many tiled images already wait."""
    slot = served.tile_slot
    if slot.locked() and served.tiled_waiting >= TILED_IMAGES_WAITING:
        raise QueueFull(TILED_RETRY_AFTER_S)
    served.tiled_waiting += 1
    taken = asyncio.ensure_future(slot.acquire())
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait(
            {taken, gone},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        served.tiled_waiting -= 1
        if not taken.done():
            taken.cancel()  # a cancelled acquire gives the slot on to the next waiter
        left = gone.done() and not gone.cancelled() and gone.exception() is None
        gone.cancel()
    if taken.done() and not taken.cancelled():
        return
    if left:
        raise ClientDisconnect("while waiting for the tile slot")
    raise DeadlineExceeded()


async def wait_for_jobs(request: Request, jobs: Sequence[Job], deadline: float) -> list[JobResult]:
    """Every job's result; raises the first failure by position, ``DeadlineExceeded`` at the
    deadline, or ``ClientDisconnect`` when the client goes away first.

    The job futures are awaited directly, not through ``asyncio.gather``: a gather that is
    cancelled when a client leaves sets ``CancelledError`` on itself, which nobody retrieves,
    and asyncio then logs "_GatheringFuture exception was never retrieved" for each request.
    """
    pending: set[asyncio.Future] = {job.future for job in jobs}
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        while pending:
            done, _ = await asyncio.wait(
                pending | {gone},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            pending -= done
            if any(f is not gone and not f.cancelled() and f.exception() for f in done):
                raise first_failure(jobs)
            if not pending:
                break  # every result is in: answer, even if the client left meanwhile
            if gone in done:
                raise ClientDisconnect("before the result")
            if not done:
                raise DeadlineExceeded()
    finally:
        gone.cancel()
        if gone.done() and not gone.cancelled():
            gone.exception()  # a receive() that failed: the client is gone all the same
    return [job.future.result() for job in jobs]


def first_failure(jobs: Sequence[Job]) -> BaseException:
    """The failure of the first failed job by position (an image decoded on the device that
    turned out broken is named as ``images[i]``)."""
    for i, job in enumerate(jobs):
        f = job.future
        if f.done() and not f.cancelled() and (exc := f.exception()) is not None:
            return exc.at(i, len(jobs)) if isinstance(exc, codecs.CodecError) else exc
    raise AssertionError("first_failure called with no failed job")


def release(jobs: Sequence[Job]) -> None:
    """Nobody will read these futures again: cancel the pending ones (the batcher skips a
    cancelled future) and mark failures as seen, so asyncio does not log them as lost."""
    for job in jobs:
        if not job.future.cancel() and not job.future.cancelled():
            job.future.exception()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- encode ---------------------------------------------------------------------------------


async def encode(
    state: ServiceState, ctx: RequestContext, fn: Callable[..., T], calls: Sequence[tuple]
) -> list[T]:
    """``fn(*args)`` for each args of ``calls``, in parallel in the codec pool."""
    encoded = await asyncio.gather(*(state.in_codec_pool(fn, *args) for args in calls))
    ctx.record("encode", sum(seconds for _, seconds in encoded))
    return [out for out, _ in encoded]


def segmentation(image: Image, labels: np.ndarray, meta: WeightsMetadata) -> Segmentation:
    """The JSON answer for one image: its size, the classes present, the label PNG."""
    full = codecs.restore_size(labels, image.size)
    return Segmentation(
        width=image.size[0],
        height=image.size[1],
        classes=codecs.summary(full, meta.class_names),
        labels_png_base64=codecs.b64(codecs.labels_png(full, meta.palette)),
    )


def render(
    image: Image,
    labels: np.ndarray,
    meta: WeightsMetadata,
    output: Output,
    fmt: ImageFormat,
    alpha: float,
) -> Response:
    """The answer to ``POST /segment`` for one image, in the ``output`` asked for."""
    if output is Output.json:
        body = segmentation(image, labels, meta).model_dump_json().encode()
        return Response(body, media_type="application/json")
    full = codecs.restore_size(labels, image.size)
    if output is Output.labels:
        return Response(codecs.labels_png(full, meta.palette), media_type="image/png")
    assert isinstance(image, codecs.DecodedImage), "overlays are drawn on decoded pixels"
    data = codecs.overlay(image.rgb, full, meta.palette, alpha, fmt.value)
    return Response(data, media_type=f"image/{fmt.value}")
