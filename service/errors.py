"""One error type for every refusal, one JSON shape for every error body.

Handlers raise ``ServiceError`` with the status a client should act on and a ``reason`` for
``fcn_requests_rejected_total``; the app turns it into ``{"detail": ..., "request_id": ...}``.
Unexpected exceptions become a bare 500 with the request id, never a stack trace.
"""

from __future__ import annotations

from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: str
    request_id: str = ""


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
