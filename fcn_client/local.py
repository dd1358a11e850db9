"""``fcn-segment --local``: the server's answers, computed in this process.

This module owns the in-process backend. Everything that decides the bytes is the server's
own, taken from where the server takes it, never copied:

- the settings: ``service.settings.Settings`` from the same ``FCN_*`` environment (plus the
  ``--weights``/``--device``/``--backend`` overrides), its ``inference()`` config for the model and its
  decode limits, codec threads and warm-up;
- the model: ``service.loading.load_served_model``, run by ``fcn_core.inference.Segmenter``
  (backend, size buckets, batch capacity, CPU workers, threads, channels-last, compile,
  precision);
- the codecs: ``service.codecs.decode`` and the server's ``render``.

Images are in flight in parallel as on a server: files are read and decoded in the codec
threads, the decoded ones gather in a :class:`BatchWindow` and run through the model as
batches of up to the resolved batch size, one batch at a time on one thread, while the next
images decode and the finished ones encode. Imported only for ``--local``: it needs torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import torch

from fcn_client.jobs import BackendSetupError
from fcn_client.sdk import SegmentationError
from fcn_client.wire import ImageFormat, Output
from fcn_core.inference import Segmenter
from fcn_core.weights import LoadedWeights, WeightsError, WeightsMetadata
from service import codecs
from service.loading import load_served_model
from service.settings import Settings

T = TypeVar("T")


class LocalSetupError(BackendSetupError):
    """``--local`` cannot start: bad settings, or a weights file that is missing or broken."""


class BatchWindow:
    """Decoded images -> their label maps, computed several at a time.

    What the server's batcher does for one client that holds all its images: an image waits
    only while more images are on their way (``expect`` counts them) and the window is not
    full; a batch never waits for an image that is not coming. One batch computes at a time;
    the images that arrive meanwhile form the next. ``compute`` runs a list of images (any
    sizes: ``Segmenter.segment`` groups them by bucket) and returns their label maps.
    """

    def __init__(
        self, compute: Callable[[list[np.ndarray]], Awaitable[list[np.ndarray]]], size: int
    ) -> None:
        self.size = max(1, size)
        self._compute = compute
        self._expected = 0
        self._waiting: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references

    def expect(self) -> None:
        """An image is on its way (being read or decoded)."""
        self._expected += 1

    def withdraw(self) -> None:
        """An expected image will not come (it failed before reaching the window)."""
        self._expected -= 1
        self._launch_if_ready()

    async def labels(self, image: np.ndarray) -> np.ndarray:
        """The label map of an expected image, at the size the model sees it."""
        self._expected -= 1
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((image, future))
        self._launch_if_ready()
        return await future

    def _launch_if_ready(self) -> None:
        if self._busy or not self._waiting:
            return
        if len(self._waiting) < self.size and self._expected > 0:
            return  # more images are about to arrive: let them join this batch
        batch, self._waiting = self._waiting[: self.size], self._waiting[self.size :]
        self._busy = True
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            labels = await self._compute([image for image, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():  # a waiter cancelled (the run interrupted) has gone
                    future.set_exception(exc)
        else:
            for (_, future), lab in zip(batch, labels, strict=True):
                if not future.done():
                    future.set_result(lab)
        finally:
            self._busy = False
            self._launch_if_ready()


def build_local(
    build: Callable[[Settings, LoadedWeights], T],
    weights: str | Path | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> T:
    """``build(settings, model)`` with the settings ``fcn-serve`` would read from this
    environment (with these overrides) and the model they name. Raises ``LocalSetupError``
    saying what is wrong."""
    overrides: dict[str, Any] = {}
    if weights:
        overrides["weights"] = Path(weights)
    if device:
        overrides["device"] = device
    if backend:
        overrides["backend"] = backend
    try:
        settings = Settings(**overrides)
        return build(settings, load_served_model(settings))
    except (ValueError, WeightsError, RuntimeError) as exc:
        # ValueError: bad settings (pydantic's ValidationError is one), a backend that
        # cannot run here; RuntimeError: a device that is not there, a compile or
        # warm-up that fails.
        raise LocalSetupError(f"--local: {exc}") from exc


def server_render() -> Callable[..., bytes]:
    """The server's encoder as bytes: label PNG, overlay or JSON, exactly as it answers.

    Imported here, at start-up, so the routes' module is loaded only for ``--local``.
    """
    from service.stages import render

    def render_bytes(
        image: codecs.DecodedImage,
        labels: np.ndarray,
        meta: WeightsMetadata,
        output: Output,
        fmt: ImageFormat,
        alpha: float,
    ) -> bytes:
        answer = render(image, labels, meta, output, fmt, alpha)
        return answer if isinstance(answer, bytes) else bytes(answer.body)  # a Response

    return render_bytes


class InProcessModel:
    """The server's settings, model (with its tiling) and codec threads in this process:
    what ``--local`` and bulk jobs (``fcn_client.bulk``) share."""

    def __init__(self, settings: Settings, loaded: LoadedWeights) -> None:
        self.settings = settings
        self.meta = loaded.meta
        self.tiling = settings.tile_policy()
        self.segmenter = Segmenter(
            loaded.model, loaded.meta.normalization, settings.inference(), loaded.meta
        )
        self._codecs = ThreadPoolExecutor(
            settings.resolved_codec_threads(), thread_name_prefix="fcn-codec"
        )

    @classmethod
    def from_environment(
        cls,
        weights: str | Path | None = None,
        device: str | None = None,
        backend: str | None = None,
    ) -> Self:
        """What ``fcn-serve`` would run, given this environment and these overrides."""
        return build_local(cls, weights, device, backend)

    def tiled(self, image: codecs.DecodedImage) -> bool:
        """Whether the image is segmented in tiles (``FCN_TILE``), as the server decides."""
        return self.tiling.tiles(*image.model_input.shape[:2], self.settings.max_side)


class LocalBackend(InProcessModel):
    """The server's decode, model and encode in this process; see the module docstring."""

    def __init__(self, settings: Settings, loaded: LoadedWeights) -> None:
        super().__init__(settings, loaded)
        self._render = server_render()
        # The model runs on one thread, whoever calls, as in the server's runner: CUDA graphs
        # recorded by a compiled model belong to the thread that recorded them.
        self._device = ThreadPoolExecutor(1, thread_name_prefix="fcn-device")
        if settings.warmup and settings.warmup_shapes():
            try:
                self._device.submit(self.segmenter.warmup, settings.warmup_shapes()).result()
            except BaseException:
                self._shutdown()
                raise
        self.window = BatchWindow(self._compute, self.segmenter.predictor.max_batch_size())

    def in_flight(self, requested: int) -> int:
        """Two batches' worth at least: one computing while the next reads and decodes."""
        return max(requested, 2 * self.window.size)

    async def segment(
        self, source: Path, kinds: Sequence[Output], fmt: ImageFormat, alpha: float
    ) -> dict[Output, bytes]:
        kinds = [Output(k) for k in kinds]
        self.window.expect()
        try:
            image = await self._in(self._codecs, self._decode, source)
        except BaseException:
            self.window.withdraw()
            raise
        if self.tiled(image):
            self.window.withdraw()  # not for the window: cut into tiles, on the device thread
            labels = await self._in(
                self._device, self.segmenter.segment_tiled, image.model_input, self.tiling
            )
        else:
            labels = await self.window.labels(image.model_input)
        encoded = await asyncio.gather(
            *(
                self._in(self._codecs, self._render, image, labels, self.meta, kind, fmt, alpha)
                for kind in kinds
            )
        )
        return dict(zip(kinds, encoded, strict=True))

    def _decode(self, source: Path) -> codecs.DecodedImage:
        s = self.settings
        try:
            return codecs.decode(source.read_bytes(), s.max_image_pixels, s.max_side, self.tiling)
        except codecs.CodecError as exc:
            raise SegmentationError(f"{exc.status}: {exc.detail}", exc.status) from None

    async def _compute(self, images: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return await self._in(self._device, self.segmenter.segment, images)
        except torch.cuda.OutOfMemoryError as exc:
            raise SegmentationError(
                f"a batch of {len(images)} does not fit in the device's memory "
                f"(FCN_MAX_BATCH_SIZE, FCN_MAX_BATCH_PIXELS): {exc}"
            ) from None

    @staticmethod
    async def _in(pool: Executor, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def aclose(self) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self._codecs.shutdown(wait=False, cancel_futures=True)
        self._device.shutdown(wait=False, cancel_futures=True)
