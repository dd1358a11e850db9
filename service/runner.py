"""The inference core on a device, plus what only a server needs.

``fcn_core.inference.Predictor`` does the model's work (normalise, forward, argmax; buckets,
padding and crops are written there once). Around it the runner adds: reused (pinned) staging
buffers; on CUDA, a batch *launched* (copied in on a stream of its own, computed, its labels
copied out asynchronously) and *waited for* separately, so the batcher can stage and queue the
next batch while the device still runs this one; JPEGs decoded on the device; and the split
of a batch that runs out of device memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fcn_core.inference import InferenceConfig, Predictor, crop, pad_into
from fcn_core.preprocess import Normalization
from fcn_core.weights import WeightsMetadata
from service.codecs import EncodedJpeg
from service.device_jpeg import decode_on_device
from service.staging import HostBuffers

log = logging.getLogger(__name__)


ModelInput = np.ndarray | EncodedJpeg
"""An H x W x 3 uint8 image, or a JPEG the runner decodes on its device."""


class DeviceOutOfMemory(RuntimeError):
    """A single image did not fit on the device; splitting cannot help."""


@dataclass
class Prediction:
    labels: list[np.ndarray | Exception]
    """One H x W uint8 map per input image, at the input's size (for a batch of tiles, C x H
    x W float16 class scores); with images decoded on the device, the decoding error of an
    image that had none (its batch-mates are unaffected)."""
    passes: list[tuple[int, float]] = field(default_factory=list)
    """(images, seconds) of every forward pass run; more than one after an OOM split."""

    def wait(self) -> Prediction:
        """Already complete (the CPU path, or after an OOM split)."""
        return self


class InFlight:
    """A batch queued on the CUDA device; ``wait`` blocks until its labels are on the host."""

    def __init__(
        self,
        runner: Runner,
        sizes: list[tuple[int, int]],
        lent: list[torch.Tensor],
        out: torch.Tensor,
        start: torch.cuda.Event,
        done: torch.cuda.Event,
        failed: dict[int, Exception],
    ) -> None:
        self._failed = failed
        self._runner = runner
        self._sizes = sizes
        self._lent = lent
        self._out = out
        self._start = start
        self._done = done

    def wait(self) -> Prediction:
        try:
            self._done.synchronize()
            labels = crop(self._out.numpy(), self._sizes, self._failed)
            seconds = self._start.elapsed_time(self._done) / 1000.0  # device time
        finally:
            self._runner.buffers.give(*self._lent)  # the copies have finished
        return Prediction(labels, [(len(self._sizes), seconds)])


class Runner:
    def __init__(
        self,
        model: nn.Module,
        normalization: Normalization | Callable[[torch.Tensor], torch.Tensor],
        config: InferenceConfig,
        on_oom_split: Callable[[], None] | None = None,
        meta: WeightsMetadata | None = None,
    ) -> None:
        self.predictor = Predictor(model, normalization, config, meta=meta)
        self.device = self.predictor.device
        self.precision = self.predictor.precision
        self.on_oom_split = on_oom_split
        self.buffers = HostBuffers(pinned=self.device.type == "cuda")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # CUDA work runs on one thread whoever calls: compiled CUDA graphs belong to the
        # thread that recorded them (their tree lives in thread-local state), and one
        # thread keeps one current stream.
        self._device_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="fcn-device")
            if self.device.type == "cuda"
            else None
        )

    def predict(self, images: Sequence[ModelInput], scores: bool = False) -> Prediction:
        """H x W x 3 uint8 images of one bucket -> their label maps (or class scores);
        OOM splits in halves."""
        return self.launch(images, scores).wait()

    def launch(self, images: Sequence[ModelInput], scores: bool = False) -> Prediction | InFlight:
        """Queue a batch on the device and return without waiting for it (CUDA).

        The caller may stage and launch the next batch before calling ``wait`` on this one;
        on the CPU the work is done by the time this returns. A batch of tiles (``scores``)
        completes before this returns on any device: its scores are large and few.
        """
        if self._device_thread is None:
            return self._launch_splitting(list(images), scores)
        return self._device_thread.submit(self._launch_splitting, list(images), scores).result()

    def _launch_splitting(self, images: list[ModelInput], scores: bool) -> Prediction | InFlight:
        try:
            if scores:
                return self._scores(images)  # type: ignore[arg-type]  # tiles are arrays
            return self._launch(images)
        except torch.cuda.OutOfMemoryError as exc:
            if len(images) == 1:
                h, w = images[0].shape[:2]
                raise DeviceOutOfMemory(
                    f"a {w}x{h} image does not fit in the device's memory"
                ) from exc
            log.warning("out of memory on a batch of %d; splitting and retrying", len(images))
        # Retried outside the handler: its traceback holds the failed batch's tensors.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.on_oom_split is not None:
            self.on_oom_split()
        half = len(images) // 2
        first = self._launch_splitting(images[:half], scores).wait()
        second = self._launch_splitting(images[half:], scores).wait()
        return Prediction(first.labels + second.labels, first.passes + second.passes)

    def _launch(self, images: list[ModelInput]) -> Prediction | InFlight:
        sizes = [im.shape[:2] for im in images]
        p = self.predictor
        host = self.buffers.take(p.staging_shape(images))
        lent = [host]
        try:
            # JPEGs left encoded are decoded straight into the device batch, below.
            jpegs = {i: im for i, im in enumerate(images) if isinstance(im, EncodedJpeg)}
            pad_into(host.numpy(), images)  # shares memory with host (pinned on CUDA)
            if self.device.type == "cuda":
                return self._launch_cuda(host, sizes, jpegs, lent)
            start = time.perf_counter()
            with torch.inference_mode():
                failed = self._decode_into(host, jpegs)
                x = p.normalized(host, sizes)
                self.buffers.give(*lent)  # x is a copy: the staging buffer is free again
                lent = []
                labels = p.labels(x, len(images))
            seconds = time.perf_counter() - start
            return Prediction(crop(labels.numpy(), sizes, failed), [(len(images), seconds)])
        except BaseException:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no copy may still use a buffer given back
            self.buffers.give(*lent)
            raise

    def _scores(self, images: list[np.ndarray]) -> Prediction:
        """Tiles -> their C x H x W float16 class scores on the host, synchronously."""
        p = self.predictor
        host = self.buffers.take(p.staging_shape(images))
        try:
            start = time.perf_counter()
            scores = p.predict_padded(host, images, scores=True)
            seconds = time.perf_counter() - start
        finally:
            self.buffers.give(host)  # predict_padded has finished with it
        return Prediction(scores, [(len(images), seconds)])  # type: ignore[arg-type]

    def _launch_cuda(
        self,
        host: torch.Tensor,
        sizes: list[tuple[int, int]],
        jpegs: dict[int, EncodedJpeg],
        lent: list[torch.Tensor],
    ) -> InFlight:
        """Copy in on the copy stream, compute on the current one, copy labels out pinned."""
        stream = torch.cuda.current_stream(self.device)
        assert self._copy_stream is not None
        with torch.inference_mode():
            # The copy waits for nothing on the compute stream, so it overlaps the kernels
            # of the batch launched before this one.
            with torch.cuda.stream(self._copy_stream):
                x = host.to(self.device, non_blocking=True)
                # nvJPEG gets a stream with nothing else on it (see decode_on_device).
                failed = self._decode_into(x, jpegs)
            stream.wait_stream(self._copy_stream)
            x.record_stream(stream)  # the allocator must not reuse x before compute ends
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            labels = self.predictor.labels(self.predictor.normalized(x, sizes))
            out = self.buffers.take(tuple(labels.shape))
            lent.append(out)
            out.copy_(labels, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(stream)
        return InFlight(self, sizes, lent, out, start, done, failed)

    def _decode_into(self, x: torch.Tensor, jpegs: dict[int, EncodedJpeg]) -> dict[int, Exception]:
        """Decode the batch's JPEGs into their rows of ``x`` (N x H x W x 3, on the device).

        Returns the images that failed to decode; their rows hold whatever was there.
        """
        if not jpegs:
            return {}
        failed: dict[int, Exception] = {}
        if self.device.type == "cuda":
            # nvJPEG writes from a private stream into memory taken on the current one
            # without waiting for it (pytorch/vision#9606): let pending copies, which may
            # read memory freed to this stream, finish first. Only copies run here.
            torch.cuda.current_stream(self.device).synchronize()
        decoded = decode_on_device(list(jpegs.values()), self.device)
        for i, image in zip(jpegs, decoded, strict=True):
            if isinstance(image, Exception):
                failed[i] = image
            else:
                x[i, : image.shape[0], : image.shape[1]] = image
        return failed

    def warmup(self, sizes: Sequence[tuple[int, int]]) -> float:
        """Run each (height, width) at the batch sizes serving will use; returns seconds."""
        start = time.perf_counter()
        self.predictor.warmup(self.predictor.warmup_plan(sizes), self.predict)
        return time.perf_counter() - start
