"""The HTTP routes, one router per concern; ``router`` is all of them, as the app includes it.

- ``health``: ``/healthz``, ``/readyz``, ``/metrics`` (open: probes and scrapers hold no key)
- ``ui``: ``/`` and ``/static`` (the demo page)
- ``segment``: ``POST /segment``, ``POST /segment/batch`` (API key, when one is set)
- ``model``: ``GET /v1/models``, ``/v1/models/{name}``, ``/v1/model`` (API key, when one is set)
- ``v2``: the Open Inference Protocol: ``/v2`` health (open) and metadata, readiness,
  inference and the repository extension (API key, when one is set)
"""

from __future__ import annotations

from fastapi import APIRouter

from service.routes import health, model, segment, ui, v2

# Each concern's router; their order is the order of the paths in the OpenAPI document.
ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    ui.router,
    segment.router,
    model.router,
    v2.health,
    v2.router,
)

router = APIRouter()
for part in ROUTERS:
    router.include_router(part)

__all__ = ["ROUTERS", "router"]
