"""One error type for every refusal, one place that maps failures to it, one JSON shape.

Routes raise ``ServiceError`` with the status a client should act on and a ``reason`` for
``fcn_requests_rejected_total``, or simply let the pipeline's own exceptions through (queue
full, shutting down, deadline, device out of memory, a bad image, a client gone):
``to_service_error`` is the only place that turns those into statuses, messages and
``Retry-After``. The handlers installed by ``add_error_handlers`` answer every error as
``{"detail": ..., "request_id": ...}``; unexpected exceptions become a bare 500 with the
request id in the middleware, never a stack trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from fcn_client.wire import RETRY_AFTER
from fcn_core.weights import WeightsError
from service.batcher import DeadlineExceeded, QueueFull, ShuttingDown
from service.codecs import CodecError
from service.context import request_context
from service.protocol import ProtocolError
from service.repository import UnknownModel
from service.runner import DeviceOutOfMemory
from service.schemas import ErrorBody

if TYPE_CHECKING:
    from service.state import ServiceState

V2_PREFIX = "/v2"  # the Open Inference Protocol's routes: errors as {"error": ...}

# What a client should wait before trying again when the service cannot take work at all.
RETRY_UNAVAILABLE_S = 5


class ServiceError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        reason: str | None = "bad_input",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.headers = headers or {}


def unavailable(detail: str, reason: str | None = "shutting_down") -> ServiceError:
    """503 with ``Retry-After``: not ready yet, or no longer."""
    return ServiceError(503, detail, reason, {RETRY_AFTER: str(RETRY_UNAVAILABLE_S)})


# The pipeline's exceptions that are refusals, not bugs; anything else is a 500.
PIPELINE_ERRORS: tuple[type[Exception], ...] = (
    CodecError,
    QueueFull,
    ShuttingDown,
    DeadlineExceeded,
    DeviceOutOfMemory,
    ClientDisconnect,
    ProtocolError,
    UnknownModel,
    WeightsError,
)


def to_service_error(exc: Exception, *, timeout_s: float, queue_size: int) -> ServiceError:
    """The answer to one of ``PIPELINE_ERRORS``; ``timeout_s`` and ``queue_size`` are the
    limits its message quotes. Raises ``TypeError`` for anything else (that is a bug)."""
    if isinstance(exc, CodecError):
        return ServiceError(exc.status, exc.detail, exc.reason)
    if isinstance(exc, QueueFull):
        return ServiceError(
            503,
            f"the queue is full ({queue_size} images); retry later",
            "queue_full",
            {RETRY_AFTER: str(exc.retry_after_s)},
        )
    if isinstance(exc, ShuttingDown):
        # The stages raise it with a message when the service is not ready (yet or any more).
        return unavailable(str(exc) or "shutting down")
    if isinstance(exc, DeadlineExceeded):
        # Dropped from the queue, or computed too late: the client waited long enough either way.
        return ServiceError(504, f"not computed within the {timeout_s:g} s deadline", "timeout")
    if isinstance(exc, DeviceOutOfMemory):
        return ServiceError(413, str(exc), "too_large")
    if isinstance(exc, ProtocolError):
        return ServiceError(exc.status, exc.message)
    if isinstance(exc, UnknownModel):
        return ServiceError(404, str(exc), "unknown_model")
    if isinstance(exc, WeightsError):
        # A model load that failed (POST /v2/repository/models/{name}/load): the serving
        # model is untouched; the answer says why.
        return ServiceError(400, f"not loaded: {exc}")
    if isinstance(exc, ClientDisconnect):
        # Nobody reads this answer; it is counted (reason "disconnected"), not logged.
        when = str(exc) or "before the answer"
        return ServiceError(499, f"client disconnected {when}", "disconnected")
    raise TypeError(f"not a pipeline error: {exc!r}")


def error_response(request: Request, error: ServiceError) -> JSONResponse:
    request_id = request_context(request).request_id
    if request.url.path.startswith(V2_PREFIX):
        # The Open Inference Protocol's error shape; the id travels in X-Request-ID.
        return JSONResponse({"error": error.detail}, error.status, headers=error.headers)
    body = ErrorBody(detail=error.detail, request_id=request_id)
    return JSONResponse(body.model_dump(), error.status, headers=error.headers)


def add_error_handlers(app: FastAPI, state: ServiceState) -> None:
    """Every refusal answered as an ``ErrorBody`` and counted by reason."""

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        if exc.reason is not None:
            state.metrics.rejected.labels(exc.reason).inc()
        return error_response(request, exc)

    async def pipeline_error(request: Request, exc: Exception) -> JSONResponse:
        batcher = state.batcher
        queue_size = batcher.max_queue_size if batcher else state.settings.max_queue_size
        timeout_s = state.settings.request_timeout_s
        mapped = to_service_error(exc, timeout_s=timeout_s, queue_size=queue_size)
        return await service_error(request, mapped)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return await service_error(request, ServiceError(422, problems or "invalid request"))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's own refusals (404, 405): not counted as rejected requests.
        assert isinstance(exc, HTTPException)
        error = ServiceError(exc.status_code, str(exc.detail), None, dict(exc.headers or {}))
        return error_response(request, error)

    app.add_exception_handler(ServiceError, service_error)
    for kind in PIPELINE_ERRORS:
        app.add_exception_handler(kind, pipeline_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
