"""Closed-loop load generator: keeps N requests in flight against a URL, with real JPEGs.

Closed loop (each of N clients sends its next request when its previous answer arrived) is
how a batching server is meant to be measured: throughput at a given concurrency, with the
latency that concurrency costs. Each run is bounded by a request count and by seconds,
whichever comes first, and the mean batch size comes from the delta of the server's
``fcn_batch_size`` histogram over the run, so it covers exactly these requests.

    python -m bench.http http://127.0.0.1:8000/v1/segment --concurrency 1,4,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from fcn_client.sdk import parse_server_timing

from .images import DEFAULT_DATA_ROOT, WORKLOADS, workload_jpegs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BATCH_METRIC = "fcn_batch_size"


class Upload(BaseModel):
    """How the image travels: the raw body, a multipart form field of this name, or a JSON
    field holding it in base64 (LitServe's documented way: its workers are processes, and a
    multipart upload cannot be handed to them)."""

    field: str | None = None  # None: raw body with Content-Type image/jpeg
    json_base64: bool = False  # with field: {field: base64 of the image} as a JSON body
    headers: dict[str, str] = {}


class LoadResult(BaseModel):
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]  # HTTP status or exception class -> count
    seconds: float
    throughput_rps: float
    latency_ms_p50: float | None
    latency_ms_p90: float | None
    latency_ms_p99: float | None
    latency_ms_mean: float | None
    mean_batch_size: float | None  # None when the server exposes no fcn_batch_size
    server_timing_ms_p50: dict[str, float] = {}  # Server-Timing stage -> median, when sent


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def batch_histogram(text: str) -> tuple[float, float] | None:
    """(sum, count) of the ``fcn_batch_size`` histogram over all its label sets."""
    total = count = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_METRIC:
            continue
        for sample in family.samples:
            if sample.name == f"{BATCH_METRIC}_sum":
                total += sample.value
                found = True
            elif sample.name == f"{BATCH_METRIC}_count":
                count += sample.value
    return (total, count) if found else None


async def scrape_batches(
    client: httpx.AsyncClient, metrics_url: str | None
) -> tuple[float, float] | None:
    if not metrics_url:
        return None
    try:
        r = await client.get(metrics_url)
    except httpx.HTTPError:
        return None
    return batch_histogram(r.text) if r.status_code == 200 else None


def build_request(
    client: httpx.AsyncClient, url: str, payload: bytes, upload: Upload
) -> httpx.Request:
    if upload.field is None:
        headers = {"Content-Type": "image/jpeg", **upload.headers}
        return client.build_request("POST", url, content=payload, headers=headers)
    if upload.json_base64:
        body = {upload.field: base64.b64encode(payload).decode("ascii")}
        return client.build_request("POST", url, json=body, headers=upload.headers)
    files = {upload.field: ("image.jpg", payload, "image/jpeg")}
    return client.build_request("POST", url, files=files, headers=upload.headers)


async def closed_loop(
    url: str,
    payloads: Sequence[bytes],
    concurrency: int,
    *,
    max_requests: int,
    max_seconds: float,
    warmup_requests: int = 0,
    metrics_url: str | None = None,
    upload: Upload | None = None,
    timeout_s: float = 60.0,
) -> LoadResult:
    """Keep ``concurrency`` requests in flight until ``max_requests`` were sent or
    ``max_seconds`` passed; a request counts as OK only if it is a 200 carrying a PNG."""
    if concurrency < 1 or max_requests < 1 or not payloads:
        raise ValueError("need concurrency >= 1, max_requests >= 1 and at least one payload")
    upload = upload or Upload()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        cycle = itertools.cycle(payloads)

        stages: dict[str, list[float]] = {}

        async def one(payload: bytes) -> tuple[str, float]:
            t0 = time.perf_counter()
            try:
                r = await client.send(build_request(client, url, payload, upload))
                body = r.content
            except httpx.HTTPError as exc:
                return type(exc).__name__, time.perf_counter() - t0
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                return str(r.status_code), dt
            if not body.startswith(PNG_SIGNATURE):
                return "not-png", dt
            for stage, ms in parse_server_timing(r.headers.get("server-timing")).items():
                stages.setdefault(stage, []).append(ms)
            return "ok", dt

        warm = [one(next(cycle)) for _ in range(warmup_requests)]
        for i in range(0, len(warm), concurrency):
            await asyncio.gather(*warm[i : i + concurrency])

        stages.clear()  # warm-up requests do not count
        before = await scrape_batches(client, metrics_url)
        outcomes: Counter[str] = Counter()
        latencies: list[float] = []
        sent = 0
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                outcome, dt = await one(next(cycle))
                outcomes[outcome] += 1
                if outcome == "ok":
                    latencies.append(dt)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        after = await scrape_batches(client, metrics_url)

    latencies.sort()
    mean_batch = None
    if before is not None and after is not None and after[1] > before[1]:
        mean_batch = round((after[0] - before[0]) / (after[1] - before[1]), 3)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1e3, 2)

    has = bool(latencies)
    ok = outcomes.pop("ok", 0)
    return LoadResult(
        concurrency=concurrency,
        requests=sent,
        ok=ok,
        errors=dict(outcomes),
        seconds=round(seconds, 3),
        throughput_rps=round(ok / seconds, 3),
        latency_ms_p50=ms(percentile(latencies, 50)) if has else None,
        latency_ms_p90=ms(percentile(latencies, 90)) if has else None,
        latency_ms_p99=ms(percentile(latencies, 99)) if has else None,
        latency_ms_mean=ms(sum(latencies) / len(latencies)) if has else None,
        mean_batch_size=mean_batch,
        server_timing_ms_p50={k: round(statistics.median(v), 2) for k, v in stages.items()},
    )


def sweep(
    url: str,
    payloads: Sequence[bytes],
    concurrencies: Sequence[int],
    *,
    max_requests: int,
    max_seconds: float,
    metrics_url: str | None = None,
    upload: Upload | None = None,
) -> list[LoadResult]:
    """One closed-loop run per concurrency, each warmed with ``concurrency`` requests."""
    results = []
    for c in concurrencies:
        run = closed_loop(
            url,
            payloads,
            c,
            max_requests=max_requests,
            max_seconds=max_seconds,
            warmup_requests=c,
            metrics_url=metrics_url,
            upload=upload,
        )
        results.append(asyncio.run(run))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the segmentation endpoint, e.g. http://127.0.0.1:8000/v1/segment")
    p.add_argument("--metrics-url", help="Prometheus /metrics of the server, for batch sizes")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="camvid")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=200, help="at most, per concurrency")
    p.add_argument("--seconds", type=float, default=30.0, help="at most, per concurrency")
    p.add_argument("--field", help="send multipart with this field name instead of a raw body")
    a = p.parse_args(argv)
    payloads = workload_jpegs(a.workload, 8, a.data_root)
    levels = [int(c) for c in a.concurrency.split(",")]
    for r in sweep(
        a.url,
        payloads,
        levels,
        max_requests=a.requests,
        max_seconds=a.seconds,
        metrics_url=a.metrics_url,
        upload=Upload(field=a.field),
    ):
        print(r.model_dump_json())


if __name__ == "__main__":
    main()
