"""Tiled inference: an image too large for one pass, segmented at full resolution in tiles.

This module owns where the tiles of an image lie (:func:`plan_tiles`), when an image is cut
into tiles (:class:`TilePolicy`), and how their class scores are blended into one label map
(:class:`TileBlender`). Running the tiles is the caller's: ``Segmenter`` runs them in this
process, the server runs them through its batcher as ordinary batch members, so they batch
with each other and queue with everything else.

Tiles overlap, and each tile's scores are weighted by a window that rises linearly from its
edges over the overlap and is flat in its middle: near a tile's edge the network saw little
context (zero padding beyond it), so the neighbour whose centre is nearer wins there, and the
cross-fade leaves no seam. Labels are the argmax of the weighted sum of logits; as the weight
of a pixel is the same for every class, no normalisation by the summed weights is needed.

Memory stays bounded by a band, not by the image: tiles are added row by row (top to bottom),
and once a row of tiles is in, every image row above the next tile row is final, so the band
of blended scores is one tile high and as wide as the image (21 classes x 1536 x 8000 pixels
is 1 GB in float32), besides the scores of the tiles in flight (float16, 99 MB for a
1536-pixel tile of 21 classes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

TileMode = Literal["auto", "on", "off"]
TILE_MODES: tuple[TileMode, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class TilePolicy:
    """When and how an image is cut into tiles.

    - ``off``: never; images above ``max_side`` are downscaled to it (the label map is scaled
      back to the original size by the caller).
    - ``auto``: images whose longer side exceeds ``max_side`` are segmented at full resolution
      in tiles instead of being downscaled; smaller images are untouched.
    - ``on``: every image larger than one tile is segmented in tiles, at full resolution.

    ``size`` is a tile's side (a multiple of the bucket multiple, so that a tile is padded to
    nothing) and ``overlap`` the band neighbours share; ``max_pixels`` limits what is tiled.
    """

    mode: TileMode = "auto"
    size: int = 1536
    overlap: int = 256
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.mode not in TILE_MODES:
            raise ValueError(f"tile mode must be one of {', '.join(TILE_MODES)}, not {self.mode!r}")
        if not 0 <= 2 * self.overlap < self.size:
            raise ValueError(
                f"tile overlap {self.overlap} must be at least 0 and under half the tile size "
                f"{self.size}"
            )

    def tiles(self, height: int, width: int, max_side: int) -> bool:
        """Whether an image of this size is segmented in tiles."""
        if self.mode == "off" or max(height, width) <= self.size:
            return False
        return self.mode == "on" or max(height, width) > max_side

    def pixel_limit(self, height: int, width: int, max_side: int, max_image_pixels: int) -> int:
        """The pixel limit an image of this size is held to: ``max_pixels`` if it is tiled,
        else ``max_image_pixels``."""
        return self.max_pixels if self.tiles(height, width, max_side) else max_image_pixels


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    height: int
    width: int

    def cut(self, image: np.ndarray) -> np.ndarray:
        return image[self.top : self.top + self.height, self.left : self.left + self.width]


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles start along one side: evenly spread from 0 to ``length - size``, with at
    least ``overlap`` shared between neighbours."""
    if length <= size:
        return [0]
    count = math.ceil((length - overlap) / (size - overlap))
    last = length - size
    return [round(i * last / (count - 1)) for i in range(count)]


def plan_tiles(height: int, width: int, size: int, overlap: int) -> list[list[Tile]]:
    """Rows of tiles covering the image, top to bottom, each row left to right."""
    th, tw = min(size, height), min(size, width)
    return [
        [Tile(top, left, th, tw) for left in tile_starts(width, size, overlap)]
        for top in tile_starts(height, size, overlap)
    ]


def ramp(length: int, overlap: int) -> np.ndarray:
    """1-D weights: rising linearly over ``overlap`` pixels at both ends, 1 in between (never
    0, so a pixel that one tile alone covers keeps that tile's labels)."""
    i = np.arange(length, dtype=np.float32)
    if overlap == 0:
        return np.ones(length, np.float32)
    return np.minimum(1.0, (np.minimum(i, length - 1 - i) + 0.5) / overlap)


class TileBlender:
    """Tiles' class scores in, the image's label map out, one tile at a time in plan order
    (row by row, top to bottom, each row left to right): a caller holds only the scores of
    tiles in flight."""

    def __init__(self, height: int, width: int, size: int, overlap: int) -> None:
        self.rows = plan_tiles(height, width, size, overlap)
        self.tiles = [tile for row in self.rows for tile in row]
        self.labels = np.empty((height, width), np.uint8)
        first = self.tiles[0]
        self._weights = np.outer(ramp(first.height, overlap), ramp(first.width, overlap))
        self._band: np.ndarray | None = None  # C x tile height x W, once C is known
        self._top = 0  # the image row that the band's first row holds
        self._added = 0

    @property
    def done(self) -> bool:
        return self._added == len(self.tiles)

    def batches(self, capacity: int) -> list[list[Tile]]:
        """The tiles in plan order, ``capacity`` at a time: how every caller runs them (the
        server's batcher and the in-process core alike, so that their labels are the same)."""
        return [self.tiles[i : i + capacity] for i in range(0, len(self.tiles), capacity)]

    def add(self, scores: np.ndarray) -> None:
        """Blend the next tile's C x h x w class scores."""
        tile = self.tiles[self._added]
        if self._band is None:
            self._band = np.zeros((scores.shape[0], tile.height, self.labels.shape[1]), np.float32)
        self._finish(tile.top)  # a new row of tiles: every image row above it is final
        self._band[:, :, tile.left : tile.left + tile.width] += scores * self._weights
        self._added += 1
        if self.done:
            self._finish(self.labels.shape[0])

    def _finish(self, until: int) -> None:
        """Rows above ``until`` are final: write their labels and slide the band down."""
        done = until - self._top
        if done <= 0 or self._band is None:
            return
        final = torch.from_numpy(self._band[:, :done])
        self.labels[self._top : until] = final.max(0).indices.to(torch.uint8).numpy()
        kept = self._band.shape[1] - done
        if kept > 0:
            self._band[:, :kept] = self._band[:, done:]  # numpy copies overlapping slices safely
        self._band[:, max(kept, 0) :] = 0
        self._top = until


def segment_tiled(
    image: np.ndarray,
    scores: Callable[[list[np.ndarray]], list[np.ndarray]],
    policy: TilePolicy,
    capacity: Callable[[int, int], int],
) -> np.ndarray:
    """An H x W x 3 image's label map at full resolution; ``scores`` runs a batch of tiles
    (H x W x 3 crops) to their C x h x w class scores, ``capacity(height, width)`` tiles of a
    tile's size at a time."""
    h, w = image.shape[:2]
    blender = TileBlender(h, w, policy.size, policy.overlap)
    first = blender.tiles[0]
    for batch in blender.batches(capacity(first.height, first.width)):
        for s in scores([tile.cut(image) for tile in batch]):
            blender.add(s)
    return blender.labels
