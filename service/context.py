"""``RequestContext``: what the telemetry middleware and the routes share about one request.

One typed object under one key of the ASGI scope's ``state``, instead of loose
``request.state`` attributes: the middleware creates it (id, arrival time) and turns its
timings into ``Server-Timing``; the stages record into it; the error handlers read its id.
Plain ASGI types only, so the middleware needs nothing of FastAPI to use it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection
from starlette.types import Scope

from fcn_client.wire import SERVER_TIMING_STAGES

STATE_KEY = "fcn_request"


@dataclass
class RequestContext:
    request_id: str
    arrival: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` at arrival: the request's deadline counts from here."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (``SERVER_TIMING_STAGES``), as the stages record them."""
    model: str = ""
    """The name of the model that served the request (the ``model`` label of its metrics)."""

    def record(self, stage: str, seconds: float) -> None:
        self.timings[stage] = seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Records the wall time of the block under ``stage`` (only if it succeeds)."""
        start = time.perf_counter()
        yield
        self.record(stage, time.perf_counter() - start)

    def server_timing(self, total_s: float) -> str:
        """The ``Server-Timing`` value: the recorded stages in request order, then the total."""
        parts = [
            f"{name};dur={self.timings[name] * 1000:.2f}"
            for name in SERVER_TIMING_STAGES
            if name in self.timings
        ]
        parts.append(f"total;dur={total_s * 1000:.2f}")
        return ", ".join(parts)


def attach(scope: Scope, context: RequestContext) -> None:
    scope.setdefault("state", {})[STATE_KEY] = context


def request_context(conn: HTTPConnection) -> RequestContext:
    """The request's context. The middleware attaches it first; an app mounted without the
    middleware (a bare router in a test) gets a fresh one, so callers never check for None."""
    state = conn.scope.setdefault("state", {})
    context = state.get(STATE_KEY)
    if context is None:
        context = state[STATE_KEY] = RequestContext(uuid.uuid4().hex)
    return context
