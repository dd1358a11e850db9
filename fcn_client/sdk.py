"""The service over HTTP: ``SegmentationClient`` (blocking) and ``AsyncSegmentationClient``.

This module owns one request's life on the client side: the query and form it sends (spelt
with ``fcn_client.wire``'s names), retries with full-jitter exponential back-off when the
server is busy (503, honouring ``Retry-After``), behind a restarting proxy (502) or
unreachable, and the answer as a :class:`SegmentResult` or a :class:`SegmentationError` with
the server's ``detail``. Standard library and httpx only.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

import httpx

from fcn_client.wire import (
    AUTHORIZATION,
    IMAGE_FIELD,
    MODEL_PARAM,
    REQUEST_ID,
    RETRY_AFTER,
    SERVER_TIMING,
    ImageFormat,
    Output,
)

DEFAULT_SERVER = "http://127.0.0.1:8000"
# 503: the queue is full; 502: a proxy in front of the service could not reach it (restart).
RETRY_STATUSES = frozenset({502, 503})

P = ParamSpec("P")
T = TypeVar("T")


class SegmentationError(RuntimeError):
    """A request that failed for good: the server's status and its ``detail``, or the network."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


@dataclass
class SegmentResult:
    content: bytes
    content_type: str
    timing_ms: dict[str, float]  # Server-Timing: stage name -> milliseconds
    request_id: str | None
    attempts: int  # 1 when the first try succeeded

    def json(self) -> dict[str, Any]:
        """The body of an ``output="json"`` answer: width, height, classes, labels PNG."""
        return json.loads(self.content)


@dataclass
class RetryPolicy:
    """How long to wait before retry ``attempt`` (1-based): full-jitter exponential back-off,
    but never less than what the server asked for in ``Retry-After``."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            wait = max(wait, min(retry_after_s, self.max_backoff_s))
        return wait


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``queue;dur=1.2, inference;dur=75.3`` -> {"queue": 1.2, "inference": 75.3}."""
    timing: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key == "dur":
                with contextlib.suppress(ValueError):
                    timing[name] = float(number.strip('"'))
    return timing


def _error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', e)}"
            if isinstance(e, dict)
            else str(e)
            for e in detail
        )
    return str(detail) if detail else (response.text[:200] or response.reason_phrase)


def _wire(value: str) -> str:
    """An enum member's value, or the string as given: a value the server does not know is
    the server's to refuse (422 with its reason), as it always was."""
    return value.value if isinstance(value, Enum) else value


def _query(
    output: Output | str, fmt: ImageFormat | str | None, alpha: float | None, model: str | None
) -> dict[str, str]:
    params = {"output": _wire(output)}
    if model is not None:
        params[MODEL_PARAM] = model
    if fmt is not None:
        params["format"] = _wire(fmt)
    if alpha is not None:
        params["alpha"] = f"{alpha:g}"
    return params


def _image_bytes(image: bytes | str | Path) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, "image"
    path = Path(image)
    return path.read_bytes(), path.name


def _result(response: httpx.Response, attempts: int) -> SegmentResult:
    if response.status_code != 200:
        raise SegmentationError(
            f"HTTP {response.status_code}: {_error_detail(response)}",
            response.status_code,
            attempts,
        )
    return SegmentResult(
        response.content,
        response.headers.get("content-type", ""),
        parse_server_timing(response.headers.get(SERVER_TIMING)),
        response.headers.get(REQUEST_ID),
        attempts,
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {AUTHORIZATION: f"Bearer {api_key}"} if api_key else {}


class AsyncSegmentationClient:
    """The service over HTTP, asynchronously; one connection pool shared by every request."""

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[int, str, float], None] | None = None,
        max_connections: int = 64,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=_headers(api_key),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def __aenter__(self) -> AsyncSegmentationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def model(self, name: str | None = None) -> dict[str, Any]:
        """``GET /v1/model`` (the default) or ``/v1/models/{name}``: architecture, classes,
        palette, metrics, weights hash, version."""
        path = "/v1/model" if name is None else f"/v1/models/{quote(name, safe='')}"
        return (await self._send("GET", path)).json()

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: every served model, and which one is the default."""
        return (await self._send("GET", "/v1/models")).json()

    async def segment(
        self,
        image: bytes | str | Path,
        output: Output | str = Output.labels,
        fmt: ImageFormat | str | None = None,
        alpha: float | None = None,
        model: str | None = None,
    ) -> SegmentResult:
        """``POST /segment``: one image (its bytes, or a file) -> the answer as ``output``
        (label PNG, overlay in ``fmt`` with colour weight ``alpha``, or JSON) by the model
        named ``model``; the server's defaults for whatever is None. Raises
        ``SegmentationError`` once retries are spent."""
        data, name = _image_bytes(image)
        return _result(
            *await self._send_counted(
                "POST",
                "/segment",
                params=_query(output, fmt, alpha, model),
                files={IMAGE_FIELD: (name, data, "application/octet-stream")},
            )
        )

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response, attempts = await self._send_counted(method, url, **kwargs)
        if response.status_code != 200:
            _result(response, attempts)  # raises with the server's detail
        return response

    async def _send_counted(
        self, method: str, url: str, **kwargs: Any
    ) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt > self.retry.retries:
                    raise SegmentationError(
                        f"cannot reach {self._http.base_url} after {attempt} attempts: "
                        f"{type(exc).__name__}: {exc}",
                        None,
                        attempt,
                    ) from exc
                reason, retry_after = type(exc).__name__, None
            else:
                if response.status_code not in RETRY_STATUSES or attempt > self.retry.retries:
                    return response, attempt
                reason = f"HTTP {response.status_code}"
                retry_after = parse_retry_after(response.headers.get(RETRY_AFTER))
            wait = self.retry.delay(attempt, retry_after)
            if self.on_retry is not None:
                self.on_retry(attempt, reason, wait)
            await asyncio.sleep(wait)


def _blocking(
    method: Callable[Concatenate[AsyncSegmentationClient, P], Awaitable[T]],
) -> Callable[Concatenate[SegmentationClient, P], T]:
    """The blocking form of an ``AsyncSegmentationClient`` method: one signature, one doc."""

    @functools.wraps(method)
    def blocking(self: SegmentationClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run_until_complete(method(self._client, *args, **kwargs))

    return blocking


class SegmentationClient:
    """The same client, blocking, for scripts and notebooks; ``options`` are those of
    :class:`AsyncSegmentationClient` (``timeout_s``, ``retry``, ``on_retry``, ...).

    >>> with SegmentationClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     Path("dog.png").write_bytes(client.segment("dog.jpg").content)
    """

    def __init__(
        self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, **options: Any
    ) -> None:
        self._loop = asyncio.new_event_loop()
        # httpx binds its connection pool to the loop it first runs on: this private one.
        self._client = AsyncSegmentationClient(base_url, api_key, **options)

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()

    model = _blocking(AsyncSegmentationClient.model)
    models = _blocking(AsyncSegmentationClient.models)
    segment = _blocking(AsyncSegmentationClient.segment)
