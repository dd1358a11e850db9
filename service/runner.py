"""The model on its device: pad to the bucket, forward, argmax on the device, crop, OOM split.

On CUDA a batch is *launched* (staged in reused pinned memory, copied in on a stream of its
own, computed, its labels copied out asynchronously) and *waited for* separately, so the
batcher can stage and queue the next batch while the device still runs this one.

Any ``nn.Module`` that maps a normalised N x 3 x H x W float batch to N x C x H x W logits
can be served (the benchmarks plug in a near-free one). Only uint8 images go to the device
and only uint8 label maps come back: logits never leave it.

Padding is zeros *after* normalisation, i.e. the mean colour, at the bottom and right. That is
exactly what the EfficientNet-Lite0 FCN does itself to reach a multiple of 32, so with
32-pixel buckets a batched image gets the same labels as the image run alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

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
    """One H x W uint8 map per input image, at the input's size; with images decoded on the
    device, the decoding error of an image that had none (its batch-mates are unaffected)."""
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


def crop(
    labels: np.ndarray, sizes: Sequence[tuple[int, int]], failed: dict[int, Exception]
) -> list[np.ndarray | Exception]:
    """Each image's own H x W out of the padded N x Hb x Wb batch (copies: buffers are reused),
    or the error of an image that could not be decoded."""
    return [
        failed[i] if i in failed else labels[i, :h, :w].copy() for i, (h, w) in enumerate(sizes)
    ]


CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
"""``torch.compile`` modes that capture CUDA graphs on a CUDA device."""


def compiled_batch_sizes(capacity: int) -> list[int]:
    """The batch sizes a compiled model runs: powers of two below ``capacity``, and it."""
    return sorted({1 << k for k in range(capacity.bit_length()) if 1 << k < capacity} | {capacity})


def allow_recompiles(shapes: int) -> None:
    """Let ``torch.compile`` keep ``shapes`` static-shape variants (its default is 8)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), shapes))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def effective_precision(device: torch.device, precision: str) -> str:
    """Autocast only on CUDA: bf16/fp16 on the CPU is slower and not what was validated."""
    if device.type != "cuda" and precision != "fp32":
        log.warning("precision %s applies on CUDA only; the CPU runs fp32", precision)
        return "fp32"
    return precision


def bucket_of(height: int, width: int, multiple: int) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


class Runner:
    def __init__(
        self,
        model: nn.Module,
        normalization: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        precision: str = "fp32",
        bucket_multiple: int = 32,
        on_oom_split: Callable[[], None] | None = None,
        cpu_workers: int = 1,
        channels_last: bool = False,
        compile: bool = False,
        cudnn_benchmark: bool = True,
        compile_mode: str = "default",
    ) -> None:
        self.device = device
        self.precision = effective_precision(device, precision)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self._memory_format).eval()
        self._net = (
            torch.compile(self.model, dynamic=False, mode=compile_mode) if compile else self.model
        )
        # CUDA graphs (reduce-overhead, max-autotune) record one graph per shape, on the
        # second call or so, and replay it from the third: warm-up runs every shape thrice.
        self._warmup_runs = 3 if compile and compile_mode in CUDA_GRAPH_MODES else 1
        self._compiled = compile
        self._warmed_batch_sizes: dict[tuple[int, int], list[int]] = {}
        self.normalization = normalization
        self.bucket_multiple = bucket_multiple
        self.on_oom_split = on_oom_split
        self.buffers = HostBuffers(pinned=device.type == "cuda")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # CUDA work runs on one thread whoever calls: compiled CUDA graphs belong to the
        # thread that recorded them (their tree lives in thread-local state), and one
        # thread keeps one current stream.
        self._device_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="fcn-device")
            if device.type == "cuda"
            else None
        )
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # CPU: one image per thread scales better than batching or intra-op threads.
        self._pool = (
            ThreadPoolExecutor(cpu_workers, thread_name_prefix="fcn-cpu")
            if device.type == "cpu" and cpu_workers > 1
            else None
        )

    def predict(self, images: Sequence[ModelInput]) -> Prediction:
        """H x W x 3 uint8 images of one bucket -> their label maps; OOM splits in halves."""
        return self.launch(images).wait()

    def launch(self, images: Sequence[ModelInput]) -> Prediction | InFlight:
        """Queue a batch on the device and return without waiting for it (CUDA).

        The caller may stage and launch the next batch before calling ``wait`` on this one;
        on the CPU the work is done by the time this returns.
        """
        if self._device_thread is None:
            return self._launch_splitting(list(images))
        return self._device_thread.submit(self._launch_splitting, list(images)).result()

    def _launch_splitting(self, images: list[ModelInput]) -> Prediction | InFlight:
        try:
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
        first = self._launch_splitting(images[:half]).wait()
        second = self._launch_splitting(images[half:]).wait()
        return Prediction(first.labels + second.labels, first.passes + second.passes)

    def _launch(self, images: list[ModelInput]) -> Prediction | InFlight:
        sizes = [im.shape[:2] for im in images]
        hb, wb = bucket_of(max(h for h, _ in sizes), max(w for _, w in sizes), self.bucket_multiple)
        # Compiled: round the batch up to a warmed-up size (the extra images are discarded),
        # so serving never meets a shape that would compile or record a graph.
        warmed = self._warmed_batch_sizes.get((hb, wb), []) if self._compiled else []
        batch = next((n for n in warmed if n >= len(images)), len(images))
        host = self.buffers.take((batch, hb, wb, 3))
        lent = [host]
        try:
            staging = host.numpy()  # shares memory with host (pinned on CUDA)
            jpegs: dict[int, EncodedJpeg] = {}
            for i, (im, (h, w)) in enumerate(zip(images, sizes, strict=True)):
                if isinstance(im, EncodedJpeg):
                    jpegs[i] = im  # decoded straight into the device batch, below
                else:
                    staging[i, :h, :w] = im
            if self.device.type == "cuda":
                return self._launch_cuda(host, sizes, jpegs, lent)
            start = time.perf_counter()
            with torch.inference_mode():
                failed = self._decode_into(host, jpegs)
                x = self._normalized(host, sizes)
                self.buffers.give(*lent)  # x is a copy: the staging buffer is free again
                lent = []
                if self._pool is not None and len(images) > 1:
                    real = x[: len(images)].split(1)  # not the rows a compiled batch adds
                    labels = torch.cat(list(self._pool.map(self._labels, real)))
                else:
                    labels = self._labels(x)
            seconds = time.perf_counter() - start
            return Prediction(crop(labels.numpy(), sizes, failed), [(len(images), seconds)])
        except BaseException:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no copy may still use a buffer given back
            self.buffers.give(*lent)
            raise

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
            labels = self._labels(self._normalized(x, sizes))
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

    def _normalized(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """uint8 N x H x W x 3 -> normalised N x 3 x H x W with the padding set to zero."""
        x = self.normalization(x.permute(0, 3, 1, 2).contiguous())
        for i, (h, w) in enumerate(sizes):
            x[i, :, h:, :] = 0
            x[i, :, :, w:] = 0
        return x

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch -> uint8 labels on the device (grad/autocast modes are per thread)."""
        x = x.contiguous(memory_format=self._memory_format)
        with torch.inference_mode(), self._autocast():
            logits = self._net(x)
        if logits.shape[0] != x.shape[0] or logits.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(
                f"model returned {tuple(logits.shape)} for input {tuple(x.shape)}; "
                "expected N x C x H x W logits"
            )
        if logits.shape[1] > 256:
            raise RuntimeError("more than 256 classes do not fit a uint8 label map")
        # max().indices, not argmax(): the same first-maximum labels, but torch's CPU argmax
        # over a non-inner dimension is ~15x slower (34 vs 2 ms for 11 x 384 x 480).
        return logits.max(1).indices.to(torch.uint8)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def warmup(self, plan: dict[tuple[int, int], Sequence[int]]) -> float:
        """Run every (height, width) -> batch sizes so the first requests meet no cold start.

        Compiled, these are then the only batch sizes run for that bucket (batches are
        rounded up to one of them), and the compiler's shape cache is made to hold them all.
        """
        start = time.perf_counter()
        if self._compiled:
            shapes = sum(len(set(sizes)) for sizes in plan.values())
            allow_recompiles(shapes + 8)
        for (h, w), batch_sizes in plan.items():
            bucket = bucket_of(h, w, self.bucket_multiple)
            warmed = sorted(set(batch_sizes) | set(self._warmed_batch_sizes.get(bucket, [])))
            for n in sorted(set(batch_sizes)):
                for _ in range(self._warmup_runs):
                    self.predict([np.zeros((h, w, 3), dtype=np.uint8)] * n)
            self._warmed_batch_sizes[bucket] = warmed
        return time.perf_counter() - start
