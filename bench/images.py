"""Real photographs as request payloads and model inputs.

Benchmarks of a JPEG-decoding server mean little on synthetic noise (it compresses and decodes
at atypical speeds), so every payload is a real photo re-encoded once, in memory, at a fixed
size: the two workloads of the issue are VOC-like 500x375 and CamVid-like 480x360.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

# name -> (width, height, source folders under the data root, in order of preference)
WORKLOADS: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "voc": (500, 375, ("voc-tiny/JPEGImages", "demo-photos")),
    "camvid": (480, 360, ("camvid/val", "camvid/train")),
}
_SUFFIXES = {".jpg", ".jpeg", ".png"}


class NoImagesError(FileNotFoundError):
    """No photos where the benchmark looked: the data root is missing or empty."""


def source_files(data_root: Path, folders: Sequence[str], limit: int) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        d = data_root / folder
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.suffix.lower() in _SUFFIXES)
        if len(files) >= limit:
            break
    if not files:
        raise NoImagesError(
            f"no photos under {data_root} in {', '.join(folders)}; pass --data-root "
            "pointing at the shared data folder"
        )
    return files[:limit]


def load_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8, centre-cropped to the aspect ratio and resized to size=(h, w)."""
    h, w = size
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = ImageOps.fit(im, (w, h), Image.Resampling.BILINEAR)  # PIL sizes are (w, h)
        return np.asarray(im, dtype=np.uint8).copy()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def workload_arrays(
    workload: str, count: int = 8, data_root: Path = DEFAULT_DATA_ROOT
) -> list[np.ndarray]:
    """Up to ``count`` real photos of the workload's fixed size, as RGB arrays."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    w, h, _ = WORKLOADS[workload]
    return photos_of_size((h, w), count, data_root)


def photos_of_size(
    size: tuple[int, int], count: int = 8, data_root: Path = DEFAULT_DATA_ROOT
) -> list[np.ndarray]:
    """Real photos resized to ``size`` (h, w), from the workload whose area is closest."""
    area = size[0] * size[1]
    nearest = min(WORKLOADS.values(), key=lambda v: abs(math.log(v[0] * v[1] / area)))
    return [load_rgb(p, size) for p in source_files(data_root, nearest[2], count)]


def workload_jpegs(
    workload: str, count: int = 8, data_root: Path = DEFAULT_DATA_ROOT
) -> list[bytes]:
    """The same photos as JPEG bytes (quality 90), what a client would upload."""
    return [encode_jpeg(a) for a in workload_arrays(workload, count, data_root)]
