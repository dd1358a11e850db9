"""Routes and their pydantic models.

A request's path: read the body under the byte limit (413 while streaming), decode in the
codec pool, queue in the batcher with its arrival time and deadline, await the label maps
while watching for a client disconnect, encode in the codec pool, answer. Each stage's time
goes into ``Server-Timing``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message

from fcn_core.weights import WeightsMetadata
from service import codecs
from service.batcher import DeadlineExceeded, JobResult, QueueFull, ShuttingDown
from service.errors import ErrorBody, ServiceError
from service.runner import DeviceOutOfMemory
from service.state import ServiceState

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"

# -- response models ------------------------------------------------------------------------


class ClassShare(BaseModel):
    index: int
    name: str
    pixels: int
    fraction: float = Field(description="pixels / (width * height)")


class Segmentation(BaseModel):
    width: int
    height: int
    classes: list[ClassShare] = Field(description="classes present, most pixels first")
    labels_png_base64: str = Field(
        description="palette PNG, width x height, pixel values = class indices"
    )


class BatchSegmentation(BaseModel):
    results: list[Segmentation] = Field(description="one per image, in the order sent")


class NormalizationInfo(BaseModel):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str


class ModelInfo(BaseModel):
    arch: str
    backbone: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    normalization: NormalizationInfo
    ignore_index: int
    dataset: str
    metrics: dict[str, Any]
    metrics_split: str
    command: str
    created: str
    notes: str
    sha256: str
    format_version: int
    device: str
    precision: str


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    detail: str = ""


class Output(str, Enum):
    labels = "labels"
    overlay = "overlay"
    json = "json"


class ImageFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"


# -- dependencies ---------------------------------------------------------------------------


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


def require_api_key(request: Request) -> None:
    key = service_state(request).settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise ServiceError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503, 504)
}
router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)

# -- reading the request --------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (never stored whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ServiceError(
                413, f"body of {declared} bytes exceeds the {limit}-byte limit", "too_large"
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"body exceeds the {limit}-byte limit", "too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServiceError(499, "client disconnected during upload", "disconnected") from None
    return b"".join(chunks)


async def read_images(request: Request, state: ServiceState, field: str, most: int) -> list[bytes]:
    """Image bytes from multipart field(s) ``field``, or from a raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_raw = content_type.startswith("image/") or content_type == "application/octet-stream"
    if content_type != "multipart/form-data" and not (is_raw and most == 1):
        how = f"multipart field '{field}'" + (
            " or as a raw body with an image/* Content-Type" if most == 1 else ""
        )
        raise ServiceError(
            415, f"Content-Type {content_type or '(none)'} not accepted: send the image as {how}"
        )
    start = time.perf_counter()
    body = await read_body(request, state.settings.max_body_bytes)
    if is_raw:
        request.state.timings["read"] = time.perf_counter() - start
        return [body]
    images = await multipart_files(request, body, field, most)
    request.state.timings["read"] = time.perf_counter() - start
    return images


async def multipart_files(request: Request, body: bytes, field: str, most: int) -> list[bytes]:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    parser = Request(request.scope, replay)
    try:
        form = await parser.form(max_files=most, max_fields=100)
    except HTTPException as exc:
        raise ServiceError(400, f"malformed multipart body: {exc.detail}") from None
    try:
        values = form.getlist(field)
        if not values:
            found = ", ".join(sorted(set(form.keys()))) or "none"
            raise ServiceError(422, f"multipart field '{field}' is missing (fields sent: {found})")
        if not all(isinstance(v, UploadFile) for v in values):
            raise ServiceError(422, f"multipart field '{field}' must be a file, not text")
        return [await v.read() for v in values if isinstance(v, UploadFile)]
    finally:
        await form.close()


# -- running the model ----------------------------------------------------------------------


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def segment_images(
    request: Request, state: ServiceState, images: list[np.ndarray]
) -> list[JobResult]:
    ready, why = state.readiness()
    if not ready or state.batcher is None:
        raise ServiceError(503, f"not ready: {why}", "shutting_down", {"Retry-After": "5"})
    timeout = state.settings.request_timeout_s
    deadline = request.state.arrival + timeout
    try:
        jobs = state.batcher.submit(images, deadline)
    except QueueFull as exc:
        raise ServiceError(
            503,
            f"the queue is full ({state.batcher.max_queue_size} images); retry later",
            "queue_full",
            {"Retry-After": str(exc.retry_after_s)},
        ) from None
    except ShuttingDown:
        raise ServiceError(503, "shutting down", "shutting_down", {"Retry-After": "5"}) from None
    results = asyncio.gather(*(job.future for job in jobs))
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {results, gone},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        gone.cancel()
    if results in done:
        try:
            return list(results.result())
        except codecs.CodecError:
            # An image decoded on the device turned out broken: the first by position.
            for i, job in enumerate(jobs):
                failed = job.future.done() and not job.future.cancelled()
                if failed and isinstance(exc := job.future.exception(), codecs.CodecError):
                    where = f"images[{i}]: " if len(jobs) > 1 else ""
                    raise ServiceError(exc.status, where + exc.detail, exc.reason) from None
            raise
        except DeadlineExceeded:
            raise ServiceError(
                504, f"not computed within the {timeout:g} s deadline", "timeout"
            ) from None
        except DeviceOutOfMemory as exc:
            raise ServiceError(413, str(exc), "too_large") from None
        except ShuttingDown:
            raise ServiceError(
                503, "shutting down", "shutting_down", {"Retry-After": "5"}
            ) from None
    state.batcher.cancel(jobs)
    results.cancel()
    if gone in done:
        raise ServiceError(499, "client disconnected before the result", "disconnected")
    raise ServiceError(504, f"not computed within the {timeout:g} s deadline", "timeout")


Image = codecs.DecodedImage | codecs.EncodedJpeg


async def decode_all(
    request: Request, state: ServiceState, blobs: list[bytes], need_pixels: bool
) -> list[Image]:
    """Decode in parallel in the codec pool; the first bad image (by position) is the error.

    With ``FCN_DECODE_ON_DEVICE``, JPEGs whose pixels the response does not need (label
    maps, JSON) only have their header checked here and are decoded by the runner.
    """
    s = state.settings
    defer = s.decode_on_device and not need_pixels
    outcomes = await asyncio.gather(
        *(
            state.in_codec_pool(codecs.decode_or_defer, b, s.max_image_pixels, s.max_side, defer)
            for b in blobs
        ),
        return_exceptions=True,
    )
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, codecs.CodecError):
            where = f"images[{i}]: " if len(blobs) > 1 else ""
            raise ServiceError(outcome.status, where + outcome.detail, outcome.reason)
        if isinstance(outcome, BaseException):
            raise outcome
    decoded = [image for image, _ in outcomes]  # type: ignore[misc]
    request.state.timings["decode"] = sum(seconds for _, seconds in outcomes)  # type: ignore[misc]
    return decoded


def record_compute(request: Request, results: list[JobResult]) -> None:
    request.state.timings["queue"] = max(r.queue_s for r in results)
    request.state.timings["inference"] = max(r.infer_s for r in results)


def segmentation(image: Image, labels: np.ndarray, meta: WeightsMetadata) -> Segmentation:
    full = codecs.restore_size(labels, image.size)
    return Segmentation(
        width=image.size[0],
        height=image.size[1],
        classes=[ClassShare(**vars(c)) for c in codecs.summary(full, meta.class_names)],
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
    if output is Output.json:
        body = segmentation(image, labels, meta).model_dump_json().encode()
        return Response(body, media_type="application/json")
    full = codecs.restore_size(labels, image.size)
    if output is Output.labels:
        return Response(codecs.labels_png(full, meta.palette), media_type="image/png")
    assert isinstance(image, codecs.DecodedImage), "overlays are drawn on decoded pixels"
    data = codecs.overlay(image.rgb, full, meta.palette, alpha, fmt.value)
    return Response(data, media_type=f"image/{fmt.value}")


# -- routes ---------------------------------------------------------------------------------

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`labels`: palette PNG of class indices; `overlay`: PNG or JPEG; "
        "`json`: a Segmentation",
        "content": {
            "image/png": {},
            "image/jpeg": {},
            "application/json": {"schema": {"$ref": "#/components/schemas/Segmentation"}},
        },
    }
}


@protected.post("/segment", responses=IMAGE_RESPONSES, response_class=Response)
async def segment(
    request: Request,
    output: Output = Query(Output.labels, description="labels | overlay | json"),
    fmt: ImageFormat = Query(ImageFormat.png, alias="format", description="overlay format"),
    alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay colour weight"),
) -> Response:
    """Segment one image, sent as multipart field `image` or as a raw `image/*` body."""
    state = service_state(request)
    (blob,) = await read_images(request, state, "image", 1)
    (image,) = await decode_all(request, state, [blob], need_pixels=output is Output.overlay)
    (result,) = await segment_images(request, state, [image.model_input])
    record_compute(request, [result])
    assert state.meta is not None
    response, seconds = await state.in_codec_pool(
        render, image, result.labels, state.meta, output, fmt, alpha
    )
    request.state.timings["encode"] = seconds
    return response


@protected.post("/segment/batch", response_model=BatchSegmentation)
async def segment_batch(request: Request) -> BatchSegmentation:
    """Segment several images, sent as repeated multipart fields `images`; answered in order."""
    state = service_state(request)
    blobs = await read_images(request, state, "images", state.settings.max_images_per_request)
    images = await decode_all(request, state, blobs, need_pixels=False)
    results = await segment_images(request, state, [im.model_input for im in images])
    record_compute(request, results)
    assert state.meta is not None
    encoded = await asyncio.gather(
        *(
            state.in_codec_pool(segmentation, image, result.labels, state.meta)
            for image, result in zip(images, results, strict=True)
        )
    )
    request.state.timings["encode"] = sum(seconds for _, seconds in encoded)
    return BatchSegmentation(results=[seg for seg, _ in encoded])


@protected.get("/v1/model", response_model=ModelInfo)
async def model_info(request: Request) -> ModelInfo:
    """The served weights' metadata: architecture, classes, palette, metrics, content hash."""
    state = service_state(request)
    if state.meta is None:
        raise ServiceError(503, "the model is not loaded yet", None, {"Retry-After": "5"})
    d = state.meta.to_dict()
    d.pop("at_once", None)
    return ModelInfo(**d, device=state.device, precision=state.precision)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and its event loop answers."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """Weights loaded, warmed up, batch worker running: ready for traffic."""
    ready, why = service_state(request).readiness()
    return JSONResponse(Readiness(ready=ready, detail=why).model_dump(), 200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(service_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def index() -> Response:
    if not INDEX_HTML.is_file():
        raise ServiceError(404, "the demo page is not installed (service/static/index.html)", None)
    return FileResponse(INDEX_HTML)


router.include_router(protected)
