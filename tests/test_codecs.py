"""service/codecs.py on real image bytes: decoding (formats, EXIF orientation, colour modes,
limits, broken files) and encoding (label PNG, overlay, class summary), without a server."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE
from service import codecs
from service.schemas import ClassShare
from tests.conftest import (
    demo_photos,
    encode,
    png_16bit_rgb,
    png_header_only,
    random_rgb,
)

PIXELS = 50_000_000
SIDE = 4096
PALETTE = [list(c) for c in CAMVID_PALETTE]
NAMES = list(CAMVID_CLASSES)


def decode(data: bytes, max_image_pixels: int = PIXELS, max_side: int = SIDE) -> np.ndarray:
    image = codecs.decode(data, max_image_pixels, max_side)
    assert image.rgb.dtype == np.uint8 and image.rgb.ndim == 3 and image.rgb.shape[2] == 3
    return image.rgb


def refused(data: bytes, status: int, **limits: int) -> codecs.CodecError:
    with pytest.raises(codecs.CodecError) as caught:
        codecs.decode(data, limits.get("max_image_pixels", PIXELS), limits.get("max_side", SIDE))
    assert caught.value.status == status, caught.value.detail
    return caught.value


# -- decoding -------------------------------------------------------------------------------


def test_real_photos_decode_as_pillow_does() -> None:
    for path in demo_photos():
        data = path.read_bytes()
        image = codecs.decode(data, PIXELS, SIDE)
        np.testing.assert_array_equal(image.rgb, np.asarray(Image.open(path).convert("RGB")))
        assert image.format == "JPEG"
        assert image.model_input is image.rgb  # small enough: the model sees it as it is
        assert image.size == Image.open(path).size


def test_a_large_photo_is_downscaled_for_the_model_only() -> None:
    path = demo_photos()[0]
    image = codecs.decode(path.read_bytes(), PIXELS, 200)
    width, height = Image.open(path).size
    assert image.size == (width, height)
    assert max(image.model_input.shape[:2]) == 200
    assert image.model_input.shape[1::-1] == codecs.scaled_size(width, height, 200)


@pytest.mark.parametrize(("orientation", "turns"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation: int, turns: int) -> None:
    stored = np.asarray(Image.open(demo_photos()[0]).convert("RGB"))[:90, :130]
    exif = Image.Exif()
    exif[codecs.ORIENTATION_TAG] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode(data), np.rot90(pixels, k=turns))
    deferred = codecs.decode_or_defer(data, PIXELS, SIDE, defer_jpeg=True)
    assert isinstance(deferred, codecs.EncodedJpeg)  # a plain JPEG is left to the device
    assert deferred.shape == np.rot90(pixels, k=turns).shape
    assert deferred.orientation == orientation


def test_colour_modes_become_rgb() -> None:
    rgb = random_rgb(20, 30, seed=4)
    grey = rgb[..., 0].copy()
    alpha = np.where(random_rgb(20, 30, seed=5)[..., 0] > 127, 255, 0).astype(np.uint8)
    grey3 = np.repeat(grey[..., None], 3, axis=2)
    indexed = Image.fromarray(rgb).quantize(colors=16)
    index = np.asarray(indexed)
    colours = np.asarray(indexed.getpalette()[: 16 * 3], dtype=np.uint8).reshape(-1, 3)
    cases = {
        # 16-bit grey is scaled (65535 -> 255), not clipped to white.
        "I;16": (encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), grey3),
        "16-bit RGB": (png_16bit_rgb(rgb.astype(np.uint16) * 257), rgb),
        "F": (encode(Image.fromarray(grey.astype(np.float32)), "TIFF"), grey3),
        "L": (encode(Image.fromarray(grey), "PNG"), grey3),
        "RGBA on white": (
            encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
            np.where(alpha[..., None] == 255, rgb, 255),
        ),
        "LA on white": (
            encode(Image.fromarray(np.dstack([grey, alpha])), "PNG"),
            np.where(alpha[..., None] == 255, grey3, 255),
        ),
        "P": (encode(indexed, "PNG"), colours[index]),
        "P transparent": (
            encode(indexed, "PNG", transparency=int(index[0, 0])),
            np.where((index == index[0, 0])[..., None], 255, colours[index]),
        ),
        "1": (encode(Image.fromarray(grey > 127), "PNG"), np.where(grey3 > 127, 255, 0)),
        "CMYK": (encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb),
    }
    for mode, (data, want) in cases.items():
        np.testing.assert_array_equal(decode(data), want.astype(np.uint8), err_msg=mode)


def test_gif_and_webp_decode_their_first_frame() -> None:
    rgb = random_rgb(24, 40, seed=6)
    webp = encode(Image.fromarray(rgb), "WEBP", lossless=True)
    np.testing.assert_array_equal(decode(webp), rgb)
    frames = [Image.fromarray(random_rgb(24, 40, seed=s)).quantize(colors=8) for s in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    np.testing.assert_array_equal(decode(buf.getvalue()), np.asarray(frames[0].convert("RGB")))


def test_pixel_limit_is_read_from_the_header() -> None:
    # 12000 x 12000 passes Pillow's own bomb guard and meets ours; 30000 x 30000 meets Pillow's.
    for side in (12_000, 30_000):
        start = time.perf_counter()
        error = refused(png_header_only(side, side), 413, max_image_pixels=1_000_000)
        assert time.perf_counter() - start < 1, "a bomb must be refused before decoding"
        assert error.reason == "too_large" and "limit is 1000000" in error.detail
    refused(encode(Image.new("RGB", (200, 200)), "PNG"), 413, max_image_pixels=39_999)
    assert decode(encode(Image.new("RGB", (200, 200)), "PNG"), max_image_pixels=40_000).shape


def test_broken_and_foreign_bytes_are_refused() -> None:
    jpeg = demo_photos()[0].read_bytes()
    assert refused(jpeg[: len(jpeg) // 2], 422).reason == "bad_input"
    assert "corrupt" in refused(encode(Image.new("RGB", (64, 64)), "PNG")[:60], 422).detail
    assert "empty" in refused(b"", 400).detail
    assert "not a recognised image" in refused(b"%PDF-1.7 not an image", 415).detail
    assert "ICO" in refused(encode(Image.new("RGB", (16, 16)), "ICO"), 415).detail


def test_errors_name_the_image_in_a_batch() -> None:
    error = codecs.CodecError(415, "not a recognised image")
    assert error.at(0, 1) is error
    named = error.at(2, 3)
    assert (named.status, named.detail, named.reason) == (
        415,
        "images[2]: " + error.detail,
        error.reason,
    )


# -- encoding -------------------------------------------------------------------------------


def label_map(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (random_rgb(h, w, seed)[..., 0] // 24).astype(np.uint8)  # classes 0..10


def test_labels_png_round_trips_indices_and_palette() -> None:
    labels = label_map(37, 53)
    img = Image.open(io.BytesIO(codecs.labels_png(labels, PALETTE)))
    assert (img.format, img.mode) == ("PNG", "P")
    np.testing.assert_array_equal(np.asarray(img), labels)
    colours = np.asarray(img.getpalette()[: 3 * len(PALETTE)]).reshape(-1, 3)
    np.testing.assert_array_equal(colours, np.asarray(PALETTE))


def test_restore_size_is_nearest_neighbour() -> None:
    labels = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    assert codecs.restore_size(labels, (2, 2)) is labels
    np.testing.assert_array_equal(
        codecs.restore_size(labels, (4, 4)), labels.repeat(2, 0).repeat(2, 1)
    )


def test_overlay_blends_the_photo_and_the_class_colours() -> None:
    rgb = np.asarray(Image.open(demo_photos()[0]).convert("RGB"))[:64, :96]
    labels = label_map(64, 96, seed=3)
    colours = np.asarray(PALETTE, dtype=np.float64)[labels]

    def blended(alpha: float, fmt: str) -> np.ndarray:
        data = codecs.overlay(rgb, labels, PALETTE, alpha, fmt)
        img = Image.open(io.BytesIO(data))
        assert img.format == fmt.upper()
        return np.asarray(img.convert("RGB"), dtype=np.float64)

    np.testing.assert_array_equal(blended(0.0, "png"), rgb)
    np.testing.assert_array_equal(blended(1.0, "png"), colours)
    half = np.clip(np.rint(0.5 * rgb + 0.5 * colours), 0, 255).astype(np.uint8)
    assert np.abs(blended(0.5, "png") - half).max() <= 1
    # JPEG is lossy: the overlay is exactly the blend put through the same encoder.
    jpeg = encode(Image.fromarray(half), "JPEG", quality=codecs.JPEG_QUALITY)
    np.testing.assert_array_equal(blended(0.5, "jpeg"), np.asarray(Image.open(io.BytesIO(jpeg))))


def test_summary_counts_the_classes_present_most_first() -> None:
    labels = np.array([[3, 3, 3, 0], [1, 1, 0, 12]], dtype=np.uint8)
    shares = codecs.summary(labels, NAMES)
    assert all(isinstance(s, ClassShare) for s in shares)
    assert [(s.index, s.pixels) for s in shares] == [(3, 3), (0, 2), (1, 2), (12, 1)]
    assert [s.name for s in shares] == [NAMES[3], NAMES[0], NAMES[1], "12"]  # 12: no name
    assert sum(s.fraction for s in shares) == pytest.approx(1.0)
    assert shares[0].fraction == pytest.approx(3 / 8)
