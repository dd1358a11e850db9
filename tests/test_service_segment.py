"""POST /segment and friends over real HTTP: label maps equal the model's own prediction pixel
for pixel, for real photos, odd sizes, EXIF-rotated JPEGs, every accepted format and mode."""

from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from fcn_core.weights import LoadedWeights
from tests.conftest import (
    LiveServer,
    ServeFactory,
    demo_photos,
    encode,
    labels_from_png,
    png_16bit_rgb,
    predict,
    random_rgb,
)

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the photos")


def post_raw(live: LiveServer, data: bytes, content_type: str, **params: object) -> httpx.Response:
    return live.client.post(
        "/segment", content=data, headers={"Content-Type": content_type}, params=params
    )


def post_file(live: LiveServer, data: bytes, name: str = "x", **params: object) -> httpx.Response:
    return live.client.post("/segment", files={"image": (name, data)}, params=params)


def assert_labels(response: httpx.Response, expected: np.ndarray, reference: LoadedWeights) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    labels, img = labels_from_png(response.content)
    assert labels.shape == expected.shape
    mismatched = int((labels != expected).sum())
    assert mismatched == 0, f"{mismatched} of {expected.size} pixels differ from the model"
    palette = np.asarray(img.getpalette()[: 3 * reference.meta.num_classes]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, np.asarray(reference.meta.palette))


def test_demo_photos_match_the_model_pixel_for_pixel(
    live: LiveServer, reference: LoadedWeights
) -> None:
    for path in demo_photos():
        data = path.read_bytes()
        rgb = np.asarray(Image.open(path).convert("RGB"))
        expected = predict(reference, rgb)
        assert len(np.unique(expected)) > 1, "the test model must predict several classes"
        assert_labels(post_raw(live, data, "image/jpeg"), expected, reference)


def test_scikit_image_photos_as_multipart(live: LiveServer, reference: LoadedWeights) -> None:
    for name, rgb in (("chelsea", skimage_data.chelsea()), ("astronaut", skimage_data.astronaut())):
        response = post_file(live, encode(Image.fromarray(rgb), "PNG"), f"{name}.png")
        assert_labels(response, predict(reference, rgb), reference)


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (31, 97), (200, 201), (33, 32), (5, 300)])
def test_odd_sizes_are_exact(
    live: LiveServer, reference: LoadedWeights, size: tuple[int, int]
) -> None:
    h, w = size
    rgb = random_rgb(h, w, seed=h * 1000 + w)
    response = post_raw(live, encode(Image.fromarray(rgb), "PNG"), "image/png")
    assert_labels(response, predict(reference, rgb), reference)


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(
    live: LiveServer, reference: LoadedWeights, orientation: int, turns: int
) -> None:
    stored = skimage_data.chelsea()[:90, :130]  # 130 wide, 90 high as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    # The pixels as stored, decoded by Pillow, then turned as the tag says (np.rot90 turns
    # counter-clockwise): 6 = rotate 90 clockwise to display, 8 = 90 counter-clockwise.
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    shown = np.ascontiguousarray(np.rot90(decoded, k=turns))
    response = post_raw(live, data, "image/jpeg")
    assert_labels(response, predict(reference, shown), reference)
    if orientation in (6, 8):
        assert labels_from_png(response.content)[0].shape == (130, 90)


def lossless_formats(rgb: np.ndarray) -> dict[str, tuple[bytes, str]]:
    img = Image.fromarray(rgb)
    return {
        "png": (encode(img, "PNG"), "image/png"),
        "webp": (encode(img, "WEBP", lossless=True), "image/webp"),
        "bmp": (encode(img, "BMP"), "image/bmp"),
        "tiff": (encode(img, "TIFF", compression="tiff_lzw"), "image/tiff"),
    }


def test_every_format_is_decoded_exactly(live: LiveServer, reference: LoadedWeights) -> None:
    rgb = random_rgb(70, 90, seed=3)
    expected = predict(reference, rgb)
    for fmt, (data, content_type) in lossless_formats(rgb).items():
        response = post_raw(live, data, content_type)
        assert response.status_code == 200, f"{fmt}: {response.text}"
        assert_labels(response, expected, reference)
    jpeg = encode(Image.fromarray(rgb), "JPEG", quality=90)
    jpeg_rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert_labels(post_raw(live, jpeg, "image/jpeg"), predict(reference, jpeg_rgb), reference)


def test_gif_uses_the_first_frame(live: LiveServer, reference: LoadedWeights) -> None:
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    frames = []
    for seed in (1, 2):
        index = random_rgb(48, 64, seed)[..., 0]
        frame = Image.fromarray(index)
        frame.putpalette(palette.ravel().tolist())
        frames.append((frame, palette[index]))
    buf = io.BytesIO()
    frames[0][0].save(buf, format="GIF", save_all=True, append_images=[frames[1][0]], duration=100)
    response = post_raw(live, buf.getvalue(), "image/gif")
    assert_labels(response, predict(reference, frames[0][1]), reference)
    first, second = predict(reference, frames[0][1]), predict(reference, frames[1][1])
    assert not np.array_equal(first, second), "the frames must differ for this test to mean much"


def test_colour_modes_are_converted(live: LiveServer, reference: LoadedWeights) -> None:
    rgb = random_rgb(40, 56, seed=7)
    grey = rgb[..., 1].copy()
    as_rgb = {"grey": np.repeat(grey[..., None], 3, axis=2)}
    cases: dict[str, tuple[bytes, np.ndarray]] = {
        "L png": (encode(Image.fromarray(grey), "PNG"), as_rgb["grey"]),
        "16-bit grey png": (
            encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
            as_rgb["grey"],
        ),
        "16-bit RGB png": (png_16bit_rgb(rgb.astype(np.uint16) * 257), rgb),
        "RGBA opaque": (
            encode(Image.fromarray(np.dstack([rgb, np.full(grey.shape, 255, np.uint8)])), "PNG"),
            rgb,
        ),
        "CMYK tiff": (encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb),
    }
    # Transparent pixels are shown on white.
    alpha = np.where(random_rgb(40, 56, seed=8)[..., 0] > 127, 255, 0).astype(np.uint8)
    on_white = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    cases["RGBA with holes"] = (encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), on_white)
    cases["LA with holes"] = (
        encode(Image.fromarray(np.dstack([grey, alpha])), "PNG"),
        np.where(alpha[..., None] == 255, as_rgb["grey"], 255).astype(np.uint8),
    )
    indexed = Image.fromarray(rgb).quantize(colors=64)
    pal = np.asarray(indexed.getpalette()[: 64 * 3], dtype=np.uint8).reshape(-1, 3)
    cases["palette png"] = (encode(indexed, "PNG"), pal[np.asarray(indexed)])
    idx = np.asarray(indexed)
    see_through = indexed.copy()
    see_through.info["transparency"] = int(idx[0, 0])
    cases["palette with transparent index"] = (
        encode(see_through, "PNG", transparency=int(idx[0, 0])),
        np.where((idx == idx[0, 0])[..., None], 255, pal[idx]).astype(np.uint8),
    )
    bilevel = grey > 127
    cases["1-bit png"] = (
        encode(Image.fromarray(bilevel), "PNG"),
        np.repeat(np.where(bilevel, 255, 0).astype(np.uint8)[..., None], 3, axis=2),
    )
    for name, (data, shown) in cases.items():
        response = post_raw(live, data, "image/png")
        assert response.status_code == 200, f"{name}: {response.text}"
        labels, _ = labels_from_png(response.content)
        expected = predict(reference, shown)
        assert np.array_equal(labels, expected), f"{name}: labels differ from the model's"


def test_overlay_blends_the_photo_with_the_class_colours(
    live: LiveServer, reference: LoadedWeights
) -> None:
    rgb = skimage_data.chelsea()[::3, ::3]
    data = encode(Image.fromarray(rgb), "PNG")
    labels = predict(reference, rgb)
    colours = np.asarray(reference.meta.palette, dtype=np.float64)[labels]
    for alpha in (0.0, 0.4, 1.0):
        response = post_raw(live, data, "image/png", output="overlay", alpha=alpha)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int32)
        want = np.rint((1 - alpha) * rgb + alpha * colours).astype(np.int32)
        assert got.shape == rgb.shape
        assert np.abs(got - want).max() <= 1, f"alpha {alpha}"
    response = post_raw(live, data, "image/png", output="overlay", format="jpeg", alpha=0.5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    jpeg = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float64)
    want = 0.5 * rgb + 0.5 * colours
    assert jpeg.shape == rgb.shape
    assert np.abs(jpeg - want).mean() < 6  # JPEG is lossy; a wrong blend is off by tens


def test_json_output(live: LiveServer, reference: LoadedWeights) -> None:
    rgb = random_rgb(61, 83, seed=11)
    expected = predict(reference, rgb)
    response = post_file(live, encode(Image.fromarray(rgb), "PNG"), output="json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (83, 61)
    counts = np.bincount(expected.ravel(), minlength=reference.meta.num_classes)
    got = {c["index"]: c for c in body["classes"]}
    assert set(got) == {int(i) for i in np.flatnonzero(counts)}
    for i, c in got.items():
        assert c["name"] == reference.meta.class_names[i]
        assert c["pixels"] == counts[i]
        assert c["fraction"] == pytest.approx(counts[i] / expected.size)
    pixels = [c["pixels"] for c in body["classes"]]
    assert pixels == sorted(pixels, reverse=True)
    decoded, _ = labels_from_png(base64.b64decode(body["labels_png_base64"]))
    np.testing.assert_array_equal(decoded, expected)


def test_batch_answers_in_order(live: LiveServer, reference: LoadedWeights) -> None:
    images = [random_rgb(h, w, seed=h + w) for h, w in ((40, 50), (90, 33), (40, 50), (7, 130))]
    files = [
        ("images", (f"{i}.png", encode(Image.fromarray(im), "PNG"))) for i, im in enumerate(images)
    ]
    response = live.client.post("/segment/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(images)
    for rgb, result in zip(images, results, strict=True):
        assert (result["height"], result["width"]) == rgb.shape[:2]
        decoded, _ = labels_from_png(base64.b64decode(result["labels_png_base64"]))
        np.testing.assert_array_equal(decoded, predict(reference, rgb))


def test_large_images_are_downscaled_and_scaled_back(
    serve: ServeFactory, reference: LoadedWeights
) -> None:
    live = serve(max_side=64)
    rgb = random_rgb(100, 150, seed=5)
    response = post_raw(live, encode(Image.fromarray(rgb), "PNG"), "image/png")
    # As documented: bilinear to a longer side of 64, the model, nearest back to 150 x 100.
    small = np.asarray(Image.fromarray(rgb).resize((64, 43), Image.Resampling.BILINEAR))
    low = predict(reference, small)
    expected = np.asarray(Image.fromarray(low).resize((150, 100), Image.Resampling.NEAREST))
    assert_labels(response, expected, reference)


def test_model_info(live: LiveServer, reference: LoadedWeights) -> None:
    body = live.client.get("/v1/model").json()
    meta = reference.meta
    assert body["sha256"] == meta.sha256 and len(body["sha256"]) == 64
    assert (body["arch"], body["backbone"]) == ("fcn8s", "efficientnet_lite0")
    assert body["class_names"] == meta.class_names
    assert body["palette"] == meta.palette
    assert body["num_classes"] == 11
    assert body["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB"}
    assert (body["device"], body["precision"], body["backend"]) == ("cpu", "fp32", "torch")
    info = live.metric(
        "fcn_model_info",
        arch="fcn8s",
        backbone="efficientnet_lite0",
        weights_hash=meta.sha256,
        device="cpu",
        precision="fp32",
        backend="torch",
    )
    assert info == 1


def test_health_readiness_and_docs(live: LiveServer) -> None:
    assert live.client.get("/healthz").json() == {"status": "ok"}
    assert live.client.get("/readyz").json() == {"ready": True, "detail": ""}
    docs = live.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = live.client.get("/openapi.json").json()["paths"]
    for path in ("/segment", "/segment/batch", "/v1/model", "/healthz", "/readyz", "/metrics"):
        assert path in paths


def test_request_id_and_server_timing(live: LiveServer) -> None:
    data = encode(Image.fromarray(random_rgb(30, 30)), "PNG")
    response = post_raw(live, data, "image/png")
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    timing = dict(
        (part.split(";dur=")[0].strip(), float(part.split(";dur=")[1]))
        for part in response.headers["server-timing"].split(",")
    )
    assert {"decode", "queue", "inference", "encode", "total"} <= set(timing)
    assert all(v >= 0 for v in timing.values())
    assert timing["total"] >= timing["inference"] > 0
    sent = live.client.post(
        "/segment",
        content=data,
        headers={"Content-Type": "image/png", "X-Request-ID": "client-42.a"},
    )
    assert sent.headers["x-request-id"] == "client-42.a"
    # Errors carry both headers too, and the id in the body.
    bad = live.client.post(
        "/segment", content=b"", headers={"Content-Type": "image/png", "X-Request-ID": "e-1"}
    )
    assert bad.status_code == 400
    assert bad.headers["x-request-id"] == "e-1" == bad.json()["request_id"]
    assert "total;dur=" in bad.headers["server-timing"]
    # An id unsafe to log is replaced, not echoed.
    odd = live.client.get("/healthz", headers={"X-Request-ID": "a b<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])


def test_demo_page_and_static_files(live: LiveServer) -> None:
    from service.routes.ui import INDEX_HTML

    page = live.client.get("/")
    if INDEX_HTML.is_file():
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.content == INDEX_HTML.read_bytes()
    else:
        assert page.status_code == 404
        assert "index.html" in page.json()["detail"]
    missing = live.client.get("/static/no-such-file.js")
    assert missing.status_code == 404
    assert missing.json()["detail"]


def test_trivial_model_serves_without_weights(serve: ServeFactory) -> None:
    live = serve(trivial_model=True, weights="/nonexistent.safetensors")
    assert live.client.get("/v1/model").json()["arch"] == "trivial"
    rgb = random_rgb(33, 47)
    response = post_raw(live, encode(Image.fromarray(rgb), "PNG"), "image/png")
    assert response.status_code == 200
    assert labels_from_png(response.content)[0].shape == (33, 47)


def test_multipart_file_over_a_megabyte(live: LiveServer, reference: LoadedWeights) -> None:
    # Starlette's multipart parser spools files over 1 MB to disk and caps text parts at 1 MB;
    # a plain BMP photo passes that size easily and must still be read whole.
    rgb = random_rgb(600, 700, seed=9)
    data = encode(Image.fromarray(rgb), "BMP")
    assert len(data) > 1024 * 1024
    assert_labels(post_file(live, data, "big.bmp"), predict(reference, rgb), reference)
