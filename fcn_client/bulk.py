"""Bulk segmentation: many encoded images in, the server's answers out, in this process.

This module owns the synchronous, batch-at-a-time core that offline engines call: Ray Data's
``map_batches`` (``fcn_client.ray_data``), Spark's ``predict_batch_udf`` and Beam's
``RunInference`` (``fcn_client.engines``) and ``fcn-segment-bulk``. Everything that decides
the bytes is the server's own, as for ``fcn-segment --local`` (``fcn_client.local``): the
``FCN_*`` settings, the model and its inference config, ``service.codecs`` for decoding,
the label PNG and the class shares. So a label PNG written here is byte-identical to what
``POST /segment?output=labels`` answers for the same file under the same settings.

Images of mixed sizes are what these engines' stock batch helpers fail on (they stack
tensors); here a batch is grouped by size bucket (``Segmenter.segment``) and each image comes
back at its own size; an image too large for one pass is cut into tiles as the server cuts
it (``FCN_TILE``). A file that cannot be decoded gives a result with ``error`` set and no
label map; its batch-mates are unaffected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fcn_client.local import InProcessModel
from service import codecs


@dataclass(frozen=True)
class BulkResult:
    """One image's answer: its label map (H x W uint8 at the original size) and the classes
    present, or ``error`` ("<HTTP status>: <what is wrong>", as the server would answer)."""

    labels: np.ndarray | None
    classes: list[codecs.ClassShare]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def classes_json(self) -> str:
        """The classes present, most pixels first, as the server's JSON answer lists them."""
        return json.dumps([c.model_dump(mode="json") for c in self.classes])


class BulkSegmenter(InProcessModel):
    """Encoded images (or RGB arrays) -> :class:`BulkResult`, a batch at a time.

    Not thread-safe: one caller at a time (an engine's worker or actor holds one each).
    """

    def segment(self, blobs: Sequence[bytes]) -> list[BulkResult]:
        """Encoded images (JPEG, PNG, ...) -> their results, in order."""
        s = self.settings
        return self._segment(
            list(
                self._codecs.map(
                    lambda b: _attempt(
                        codecs.decode, b, s.max_image_pixels, s.max_side, self.tiling
                    ),
                    blobs,
                )
            )
        )

    def segment_arrays(self, arrays: Sequence[np.ndarray]) -> list[BulkResult]:
        """Image arrays (``ray.data.read_images`` rows: RGB, or grey, grey + alpha, RGBA and
        16-bit grey as it leaves them without ``mode="RGB"``) -> their results, in order."""
        s = self.settings
        return self._segment(
            [
                rgb
                if isinstance(rgb := as_rgb(a), str)
                else _attempt(codecs.from_pixels, rgb, s.max_image_pixels, s.max_side, self.tiling)
                for a in arrays
            ]
        )

    def png(self, result: BulkResult) -> bytes:
        """The label PNG of a successful result: the server's ``output=labels`` bytes."""
        if result.labels is None:
            raise ValueError(f"no label map: {result.error}")
        return codecs.labels_png(result.labels, self.meta.palette)

    def _segment(self, decoded: list[codecs.DecodedImage | str]) -> list[BulkResult]:
        """Decoded images through the model, batched by size bucket, or one at a time in
        tiles where the tiling says so (as the server does); errors passed through."""
        tiled = [isinstance(d, codecs.DecodedImage) and self.tiled(d) for d in decoded]
        whole = iter(
            self._labels(
                [
                    d.model_input
                    for d, t in zip(decoded, tiled, strict=True)
                    if isinstance(d, codecs.DecodedImage) and not t
                ]
            )
        )
        results = []
        for d, t in zip(decoded, tiled, strict=True):
            if isinstance(d, str):
                lab: np.ndarray | str = d
            elif t:
                lab = _or_memory_error(self.segmenter.segment_tiled, d.model_input, self.tiling)
            else:
                lab = next(whole)
            if isinstance(lab, str):
                results.append(BulkResult(None, [], error=lab))
                continue
            full = codecs.restore_size(lab, d.size)  # type: ignore[union-attr]
            results.append(BulkResult(full, codecs.summary(full, self.meta.class_names)))
        return results

    def _labels(self, images: list[np.ndarray]) -> list[np.ndarray | str]:
        """Label maps of a batch; if it runs out of memory, each image alone (as the server
        splits such a batch), so that an image too large for the device fails alone."""
        try:
            return list(self.segmenter.segment(images))
        except Exception as exc:
            if not out_of_memory(exc):
                raise
        return [_or_memory_error(lambda im: self.segmenter.segment([im])[0], im) for im in images]

    def close(self) -> None:
        self._codecs.shutdown(wait=False, cancel_futures=True)


def as_rgb(image: object) -> np.ndarray | str:
    """An H x W x 3 uint8 array: other Pillow-shaped arrays converted as the server converts
    the same modes (``codecs.to_rgb``), or the error, worded as the server's."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        return array
    try:
        return codecs.to_rgb(Image.fromarray(array))
    except (TypeError, ValueError, codecs.CodecError) as exc:
        return (
            f"415: an image array of shape {array.shape} and type {array.dtype} is not a "
            f"picture ({exc})"
        )


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device or host running out of memory (torch's CPU allocator
    raises a plain RuntimeError for it)."""
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _or_memory_error(run: Callable[..., np.ndarray], *args: object) -> np.ndarray | str:
    """``run(*args)``, or its running out of memory worded as the server's answer (413)."""
    try:
        return run(*args)
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        return f"413: the image does not fit in memory ({type(exc).__name__}: {exc})"


def _attempt(
    decode: Callable[..., codecs.DecodedImage], *args: object
) -> codecs.DecodedImage | str:
    """``decode(*args)``, or the error as the server would word it."""
    try:
        return decode(*args)
    except codecs.CodecError as exc:
        return f"{exc.status}: {exc.detail}"
