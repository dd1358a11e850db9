"""Bytes to an RGB array, and a label map to PNG, overlay or JSON.

Everything here is plain CPU work on numpy/Pillow; the API runs it in a bounded thread pool
so the event loop never decodes. Errors are ``CodecError`` with the HTTP status a client
should see: 400 empty, 415 not an image we take, 413 too many pixels (read from the header,
before a single pixel is decoded), 422 a recognised image whose data is broken. ``summary``
answers in the API's own ``schemas.ClassShare``, so the JSON output needs no second type.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcn_core.data.palettes import flat_palette
from fcn_core.tiling import TilePolicy
from service.schemas import ClassShare

# MPO is what many cameras write for JPEG (a JPEG with extra frames).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
# Label maps compress well at any level; the fastest one keeps encoding off the critical path.
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 90
# Transparent pixels are shown on white, as a browser shows them on a default page.
BACKGROUND = (255, 255, 255)


class CodecError(Exception):
    def __init__(self, status: int, detail: str, reason: str = "bad_input") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason

    def at(self, index: int, count: int) -> CodecError:
        """The same error, naming which of ``count`` images of one request it is about."""
        if count == 1:
            return self
        return CodecError(self.status, f"images[{index}]: {self.detail}", self.reason)


@dataclass
class DecodedImage:
    rgb: np.ndarray
    """H x W x 3 uint8 at the original size, after EXIF orientation."""
    model_input: np.ndarray
    """What the model sees: ``rgb``, or ``rgb`` downscaled so its longer side is ``max_side``."""
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original image."""
        return self.rgb.shape[1], self.rgb.shape[0]


@dataclass
class EncodedJpeg:
    """A JPEG whose header passed every check, left for the runner to decode on its device.

    It stands where a decoded image's ``model_input`` would: ``shape`` is the decoded shape,
    after the EXIF ``orientation`` (1-8) is applied.
    """

    data: bytes
    height: int
    width: int
    orientation: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as ``DecodedImage.size``."""
        return self.width, self.height

    @property
    def model_input(self) -> EncodedJpeg:
        return self


ORIENTATION_TAG = 0x0112
_EOI = b"\xff\xd9"


def probe_jpeg(
    data: bytes, max_image_pixels: int, max_side: int, tiling: TilePolicy | None = None
) -> EncodedJpeg | None:
    """A plain JPEG the device can decode as it is, else None: ``decode`` then does the work.

    Only the header is read. Anything else (not JPEG, CMYK, a truncated file without its
    end marker, an image to downscale or to cut into tiles, over the pixel limit, unreadable)
    goes to ``decode`` on the CPU, which answers errors exactly as it always does.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        width, height = img.size
        orientation = int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # whatever it is, decode() reports it properly
        return None
    if (
        width * height > max_image_pixels
        or max(width, height) > max_side
        or (tiling is not None and tiling.tiles(height, width, max_side))
        or not data.rstrip(b"\x00\r\n ").endswith(_EOI)
        or orientation not in range(1, 9)
    ):
        return None
    if orientation >= 5:  # the transposing orientations swap the sides
        width, height = height, width
    return EncodedJpeg(data, height, width, orientation)


def decode_or_defer(
    data: bytes,
    max_image_pixels: int,
    max_side: int,
    defer_jpeg: bool,
    tiling: TilePolicy | None = None,
) -> DecodedImage | EncodedJpeg:
    """``decode``, or with ``defer_jpeg`` a JPEG the device can decode left encoded."""
    if defer_jpeg and (jpeg := probe_jpeg(data, max_image_pixels, max_side, tiling)) is not None:
        return jpeg
    return decode(data, max_image_pixels, max_side, tiling)


def decode(
    data: bytes, max_image_pixels: int, max_side: int, tiling: TilePolicy | None = None
) -> DecodedImage:
    """Bytes -> the image, and what the model sees: downscaled to ``max_side``, or at full
    resolution where ``tiling`` cuts it into tiles (under the tiling's own pixel limit, read
    from the header as ``max_image_pixels`` is)."""
    if not data:
        raise CodecError(400, "empty body: send the image bytes")
    try:
        with warnings.catch_warnings():
            # Our own limit (below) decides; Pillow's global one only backs it up.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise CodecError(
            413, f"image has too many pixels; the limit is {max_image_pixels} ({exc})", "too_large"
        ) from None
    except UnidentifiedImageError:
        raise CodecError(
            415, "not a recognised image; send JPEG, PNG, WebP, BMP, TIFF or GIF"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise CodecError(422, f"image header is corrupt: {exc}") from None
    fmt = img.format or "unknown"
    if fmt not in ACCEPTED_FORMATS:
        raise CodecError(
            415, f"{fmt} images are not accepted; send JPEG, PNG, WebP, BMP, TIFF or GIF"
        )
    width, height = img.size
    if tiling is not None:
        max_image_pixels = tiling.pixel_limit(height, width, max_side, max_image_pixels)
    if width * height > max_image_pixels:
        raise CodecError(
            413,
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}",
            "too_large",
        )
    try:
        img.seek(0)  # GIF, multi-page TIFF, MPO: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except CodecError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise CodecError(422, f"{fmt} image data is truncated or corrupt: {exc}") from None
    return DecodedImage(rgb=rgb, model_input=fit(rgb, max_side, tiling), format=fmt)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode to H x W x 3 uint8: 16-bit scaled (not clipped), alpha onto white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: keep the full range by scaling 65535 -> 255; clipping at 255 (what
        # convert("L") does) would turn almost every real 16-bit image white.
        wide = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        img = background
    elif img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError as exc:
            raise CodecError(415, f"colour mode {mode} is not supported: {exc}") from None
    return np.asarray(img, dtype=np.uint8)


def from_pixels(
    rgb: np.ndarray, max_image_pixels: int, max_side: int, tiling: TilePolicy | None = None
) -> DecodedImage:
    """An H x W x 3 uint8 array sent as pixels (the Open Inference Protocol's PIXELS), under
    the same pixel limit, downscaling and tiling as a decoded image."""
    h, w = rgb.shape[:2]
    if tiling is not None:
        max_image_pixels = tiling.pixel_limit(h, w, max_side, max_image_pixels)
    if h < 1 or w < 1:
        raise CodecError(422, f"an image of {w}x{h} pixels has nothing to segment")
    if h * w > max_image_pixels:
        raise CodecError(
            413, f"{w}x{h} = {w * h} pixels exceeds the {max_image_pixels}-pixel limit", "too_large"
        )
    return DecodedImage(rgb=rgb, model_input=fit(rgb, max_side, tiling), format="PIXELS")


def fit(rgb: np.ndarray, max_side: int, tiling: TilePolicy | None) -> np.ndarray:
    """What the model sees: the image itself where it is cut into tiles, else downscaled so
    that its longer side is at most ``max_side``."""
    if tiling is not None and tiling.tiles(rgb.shape[0], rgb.shape[1], max_side):
        return rgb
    return downscale(rgb, max_side)


def downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    new_w, new_h = scaled_size(w, h, max_side)
    resized = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def restore_size(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map computed on a downscaled image, back at the original (width, height)."""
    if labels.shape[1] == size[0] and labels.shape[0] == size[1]:
        return labels
    img = Image.fromarray(labels).resize(size, Image.Resampling.NEAREST)
    return np.asarray(img)


def labels_png(labels: np.ndarray, palette: list[list[int]]) -> bytes:
    """Palette PNG whose pixel values are the class indices, coloured by the class palette."""
    img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    img.putpalette(flat_palette(palette))  # L -> P, the values untouched
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def overlay(
    rgb: np.ndarray, labels: np.ndarray, palette: list[list[int]], alpha: float, fmt: str
) -> bytes:
    """The photo blended with its class colours: ``(1 - alpha) * photo + alpha * colour``."""
    colours = np.asarray(palette, dtype=np.float32)[: int(labels.max()) + 1]
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours[labels]
    img = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def summary(labels: np.ndarray, class_names: list[str]) -> list[ClassShare]:
    """The classes present, most pixels first."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    total = labels.size
    present = [int(i) for i in np.flatnonzero(counts)]
    present.sort(key=lambda i: (-counts[i], i))
    return [
        ClassShare(
            index=i,
            name=class_names[i] if i < len(class_names) else str(i),
            pixels=int(counts[i]),
            fraction=float(counts[i]) / total,
        )
        for i in present
    ]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
