"""The app factory and its lifespan.

``create_app(settings)`` serves the weights file the settings name; ``create_app(settings,
model=m, meta=meta)`` serves any ``nn.Module`` that maps normalised N x 3 x H x W batches to
N x C x H x W logits (benchmarks, tests). Start-up (load, warm up, start the worker) runs in
a thread before the server accepts connections; shutdown drains the queue within a bound.
The routes live in service/routes/, the error answers in service/errors.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from torch import nn

from fcn_core.weights import WeightsMetadata
from service import __version__, routes
from service.errors import add_error_handlers
from service.middleware import TelemetryMiddleware
from service.routes.ui import mount_static
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
    app.include_router(routes.router)
    mount_static(app)
    app.add_middleware(TelemetryMiddleware, metrics=state.metrics)
    add_error_handlers(app, state)
    return app
