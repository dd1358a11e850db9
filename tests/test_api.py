"""The routes driven in process: the real app, its lifespan and model, no socket.

``httpx.ASGITransport`` calls the app directly, so these cover what a route answers (status,
headers, JSON bodies, metrics) quickly and without a port. What needs a real connection
(disconnects, a 413 while the body still streams, shutdown) stays in the live-server tests.
ASGITransport does not run the lifespan; ``running`` enters it as uvicorn would.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fcn_client.wire import REQUEST_ID, RETRY_AFTER, SERVER_TIMING, SERVER_TIMING_STAGES
from fcn_core.weights import LoadedWeights, WeightsMetadata
from service.app import create_app
from service.schemas import ModelInfo
from tests.conftest import (
    demo_photos,
    encode,
    labels_from_png,
    predict,
    random_rgb,
    test_settings,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def running(app: FastAPI, lifespan: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fcn.test") as client:
        if not lifespan:
            yield client
            return
        async with app.router.lifespan_context(app):
            yield client


@pytest.fixture(scope="module")
async def client(service_weights: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One started app shared by the module's tests."""
    async with running(create_app(test_settings(service_weights))) as c:
        yield c


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus exposition whose labels include these."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def rejected(client: httpx.AsyncClient, reason: str) -> float:
    text = (await client.get("/metrics")).text
    return metric(text, "fcn_requests_rejected_total", reason=reason)


def assert_error(response: httpx.Response, status: int, words: str = "") -> dict[str, Any]:
    """An ``ErrorBody``: the status, a JSON ``detail`` mentioning ``words``, the request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail", "request_id"}
    assert body["request_id"] == response.headers[REQUEST_ID]
    assert words.lower() in body["detail"].lower(), body["detail"]
    return body


def png(h: int = 24, w: int = 24, seed: int = 0) -> bytes:
    return encode(Image.fromarray(random_rgb(h, w, seed)), "PNG")


# -- segmenting -----------------------------------------------------------------------------


async def test_a_real_photo_is_segmented_like_the_model_does(
    client: httpx.AsyncClient, reference: LoadedWeights
) -> None:
    path = demo_photos()[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    response = await client.post(
        "/segment",
        content=path.read_bytes(),
        headers={"Content-Type": "image/jpeg", REQUEST_ID: "photo-1"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    labels, _ = labels_from_png(response.content)
    np.testing.assert_array_equal(labels, predict(reference, rgb))
    assert response.headers[REQUEST_ID] == "photo-1"
    timing = [part.split(";")[0].strip() for part in response.headers[SERVER_TIMING].split(",")]
    assert timing == [*SERVER_TIMING_STAGES, "total"]  # every stage ran, in request order


async def test_outputs_of_one_photo(client: httpx.AsyncClient, reference: LoadedWeights) -> None:
    path = demo_photos()[-1]
    data = path.read_bytes()
    rgb = np.asarray(Image.open(path).convert("RGB"))
    expected = predict(reference, rgb)
    files = {"image": (path.name, data, "image/jpeg")}
    body = (await client.post("/segment", files=files, params={"output": "json"})).json()
    assert (body["width"], body["height"]) == (rgb.shape[1], rgb.shape[0])
    assert sum(c["pixels"] for c in body["classes"]) == expected.size
    assert {c["index"] for c in body["classes"]} == set(np.unique(expected).tolist())
    decoded, _ = labels_from_png(base64.b64decode(body["labels_png_base64"]))
    np.testing.assert_array_equal(decoded, expected)
    overlay = await client.post(
        "/segment", files=files, params={"output": "overlay", "format": "jpeg", "alpha": 0.3}
    )
    assert overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.content)).size == (rgb.shape[1], rgb.shape[0])


async def test_batch_answers_each_photo_in_order(
    client: httpx.AsyncClient, reference: LoadedWeights
) -> None:
    photos = demo_photos()[:3]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    response = await client.post("/segment/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(photos)
    for path, result in zip(photos, results, strict=True):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        decoded, _ = labels_from_png(base64.b64decode(result["labels_png_base64"]))
        np.testing.assert_array_equal(decoded, predict(reference, rgb))


# -- refusals -------------------------------------------------------------------------------


async def test_refusals_are_json_with_the_request_id(client: httpx.AsyncClient) -> None:
    post = client.post
    raw = {"Content-Type": "image/png"}
    two = [("images", ("a", png())), ("images", ("b", b"junk"))]
    before = await rejected(client, "bad_input")
    cases = [
        (await post("/segment", content=b"", headers=raw), 400, "empty"),
        (
            await post("/segment", content=png(), headers={"Content-Type": "text/plain"}),
            415,
            "type",
        ),
        (await post("/segment", content=b"GIF? no", headers=raw), 415, "not a recognised"),
        (await post("/segment", files={"picture": ("a.png", png())}), 422, "'image' is missing"),
        (
            await post("/segment", content=png(), headers=raw, params={"output": "svg"}),
            422,
            "output",
        ),
        (
            await post("/segment", content=png(), headers={**raw, "Content-Length": "x"}),
            400,
            "length",
        ),
        (await post("/segment/batch", files=two), 415, "images[1]"),
    ]
    for response, status, words in cases:
        assert_error(response, status, words)
    assert await rejected(client, "bad_input") - before == len(cases)


async def test_unknown_paths_are_json_404s_not_counted(client: httpx.AsyncClient) -> None:
    before = await rejected(client, "bad_input")
    assert_error(await client.get("/no-such-route"), 404)
    assert_error(await client.get("/segment"), 405)
    assert await rejected(client, "bad_input") == before


async def test_api_key(service_weights: Path) -> None:
    app = create_app(test_settings(service_weights, api_key="s3cret"))
    async with running(app) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            response = await client.get("/v1/model", headers=headers)
            assert_error(response, 401, "api key")
            assert response.headers["www-authenticate"] == "Bearer"
        bad_query = await client.post("/segment", params={"output": "svg"})
        assert_error(bad_query, 401)  # the key is checked before anything else
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(open_path)).status_code == 200
        ok = await client.get("/v1/model", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert await rejected(client, "unauthorized") == 4


async def test_not_ready_before_the_lifespan_starts(
    service_weights: Path, reference: LoadedWeights
) -> None:
    app = create_app(test_settings(service_weights), model=reference.model, meta=reference.meta)
    async with running(app, lifespan=False) as client:
        readiness = await client.get("/readyz")
        assert readiness.status_code == 503
        assert readiness.json() == {"ready": False, "detail": "starting"}
        refused = await client.post(
            "/segment", content=png(), headers={"Content-Type": "image/png"}
        )
        assert_error(refused, 503, "not ready: starting")
        assert refused.headers[RETRY_AFTER] == "5"
        assert await rejected(client, "shutting_down") == 1


# -- model, readiness, metrics --------------------------------------------------------------


async def test_model_info(client: httpx.AsyncClient, reference: LoadedWeights) -> None:
    body = (await client.get("/v1/model")).json()
    meta = reference.meta
    assert body["sha256"] == meta.sha256
    assert body["class_names"] == meta.class_names and body["num_classes"] == meta.num_classes
    assert body["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB"}
    assert (body["evaluations"], body["teacher"]) == ({}, "")
    assert (body["device"], body["precision"]) == ("cpu", "fp32")
    assert "at_once" not in body


async def test_model_info_serves_evaluations_and_teacher(
    service_weights: Path, reference: LoadedWeights
) -> None:
    evaluations = {"test": {"mean_iu": 0.41, "pixel_accuracy": 0.83}}
    teacher = "fcn8s-vgg16-camvid.safetensors (sha256 0123abcd, Apache-2.0)"
    meta = dataclasses.replace(reference.meta, evaluations=evaluations, teacher=teacher)
    app = create_app(test_settings(service_weights), model=reference.model, meta=meta)
    async with running(app) as client:
        body = (await client.get("/v1/model")).json()
    assert body["evaluations"] == evaluations
    assert body["teacher"] == teacher


def test_model_info_lists_every_served_metadata_field() -> None:
    served = {f.name for f in dataclasses.fields(WeightsMetadata)} - {"at_once"}
    how = {"num_classes", "device", "precision", "backend", "name", "version", "ready"}
    assert served | how | {"memory_bytes"} == set(ModelInfo.model_fields)


async def test_readiness_health_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "detail": ""})
    before = (await client.get("/metrics")).text
    ok = await client.post("/segment", content=png(), headers={"Content-Type": "image/png"})
    assert ok.status_code == 200
    scraped = await client.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    after = scraped.text
    for name, labels in (
        ("fcn_images_total", {}),
        ("fcn_request_duration_seconds_count", {"endpoint": "/segment", "status": "200"}),
        ("fcn_batch_size_count", {}),
    ):
        assert metric(after, name, **labels) - metric(before, name, **labels) == 1, name
    assert metric(after, "fcn_model_info", arch="fcn8s", device="cpu", backend="torch") == 1
