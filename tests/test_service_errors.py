"""Every refusal over real HTTP: the right status, a JSON ``detail``, no stack trace, the
rejection counted; and overload, deadlines, disconnects and OOM never lose other work."""

from __future__ import annotations

import gc
import logging
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core.weights import LoadedWeights, load_weights
from tests.conftest import (
    InstrumentedModel,
    LiveServer,
    ServeFactory,
    encode,
    labels_from_png,
    png_header_only,
    predict,
    random_rgb,
)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body


def png(h: int = 24, w: int = 24, seed: int = 0) -> bytes:
    return encode(Image.fromarray(random_rgb(h, w, seed)), "PNG")


def test_bad_input_gets_4xx_with_a_json_detail(live: LiveServer) -> None:
    c = live.client
    before = live.metric("fcn_requests_rejected_total", reason="bad_input")
    raw = {"Content-Type": "image/png"}
    jpeg = encode(Image.fromarray(random_rgb(64, 64)), "JPEG")
    cases = [
        (c.post("/segment", content=b"", headers=raw), 400, "empty"),
        (c.post("/segment", content=b"hello, not an image", headers=raw), 415, "not a recognised"),
        (
            c.post("/segment", content=png(), headers={"Content-Type": "text/plain"}),
            415,
            "content-type",
        ),
        (c.post("/segment", content=png()), 415, "multipart field 'image'"),
        (c.post("/segment", content=jpeg[: len(jpeg) // 2], headers=raw), 422, "truncated"),
        (c.post("/segment", content=png(64, 64)[:120], headers=raw), 422, "png"),
        (
            c.post("/segment", content=encode(Image.new("RGB", (8, 8)), "ICO"), headers=raw),
            415,
            "ICO",
        ),
        (
            c.post("/segment", content=encode(Image.new("RGB", (8, 8)), "PPM"), headers=raw),
            415,
            "not accepted",
        ),
        (c.post("/segment", files={"picture": ("a.png", png())}), 422, "'image' is missing"),
        (
            c.post("/segment", data={"image": "not a file"}, files={"other": ("a", b"x")}),
            422,
            "must be a file",
        ),
        (
            c.post(
                "/segment",
                content=b"--xyz\r\nContent-Disposition: form-data; name=image\r\n\r\nbroken",
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            ),
            None,
            "",
        ),
        (c.post("/segment", content=png(), headers=raw, params={"output": "svg"}), 422, "output"),
        (c.post("/segment", content=png(), headers=raw, params={"alpha": 2}), 422, "alpha"),
        (c.post("/segment/batch", content=png(), headers=raw), 415, "'images'"),
        (
            c.post("/segment/batch", files=[("images", ("a", png())), ("images", ("b", b"junk"))]),
            415,
            "images[1]",
        ),
    ]
    counted = 0
    for response, status, word in cases:
        if status is None:  # a multipart body without its closing boundary
            assert response.status_code in (400, 422), response.text
            assert_error(response, response.status_code)
        else:
            assert_error(response, status, word)
        counted += 1
    assert live.metric("fcn_requests_rejected_total", reason="bad_input") - before == counted
    # The server still works after all that.
    assert c.post("/segment", content=png(), headers=raw).status_code == 200


def test_body_limit_413_from_content_length(serve: ServeFactory) -> None:
    live = serve(max_body_bytes=50_000)
    big = encode(Image.fromarray(random_rgb(300, 300)), "BMP")  # 270 kB
    assert len(big) > 50_000
    assert_error(
        live.client.post("/segment", content=big, headers={"Content-Type": "image/bmp"}),
        413,
        "limit",
    )
    batch = [
        ("images", (str(i), encode(Image.fromarray(random_rgb(90, 90, i)), "BMP")))
        for i in range(4)
    ]
    assert_error(live.client.post("/segment/batch", files=batch), 413, "limit")
    assert live.metric("fcn_requests_rejected_total", reason="too_large") == 2


def test_body_limit_413_while_streaming(serve: ServeFactory) -> None:
    """A chunked upload with no declared length is refused once it passes the limit, while the
    client is still sending: the server never holds the whole body."""
    live = serve(max_body_bytes=100_000)
    chunk = b"\xff" * 16_384
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\nX-Request-ID: stream-1\r\n\r\n"
        )
        sent = 0
        answered = False
        while sent < 50_000_000:
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                answered = True
                break
            sent += len(chunk)
            time.sleep(0.001)
        assert answered, "the server never answered while the body kept coming"
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"stream-1" in response and b"limit" in response
    assert sent < 1_000_000, f"{sent} bytes went out before the 413"


def test_pixel_bombs_413_without_decoding(serve: ServeFactory) -> None:
    live = serve(max_image_pixels=100_000)
    # The headers claim 12000 x 12000 and 30000 x 30000 pixels over a 1 kB payload: decoding
    # would take gigabytes and then fail as truncated (422); the header check answers 413.
    for side in (12_000, 30_000):
        bomb = png_header_only(side, side)
        start = time.perf_counter()
        body = assert_error(
            live.client.post("/segment", content=bomb, headers={"Content-Type": "image/png"}),
            413,
            "pixels",
        )
        assert f"{side}x{side}" in body["detail"] or f"{side * side}" in body["detail"]
        assert time.perf_counter() - start < 2
    real = encode(Image.fromarray(random_rgb(400, 400)), "PNG")  # 160 000 px > 100 000
    assert_error(live.client.post("/segment", files={"image": ("a.png", real)}), 413, "limit")
    gif = encode(Image.new("P", (1000, 1000)), "GIF")
    assert_error(
        live.client.post("/segment", content=gif, headers={"Content-Type": "image/gif"}), 413
    )
    assert live.metric("fcn_requests_rejected_total", reason="too_large") == 4


def test_api_key(serve: ServeFactory) -> None:
    live = serve(api_key="s3cret")
    c = live.client
    data = png()
    raw = {"Content-Type": "image/png"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = c.post("/segment", content=data, headers=raw | headers)
        assert_error(response, 401, "api key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert_error(c.get("/v1/model"), 401)
    assert_error(c.post("/segment/batch", files=[("images", ("a", data))]), 401)
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert c.get(open_path).status_code == 200
    ok = c.post("/segment", content=data, headers=raw | {"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert c.get("/v1/model", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert live.metric("fcn_requests_rejected_total", reason="unauthorized") == 5


def post_png(live: LiveServer, data: bytes) -> httpx.Response:
    return live.client.post("/segment", content=data, headers={"Content-Type": "image/png"})


def test_overload_answers_503_with_retry_after(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=0.6)
    live = serve(model=model, meta=reference.meta, max_batch_size=1, max_queue_size=2)
    images = [random_rgb(32, 32, seed=i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda im: post_png(live, encode(Image.fromarray(im), "PNG")), images)
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for rgb, response in zip(images, responses, strict=True):
        if response.status_code == 503:
            assert_error(response, 503, "queue is full")
            assert int(response.headers["retry-after"]) >= 1
        else:
            np.testing.assert_array_equal(
                labels_from_png(response.content)[0], predict(reference, rgb)
            )
    assert live.metric("fcn_requests_rejected_total", reason="queue_full") == statuses.count(503)
    assert model.images_computed == statuses.count(200)


def test_deadline_drops_queued_requests_before_compute(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    # One image at a time, 1 s each, 1.5 s deadline: the first is answered, the second is
    # computed too late (504), the third is dropped from the queue before compute (504).
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=1.0)
    live = serve(model=model, meta=reference.meta, max_batch_size=1, request_timeout_s=1.5)
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda i: post_png(live, png(32, 32, i)), range(3)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 504, 504], statuses
    for response in responses:
        if response.status_code == 504:
            assert_error(response, 504, "deadline")
    time.sleep(1.2)  # let the late one finish
    assert model.images_computed == 2, model.calls
    assert live.metric("fcn_requests_rejected_total", reason="timeout") == 2


def abandon_while_queued(live: LiveServer, model: InstrumentedModel, clients: int) -> None:
    """Keeps the model busy with one request, queues ``clients`` more from real sockets behind
    it, closes those sockets while they wait, and waits until the server has noticed them all."""
    first: list[httpx.Response] = []
    busy = threading.Thread(target=lambda: first.append(post_png(live, png(32, 32, 1))))
    busy.start()
    assert model.entered.wait(10), "the first request never reached the model"
    before = live.metric("fcn_requests_rejected_total", reason="disconnected")
    socks = []
    for i in range(clients):
        data = png(32, 32, 2 + i)
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        socks.append(sock)
        sock.sendall(
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
    deadline = time.monotonic() + 5
    while live.metric("fcn_queue_depth") < clients and time.monotonic() < deadline:
        time.sleep(0.02)
    assert live.metric("fcn_queue_depth") == clients, "the requests should be queued"
    for sock in socks:  # closed while the requests wait behind the running batch
        sock.close()
    busy.join(10)
    assert first[0].status_code == 200
    deadline = time.monotonic() + 5
    while live.metric("fcn_requests_rejected_total", reason="disconnected") - before < clients:
        assert time.monotonic() < deadline, "the disconnects were never noticed"
        time.sleep(0.05)


def test_client_that_disconnects_is_not_computed(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=0.8)
    live = serve(model=model, meta=reference.meta, max_batch_size=1)
    abandon_while_queued(live, model, clients=1)
    time.sleep(0.3)
    assert model.images_computed == 1, model.calls
    assert live.metric("fcn_queue_depth") == 0


def test_clients_that_go_away_are_counted_not_logged(
    serve: ServeFactory,
    reference: LoadedWeights,
    service_weights: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A load generator that stops mid-run abandons queued requests: each is counted as
    ``disconnected`` and nothing is logged as an error (it once logged "_GatheringFuture
    exception was never retrieved" per request, from a cancelled ``asyncio.gather``)."""
    caplog.set_level(logging.WARNING)
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=0.8)
    live = serve(model=model, meta=reference.meta, max_batch_size=1)
    abandon_while_queued(live, model, clients=3)
    time.sleep(0.3)
    gc.collect()  # asyncio reports a lost exception when its future is collected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert model.images_computed == 1, model.calls
    assert live.metric("fcn_queue_depth") == 0


def test_out_of_memory_splits_the_batch_and_retries(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    # The model fails like a full GPU for batches above 2 and for images wider than 200.
    model = InstrumentedModel(load_weights(service_weights).model, oom_above=2, oom_wider_than=200)
    # One CPU worker, so the model itself gets the whole batch (as a GPU would).
    live = serve(
        model=model, meta=reference.meta, max_batch_size=8, max_queue_delay_ms=1000, cpu_workers=1
    )
    images = [random_rgb(40, 40, seed=i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda im: post_png(live, encode(Image.fromarray(im), "PNG")), images)
        )
    for rgb, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(labels_from_png(response.content)[0], predict(reference, rgb))
    failed = [n for n, ran in model.calls if not ran]
    assert failed and min(failed) > 2, model.calls
    assert all(n <= 2 for n, ran in model.calls if ran)
    assert model.images_computed == 6
    assert live.metric("fcn_oom_splits_total") >= 1
    assert live.metric("fcn_batch_size_sum") == 6  # only the passes that ran are counted
    # A single image that does not fit cannot be split: a clear 413, and the server lives on.
    wide = post_png(live, png(20, 260))
    assert_error(wide, 413, "memory")
    assert post_png(live, png(20, 20)).status_code == 200


class Broken(InstrumentedModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("secret internal detail")


def test_unexpected_errors_are_500_without_internals(
    serve: ServeFactory, reference: LoadedWeights
) -> None:
    live = serve(model=Broken(reference.model), meta=reference.meta)
    body = assert_error(post_png(live, png()), 500, "internal")
    assert "secret" not in body["detail"]
    assert live.client.get("/readyz").status_code == 200  # one bad batch does not kill the worker


def test_not_ready_while_shutting_down(serve: ServeFactory) -> None:
    live = serve()
    live.state.begin_shutdown()
    response = live.client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "detail": "shutting down"}
    refused = post_png(live, png())
    assert_error(refused, 503, "not ready")
    assert int(refused.headers["retry-after"]) >= 1
    assert live.client.get("/healthz").status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests(
    serve: ServeFactory, reference: LoadedWeights, service_weights: Path
) -> None:
    model = InstrumentedModel(load_weights(service_weights).model, delay_s=0.6)
    live = serve(model=model, meta=reference.meta, max_batch_size=1)
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(post_png, live, png(32, 32, i)) for i in range(2)]
        assert model.entered.wait(10)
        live.server.should_exit = True  # what SIGTERM does
        statuses = [f.result(timeout=20).status_code for f in pending]
    assert statuses == [200, 200]
    assert model.images_computed == 2
    with pytest.raises(httpx.TransportError):
        live.client.get("/healthz")
