"""The app factory and its lifespan.

``create_app(settings)`` serves the weights file the settings name; ``create_app(settings,
model=m, meta=meta)`` serves any ``nn.Module`` that maps normalised N x 3 x H x W batches to
N x C x H x W logits (benchmarks, tests). Start-up (load, warm up, start the worker) runs in
a thread before the server accepts connections; shutdown drains the queue within a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from torch import nn

from fcn_core.weights import WeightsMetadata
from service import __version__, api
from service.errors import ErrorBody, ServiceError
from service.middleware import TelemetryMiddleware
from service.settings import Settings
from service.state import ServiceState

DESCRIPTION = """FCN-8s semantic segmentation (Long, Shelhamer, Darrell, CVPR 2015) behind a
dynamic-batching worker. `POST /segment` with an image; see `/v1/model` for the classes."""


def create_app(
    settings: Settings | None = None,
    *,
    model: nn.Module | None = None,
    meta: WeightsMetadata | None = None,
) -> FastAPI:
    state = ServiceState(settings or Settings(), model, meta)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(state.start)
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(
        title="fcn-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.service = state
    app.include_router(api.router)
    app.mount("/static", StaticFiles(directory=api.STATIC_DIR, check_dir=False), name="static")
    app.add_middleware(TelemetryMiddleware, metrics=state.metrics)

    def error(
        request: Request, status: int, detail: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        body = ErrorBody(detail=detail, request_id=getattr(request.state, "request_id", ""))
        return JSONResponse(body.model_dump(), status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.reason is not None:
            state.metrics.rejected.labels(exc.reason).inc()
        return error(request, exc.status, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejected.labels("bad_input").inc()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return error(request, 422, problems or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(request, exc.status_code, str(exc.detail), dict(exc.headers or {}))

    return app
