"""The Open Inference Protocol's HTTP/REST routes (``/v2``): health, metadata, readiness,
inference, and the model repository extension (load, unload, index).

Inference reads the body under the same byte limit as ``/segment``, parses it with
``service/protocol.py``, and runs its images through the same decode, predict (the model's
own batcher, deadline and queue limits) and metrics as ``/segment``. Errors are answered as
the protocol says, ``{"error": "..."}`` (``service/errors.py`` formats every error under
``/v2`` so). Health routes are open; the others need the API key when one is set.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service import __version__, codecs, protocol
from service.deps import ERROR_RESPONSES, Context, State, require_api_key
from service.errors import ServiceError
from service.repository import ServedModel
from service.stages import decode, decode_pixels, encode, predict
from service.uploads import read_body

health = APIRouter(prefix="/v2", tags=["open inference protocol"])
router = APIRouter(
    prefix="/v2",
    tags=["open inference protocol"],
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
)


def _status(ok: bool) -> Response:
    # The protocol: 200 means true, a 4xx false; the bodies are empty.
    return Response(status_code=200 if ok else 400)


@health.get("")
async def server_metadata() -> dict:
    return {"name": "fcn-serve", "version": __version__, "extensions": protocol.EXTENSIONS}


@health.get("/health/live")
async def live() -> Response:
    return _status(True)


@health.get("/health/ready")
async def ready(state: State) -> Response:
    return _status(state.readiness()[0])


def _model(state: State, name: str, version: str | None = None) -> ServedModel:
    return check_version(state.repository.get(name), version)


def check_version(served: ServedModel, version: str | None) -> ServedModel:
    if version is not None and version != served.version:
        raise ServiceError(
            404,
            f"model {served.name!r} has version {served.version}, not {version!r}",
            "unknown_model",
        )
    return served


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(state: State, name: str, version: str | None = None) -> dict:
    served = _model(state, name, version)
    return protocol.model_metadata(served.name, served.version, served.meta)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(state: State, name: str, version: str | None = None) -> Response:
    try:
        served = _model(state, name, version)
    except (LookupError, ServiceError):
        return _status(False)
    return _status(served.ready)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(
    request: Request, state: State, ctx: Context, name: str, version: str | None = None
) -> Response:
    s = state.settings
    with state.repository.lease(name) as served, served.batcher.upcoming() as arriving:
        check_version(served, version)  # the leased model's, not a newer one's
        with ctx.timed("read"):
            body = await read_body(request, s.max_body_bytes)
        parsed = protocol.parse_request(body, request.headers.get(protocol.HEADER_LENGTH))
        kind, items = protocol.request_images(parsed)
        if not 1 <= len(items) <= s.max_images_per_request:
            raise protocol.ProtocolError(
                f"send 1 to {s.max_images_per_request} images per request, not {len(items)}"
            )
        tiling = s.tile_policy(parsed.tile)
        if kind == protocol.IMAGES:
            images = await decode(state, ctx, items, False, tiling)  # type: ignore[arg-type]
        else:
            images = await decode_pixels(state, ctx, items, tiling)  # type: ignore[arg-type]
        labels = await predict(request, state, served, ctx, images, tiling, arriving)
        full = await encode(
            state,
            ctx,
            codecs.restore_size,
            [(lab, im.size) for lab, im in zip(labels, images, strict=True)],
        )
        content, headers = protocol.encode_response(
            served.name, served.version, parsed, protocol.label_outputs(full)
        )
    return Response(content, headers=headers)


# -- the model repository extension ---------------------------------------------------------


@router.post("/repository/index")
async def repository_index(state: State) -> list[dict]:
    return [
        {"name": m.name, "version": m.version, "state": "READY" if m.ready else "UNAVAILABLE"}
        for m in state.repository.models()
    ]


@router.post("/repository/models/{name}/load")
async def load(state: State, name: str) -> JSONResponse:
    """Load (or reload) ``name`` from its file beside the serving one, then swap; a file that
    cannot be loaded leaves the serving model as it is and says why."""
    served = await asyncio.to_thread(state.repository.load, name)
    return JSONResponse({"name": served.name, "version": served.version})


@router.post("/repository/models/{name}/unload")
async def unload(state: State, name: str) -> Response:
    await asyncio.to_thread(state.repository.unload, name)
    return Response(status_code=200)
