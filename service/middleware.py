"""Per-request telemetry as plain ASGI: request id, Server-Timing, duration metric, last-resort 500.

It attaches the request's ``RequestContext`` (service/context.py), which the routes fill in.
Plain ASGI rather than ``BaseHTTPMiddleware`` so that the handler keeps the real ``receive``
(it watches it for client disconnects) and streaming bodies are not buffered. It sits
innermost-but-one, so even an unexpected exception leaves with the request id and a JSON body.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fcn_client.wire import REQUEST_ID, SERVER_TIMING
from service.context import RequestContext, attach
from service.metrics import Metrics
from service.schemas import ErrorBody

log = logging.getLogger(__name__)

# Echo only ids that are safe to put in logs and headers; anything else gets a fresh one.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent = Headers(scope=scope).get(REQUEST_ID, "")
        context = RequestContext(sent if _SAFE_ID.match(sent) else uuid.uuid4().hex)
        attach(scope, context)
        request_id = context.request_id
        status = 500
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID] = request_id
                headers[SERVER_TIMING] = context.server_timing(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception(
                "unhandled error in %s %s [%s]", scope["method"], scope["path"], request_id
            )
            if not started:
                body = ErrorBody(detail="internal server error", request_id=request_id)
                await send_with_headers(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send(
                    {"type": "http.response.body", "body": json.dumps(body.model_dump()).encode()}
                )
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request_duration.labels(endpoint, str(status), context.model).observe(
                time.perf_counter() - start
            )
