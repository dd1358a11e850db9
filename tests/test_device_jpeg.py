"""JPEG decoding on the model's device (``FCN_DECODE_ON_DEVICE``), run here on the CPU device
with torchvision's decoder: the same pixels as Pillow, EXIF orientations included; header
checks that send everything else to the CPU path; and a broken JPEG that only the decoder can
find fails its own request alone, with the CPU path's 422."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from fcn_core.weights import LoadedWeights
from service import codecs
from service.app import create_app
from service.device_jpeg import decode_on_device
from tests.conftest import (
    LiveServer,
    demo_photos,
    encode,
    labels_from_png,
    predict,
    random_rgb,
    run_server,
    test_settings,
)

LIMITS = {"max_image_pixels": 50_000_000, "max_side": 2048}
CPU = torch.device("cpu")


def with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[codecs.ORIENTATION_TAG] = orientation
    return encode(Image.fromarray(rgb), "JPEG", quality=92, exif=exif.tobytes())


def broken_scan(data: bytes) -> bytes:
    """A JPEG whose header reads fine but whose entropy-coded data is garbage."""
    sos = data.index(b"\xff\xda")
    return data[: sos + 200] + b"\xff\x00" * 5 + b"\xff\xc4\x00\x03\x00" + data[sos + 300 :]


def decoded_on_device(data: bytes) -> np.ndarray:
    jpeg = codecs.probe_jpeg(data, **LIMITS)
    assert jpeg is not None
    (image,) = decode_on_device([jpeg], CPU)
    assert isinstance(image, torch.Tensor)
    assert image.shape == jpeg.shape
    return image.numpy()


def test_device_decoding_gives_pillows_pixels_for_real_photos() -> None:
    for path in demo_photos():
        data = path.read_bytes()
        expected = codecs.decode(data, **LIMITS).rgb
        assert np.array_equal(decoded_on_device(data), expected), path.name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_as_pillow_turns_it(orientation: int) -> None:
    stored = skimage_data.chelsea()[:90, :130]  # not symmetric in any direction
    data = with_orientation(stored, orientation)
    expected = codecs.decode(data, **LIMITS).rgb  # Pillow's exif_transpose
    assert np.array_equal(decoded_on_device(data), expected)


def test_everything_but_a_plain_jpeg_is_left_to_the_cpu() -> None:
    rgb = random_rgb(64, 80)
    jpeg = encode(Image.fromarray(rgb), "JPEG")
    assert codecs.probe_jpeg(jpeg, **LIMITS) is not None
    cmyk = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    refused = {
        "png": encode(Image.fromarray(rgb), "PNG"),
        "cmyk": cmyk,
        "truncated": jpeg[: len(jpeg) // 2],
        "garbage": b"not an image at all",
        "empty": b"",
    }
    for name, data in refused.items():
        assert codecs.probe_jpeg(data, **LIMITS) is None, name
    assert codecs.probe_jpeg(jpeg, max_image_pixels=64 * 80 - 1, max_side=2048) is None
    assert codecs.probe_jpeg(jpeg, max_image_pixels=10**6, max_side=79) is None  # downscale


def test_a_batch_with_a_broken_jpeg_decodes_the_others() -> None:
    photos = [p.read_bytes() for p in demo_photos()[:2]]
    jpegs = [codecs.probe_jpeg(d, **LIMITS) for d in (photos[0], broken_scan(photos[1]))]
    assert all(j is not None for j in jpegs), "the broken one must pass the header checks"
    good, bad = decode_on_device(jpegs, CPU)  # type: ignore[arg-type]
    assert isinstance(good, torch.Tensor)
    assert np.array_equal(good.numpy(), codecs.decode(photos[0], **LIMITS).rgb)
    assert isinstance(bad, codecs.CodecError) and bad.status == 422


@pytest.fixture(scope="module")
def device_decoding(service_weights: Path) -> Iterator[LiveServer]:
    settings = test_settings(service_weights, decode_on_device=True, max_queue_delay_ms=50)
    with run_server(create_app(settings)) as server:
        yield server


def post(live: LiveServer, data: bytes, output: str = "labels") -> httpx.Response:
    return live.client.post(
        "/segment", params={"output": output}, content=data, headers={"Content-Type": "image/jpeg"}
    )


def test_served_labels_of_device_decoded_photos_are_the_models(
    device_decoding: LiveServer, reference: LoadedWeights
) -> None:
    photos = [p.read_bytes() for p in demo_photos()]
    with ThreadPoolExecutor(len(photos)) as pool:  # concurrent, so they share batches
        responses = list(pool.map(lambda d: post(device_decoding, d), photos))
    for data, response in zip(photos, responses, strict=True):
        assert response.status_code == 200, response.text
        labels, _ = labels_from_png(response.content)
        assert np.array_equal(labels, predict(reference, codecs.decode(data, **LIMITS).rgb))
    assert device_decoding.metric("fcn_batch_size_count") < len(photos)  # batches of several
    # An overlay needs the pixels on the host: decoded on the CPU, still served.
    overlay = post(device_decoding, photos[0], output="overlay")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"


def test_a_broken_jpeg_gets_422_and_its_batch_mates_are_answered(
    device_decoding: LiveServer, reference: LoadedWeights
) -> None:
    photos = [p.read_bytes() for p in demo_photos()[:3]]
    payloads = [photos[0], broken_scan(photos[1]), photos[2]]
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda d: post(device_decoding, d), payloads))
    bad = responses[1]
    assert bad.status_code == 422, bad.text
    assert "JPEG image data is truncated or corrupt" in bad.json()["detail"]
    for i in (0, 2):
        assert responses[i].status_code == 200, responses[i].text
        labels, _ = labels_from_png(responses[i].content)
        expected = predict(reference, codecs.decode(payloads[i], **LIMITS).rgb)
        assert np.array_equal(labels, expected)
    # In one /segment/batch request, the error names the image.
    files = [("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(payloads)]
    response = device_decoding.client.post("/segment/batch", files=files)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("images[1]: ")


def test_orientation_through_the_server(
    device_decoding: LiveServer, reference: LoadedWeights
) -> None:
    data = with_orientation(skimage_data.chelsea()[:90, :130], 6)
    response = post(device_decoding, data, output="json")
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (90, 130)
    labels, _ = labels_from_png(base64.b64decode(response.json()["labels_png_base64"]))
    assert np.array_equal(labels, predict(reference, codecs.decode(data, **LIMITS).rgb))
