"""``POST /segment`` and ``POST /segment/batch``: read, decode, predict, encode.

Each route is the same four stages (service/uploads.py reads, service/stages.py does the
rest); they differ in how many images come in and what goes out.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from fcn_client.wire import (
    IMAGE_FIELD,
    IMAGES_FIELD,
    MODEL_HEADER,
    MODEL_VERSION_HEADER,
    ImageFormat,
    Output,
)
from service.deps import PROTECTED, Arriving, Context, Served, State, Tiling
from service.repository import ServedModel
from service.schemas import BatchSegmentation
from service.stages import decode, encode, predict, render, segmentation
from service.uploads import read_images

router = APIRouter(**PROTECTED)

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


def model_headers(served: ServedModel) -> dict[str, str]:
    """Which model answered: its name and version (the weights' content hash, short)."""
    return {MODEL_HEADER: served.name, MODEL_VERSION_HEADER: served.version}


@router.post("/segment", responses=IMAGE_RESPONSES, response_class=Response)
async def segment(
    request: Request,
    state: State,
    ctx: Context,
    served: Served,
    arriving: Arriving,
    tiling: Tiling,
    output: Annotated[Output, Query(description="labels | overlay | json")] = Output.labels,
    fmt: Annotated[
        ImageFormat, Query(alias="format", description="overlay format")
    ] = ImageFormat.png,
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="overlay colour weight")] = 0.5,
) -> Response:
    """Segment one image, sent as multipart field `image` or as a raw `image/*` body, with
    the model `model` (the default when omitted). Images larger than one pass are cut into
    tiles or downscaled as `tile` says."""
    with ctx.timed("read"):
        (blob,) = await read_images(request, IMAGE_FIELD, 1, state.settings.max_body_bytes)
    (image,) = await decode(state, ctx, [blob], output is Output.overlay, tiling)
    (labels,) = await predict(request, state, served, ctx, [image], tiling, arriving)
    meta = served.meta
    (response,) = await encode(state, ctx, render, [(image, labels, meta, output, fmt, alpha)])
    response.headers.update(model_headers(served))
    return response


@router.post("/segment/batch", response_model=BatchSegmentation)
async def segment_batch(
    request: Request,
    response: Response,
    state: State,
    ctx: Context,
    served: Served,
    arriving: Arriving,
    tiling: Tiling,
) -> BatchSegmentation:
    """Segment several images, sent as repeated multipart fields `images`, with the model
    `model` (the default when omitted); answered in order."""
    s = state.settings
    with ctx.timed("read"):
        blobs = await read_images(request, IMAGES_FIELD, s.max_images_per_request, s.max_body_bytes)
    images = await decode(state, ctx, blobs, False, tiling)
    labels = await predict(request, state, served, ctx, images, tiling, arriving)
    results = await encode(
        state,
        ctx,
        segmentation,
        [(image, lab, served.meta) for image, lab in zip(images, labels, strict=True)],
    )
    response.headers.update(model_headers(served))
    return BatchSegmentation(results=results)
