"""The typed dependencies the routes share: the service state, the request's context, the
model a request names, the API-key check, and the error responses protected routes document.

``Annotated`` aliases (``State``, ``Context``, ``Served``, ``Arriving``, ``Tiling``) so a route
states what it needs in its signature; ``Served`` reads ``?model=`` and ``Tiling`` ``?tile=``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from fcn_client.wire import AUTHORIZATION
from fcn_core.tiling import TileMode, TilePolicy
from service.batcher import Upcoming
from service.context import RequestContext, request_context
from service.errors import ServiceError, unavailable
from service.repository import ServedModel
from service.schemas import ErrorBody
from service.state import ServiceState


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(service_state)]
Context = Annotated[RequestContext, Depends(request_context)]


def served_model(
    state: State,
    ctx: Context,
    model: Annotated[
        str | None, Query(description="the model's name (GET /v1/models); default: the default")
    ] = None,
) -> Iterator[ServedModel]:
    """The model a request names, held (leased) until the response is written, so that a
    model swapped meanwhile finishes this request before it is freed."""
    ready, why = state.readiness()
    if not ready:
        raise unavailable(f"not ready: {why}")
    with state.repository.lease(model) as served:
        ctx.model = served.name  # the model label of this request's metrics, refused or not
        yield served


Served = Annotated[ServedModel, Depends(served_model)]


def upcoming_request(served: Served) -> Iterator[Upcoming]:
    """This request announced to its model's batcher from before its body is read, so that
    images already queued wait for it (up to the batching delay), and only while it comes."""
    with served.batcher.upcoming() as upcoming:
        yield upcoming


Arriving = Annotated[Upcoming, Depends(upcoming_request)]


def tile_policy(
    state: State,
    tile: Annotated[
        TileMode | None,
        Query(description="auto | on | off: segment large images in tiles (default: FCN_TILE)"),
    ] = None,
) -> TilePolicy:
    """How this request's images too large for one pass are segmented (``?tile=``)."""
    return state.settings.tile_policy(tile)


Tiling = Annotated[TilePolicy, Depends(tile_policy)]


def require_api_key(request: Request, state: State) -> None:
    key = state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get(AUTHORIZATION, "").partition(" ")
    expected = key.get_secret_value().encode()
    # Constant-time comparison: the time to refuse must not leak how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise ServiceError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )


# The refusals a protected route may answer, documented once for all of them.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)
}
PROTECTED: dict[str, Any] = {
    "dependencies": [Depends(require_api_key)],
    "responses": ERROR_RESPONSES,
}
"""Keyword arguments for an ``APIRouter`` whose routes need the API key."""
