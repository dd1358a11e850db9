"""The one in-process inference path: images of any sizes in, label maps at their sizes out.

Everything that runs the model on images shares this module: the server's runner
(``service/runner.py``), ``fcn-segment --local``, bulk jobs and notebooks. It owns

- :class:`InferenceConfig`: the knobs that change the labels or the speed, with their
  defaults written once (the server's settings take theirs from here) and the rules that turn
  ``0 = automatic`` into numbers for a device;
- size buckets (:func:`bucket_of`), batch capacity under a pixel budget and the batching of a
  known set of images (:func:`plan_batches`);
- :class:`Predictor`: the model on its device through a backend (``fcn_core.backends``:
  PyTorch eager or compiled, ONNX Runtime, OpenVINO), channels-last, autocast; on the CPU a
  batch's images run one per thread and an image alone gets every core; padding zeroed after
  normalisation, argmax on the device (on the CPU, labels finished from the FCN's coarse
  scores: ``fcn_core.final_upsampling``);
- :class:`Segmenter`: the above end to end for callers that hold the images (no server).

The server wraps a :class:`Predictor` with what only a server needs: reused pinned staging
buffers, batches in flight while the next is staged, and the OOM split.

Padding is zeros *after* normalisation, i.e. the mean colour, at the bottom and right. That is
exactly what the EfficientNet-Lite0 FCN does itself to reach a multiple of 32, so with
32-pixel buckets a batched image gets the same labels as the image run alone. That holds for
the ``mobilenet_v2`` backbone too, whose DeepLab head pools the whole input, padding included:
batches hold one bucket each, so an image is never padded beyond its own multiple of 32 (32
more rows would change 0.17 % of its pixels, on 10 COCO photos).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fcn_core.backends import BackendName, Network, build_network, choose_backend
from fcn_core.final_upsampling import served_network
from fcn_core.preprocess import Normalization
from fcn_core.tiling import TilePolicy, segment_tiled
from fcn_core.weights import WeightsMetadata, load_weights

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
"""``torch.compile`` modes that capture CUDA graphs on a CUDA device."""

DEFAULT_GPU_BATCH = 8
"""Images per batch on a GPU unless told otherwise."""

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its affinity mask (a container's cpuset), cut by a cgroup v2
    CPU quota (``docker run --cpus``, a Kubernetes CPU limit), which the mask does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read
    return cores


@dataclass(frozen=True)
class InferenceConfig:
    """How to run the model. ``0`` means automatic for the counts; see the ``*_for`` rules.

    The server's ``Settings`` documents each field (``FCN_<NAME>``) and takes its defaults
    from this class; ``Settings.inference()`` builds one, so the server, ``--local`` and bulk
    jobs given the same settings run the same way and give the same labels.
    """

    device: str = "auto"
    backend: BackendName = "auto"
    cache_dir: str = ""  # where exports are cached ("": fcn_core.export.cache_dir's default)
    precision: Precision = "fp32"
    bucket_multiple: int = 32
    max_batch_size: int = 0
    max_batch_pixels: int = 4 * 1024 * 1024
    cpu_workers: int = 0
    torch_threads: int = 0
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    compile_mode: CompileMode = "default"
    cudnn_benchmark: bool = True

    def cpu_workers_for(self, device_type: str) -> int:
        """Parallel single-image passes on the CPU (one per usable core by default)."""
        if device_type != "cpu":
            return 1
        return self.cpu_workers or usable_cores()

    def max_batch_size_for(self, device_type: str) -> int:
        """Batches of 8 on a GPU; on the CPU one image per worker (batching does not make CPU
        convolutions faster, parallel single-image passes do)."""
        if self.max_batch_size:
            return self.max_batch_size
        return DEFAULT_GPU_BATCH if device_type != "cpu" else self.cpu_workers_for(device_type)

    def channels_last_for(self, device_type: str, backend: str) -> bool:
        """Channels-last (NHWC) tensors for torch: on the CPU by default, where oneDNN runs
        this model 1.2-1.5x faster with them (an interleaved A/B at 480x360 on a 2-core
        EPYC: 94.8 -> 79.2 ms on one thread, 101 -> 69 ms on two; README, Performance); on
        CUDA only when asked, until a GPU run measures it. The ONNX backends choose their
        own layouts."""
        if backend != "torch":
            return False
        if self.channels_last == "auto":
            return device_type == "cpu"
        return self.channels_last

    def threads_for(self, device_type: str, alone: bool) -> int:
        """Intra-op threads of one CPU forward pass: one on a pool worker (the batch's other
        images run beside it; more threads would only contend), every usable core for a pass
        run alone, so that a lone request is not left on one core (0 off the CPU)."""
        if device_type != "cpu":
            return 0
        return self.torch_threads or (usable_cores() if alone else 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def effective_precision(device: torch.device, precision: str, backend: str = "torch") -> str:
    """Autocast only on CUDA: bf16/fp16 on the CPU is slower and not what was validated.
    OpenVINO is the exception: it runs the reduced precision asked for, on its own CPU kernels."""
    if backend == "openvino" and precision in ("fp32", "bf16"):
        return precision
    if device.type != "cuda" and precision != "fp32":
        log.warning("precision %s applies on CUDA only; the CPU runs fp32", precision)
        return "fp32"
    return precision


def bucket_of(height: int, width: int, multiple: int) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def batch_capacity(bucket: tuple[int, int], max_batch_size: int, max_batch_pixels: int) -> int:
    """Images of this bucket per batch: the size limit, cut by the pixel budget (at least 1)."""
    return max(1, min(max_batch_size, max_batch_pixels // (bucket[0] * bucket[1])))


def plan_batches(
    sizes: Sequence[tuple[int, int]], multiple: int, max_batch_size: int, max_batch_pixels: int
) -> list[list[int]]:
    """Indices of images grouped into batches of one bucket each, within the capacity, in
    order of each bucket's first image (what the server's batcher does with a full queue)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(bucket_of(h, w, multiple), []).append(i)
    batches = []
    for bucket, members in groups.items():
        cap = batch_capacity(bucket, max_batch_size, max_batch_pixels)
        batches += [members[i : i + cap] for i in range(0, len(members), cap)]
    return batches


def compiled_batch_sizes(capacity: int) -> list[int]:
    """The batch sizes a compiled model runs: powers of two below ``capacity``, and it."""
    return sorted({1 << k for k in range(capacity.bit_length()) if 1 << k < capacity} | {capacity})


def allow_recompiles(shapes: int) -> None:
    """Let ``torch.compile`` keep ``shapes`` static-shape variants (its default is 8)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), shapes))


def pad_into(staging: np.ndarray, images: Sequence[object]) -> None:
    """Copy H x W x 3 images into the top left of their rows of an N x Hb x Wb x 3 staging
    array. Entries that are not arrays (JPEGs a server decodes on its device) are skipped."""
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            staging[i, : im.shape[0], : im.shape[1]] = im


def crop(
    labels: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    failed: dict[int, Exception] | None = None,
) -> list[np.ndarray | Exception]:
    """Each image's own H x W out of the padded N x Hb x Wb batch (or C x H x W out of
    N x C x Hb x Wb scores; copies: buffers are reused), or the error of an image that could
    not be decoded."""
    failed = failed or {}
    return [
        failed[i] if i in failed else labels[i, ..., :h, :w].copy()
        for i, (h, w) in enumerate(sizes)
    ]


class Predictor:
    """The model on its device: a padded uint8 batch in, uint8 label maps out.

    Any ``nn.Module`` that maps a normalised N x 3 x H x W float batch to N x C x H x W logits
    can be served on torch; the ONNX backends also need the weights' ``meta`` (they export
    the module, cached by its content hash). Only uint8 images go to the device and only
    uint8 label maps come back: logits never leave it.
    """

    def __init__(
        self,
        model: nn.Module,
        normalization: Normalization | Callable[[torch.Tensor], torch.Tensor],
        config: InferenceConfig = InferenceConfig(),
        device: torch.device | None = None,
        meta: WeightsMetadata | None = None,
    ) -> None:
        self.config = config
        self.device = device or resolve_device(config.device)
        self.backend = choose_backend(config.backend, self.device, meta)
        self.precision = effective_precision(self.device, config.precision, self.backend)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
        torch_backend = self.backend == "torch"
        if not torch_backend and (config.compile or config.channels_last is True):
            log.warning("compile and channels_last apply to the torch backend only")
        self._memory_format = (
            torch.channels_last
            if config.channels_last_for(self.device.type, self.backend)
            else torch.contiguous_format
        )
        # On the CPU the network stops before the final upsampling, and the labels are
        # finished from its coarse scores (fcn_core.final_upsampling: the same labels, less
        # time); on a GPU the full upsampling is cheap. Either way the frozen upsampling
        # layers run one filter per class (grouped_upsampling).
        self.model, self.final = served_network(model, coarse=self.device.type == "cpu")
        self.model.to(self.device, memory_format=self._memory_format).eval()
        self.compiled = torch_backend and config.compile
        self._net: Network = build_network(
            self.backend,
            torch.compile(self.model, dynamic=False, mode=config.compile_mode)
            if self.compiled
            else self.model,
            meta,
            self.device,
            workers=config.cpu_workers_for(self.device.type),
            cores=config.threads_for(self.device.type, alone=True),
            precision=self.precision,
            cache=config.cache_dir or None,
        )
        # CUDA graphs (reduce-overhead, max-autotune) record one graph per shape, on the
        # second call or so, and replay it from the third: warm-up runs every shape thrice.
        self.warmup_runs = 3 if self.compiled and config.compile_mode in CUDA_GRAPH_MODES else 1
        self._warmed_batch_sizes: dict[tuple[int, int], list[int]] = {}
        self.normalization = normalization
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        workers = config.cpu_workers_for(self.device.type)
        # CPU: one image per thread scales better than batching or intra-op threads; an image
        # run alone (a batch of one) takes every core instead.
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="fcn-cpu")
            if self.device.type == "cpu" and workers > 1
            else None
        )
        self._pool_threads = config.threads_for(self.device.type, alone=False)
        self._alone_threads = config.threads_for(self.device.type, alone=True)

    @property
    def bucket_multiple(self) -> int:
        return self.config.bucket_multiple

    def max_batch_size(self) -> int:
        return self.config.max_batch_size_for(self.device.type)

    def capacity(self, bucket: tuple[int, int]) -> int:
        return batch_capacity(bucket, self.max_batch_size(), self.config.max_batch_pixels)

    def batch_rows(self, bucket: tuple[int, int], images: int) -> int:
        """Rows to run for ``images`` of ``bucket``: compiled models round up to a warmed-up
        batch size (the extra rows are discarded), so serving never meets a shape that would
        compile or record a graph."""
        if not self.compiled:
            return images
        warmed = self._warmed_batch_sizes.get(bucket, [])
        return next((n for n in warmed if n >= images), images)

    def normalized(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """uint8 N x H x W x 3 -> normalised N x 3 x H x W with the padding set to zero."""
        x = x.permute(0, 3, 1, 2)
        if isinstance(self.normalization, Normalization):  # straight into the model's layout
            x = self.normalization(x, memory_format=self._memory_format)
        else:
            x = self.normalization(x.contiguous())
        for i, (h, w) in enumerate(sizes):
            x[i, :, h:, :] = 0
            x[i, :, :, w:] = 0
        return x

    def labels(self, x: torch.Tensor, images: int | None = None) -> torch.Tensor:
        """Normalised batch -> uint8 labels on the device. On the CPU with several workers,
        the first ``images`` rows (not the rows a compiled batch adds) run one per thread."""
        return self._per_row(self._labels, x, images)

    def scores(self, x: torch.Tensor, images: int | None = None) -> torch.Tensor:
        """Normalised batch -> float16 class scores (logits) on the device, for blending
        tiles: half the memory of float32, and far finer than the differences that decide a
        label once tiles are averaged."""
        return self._per_row(self._scores, x, images)

    def _per_row(
        self, run: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, images: int | None
    ) -> torch.Tensor:
        n = x.shape[0] if images is None else images
        if self._pool is not None and n > 1:
            rows = x[:n].split(1)
            return torch.cat(list(self._pool.map(run, rows, [self._pool_threads] * n)))
        return run(x, self._alone_threads)

    def _labels(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        out = self._forward(x, threads)
        if self.final is not None:
            with torch.inference_mode():
                return self.final.labels(self._checked(out, x, coarse=True), x.shape[-2:])
        # max().indices, not argmax(): the same first-maximum labels, but torch's CPU argmax
        # over a non-inner dimension is ~15x slower (34 vs 2 ms for 11 x 384 x 480).
        return self._checked(out, x).max(1).indices.to(torch.uint8)

    def _scores(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        out = self._forward(x, threads)
        if self.final is not None:
            with torch.inference_mode():
                out = self.final.logits(out, x.shape[-2:])
        return self._checked(out, x).to(torch.float16)

    def _forward(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """The network's output: logits, or coarse scores when ``final`` finishes them.
        grad and autocast modes are per thread, hence set here, in the thread that runs."""
        x = x.contiguous(memory_format=self._memory_format)
        with torch.inference_mode(), self._autocast():
            return self._net(x, threads)

    @staticmethod
    def _checked(logits: torch.Tensor, x: torch.Tensor, coarse: bool = False) -> torch.Tensor:
        """``logits`` if they fit ``x`` (N x C x H x W; ``coarse``: N x C at any size)."""
        size = logits.shape[-2:] if coarse else x.shape[-2:]
        if logits.shape[0] != x.shape[0] or logits.shape[-2:] != size:
            raise RuntimeError(
                f"model returned {tuple(logits.shape)} for input {tuple(x.shape)}; "
                "expected N x C x H x W logits"
            )
        if logits.shape[1] > 256:
            raise RuntimeError("more than 256 classes do not fit a uint8 label map")
        return logits

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype is None or self.backend != "torch":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def predict_host(
        self, host: torch.Tensor, sizes: Sequence[tuple[int, int]], scores: bool = False
    ) -> np.ndarray:
        """A padded uint8 N x Hb x Wb x 3 batch on the host -> N x Hb x Wb uint8 labels, or
        with ``scores`` N x C x Hb x Wb float16 class scores (synchronous: the CPU path, and
        any device for callers that hold the images)."""
        with torch.inference_mode():
            x = self.normalized(host.to(self.device), sizes)
            out = self.scores(x, len(sizes)) if scores else self.labels(x, len(sizes))
            return out.cpu().numpy()

    def staging_shape(self, images: Sequence[object]) -> tuple[int, int, int, int]:
        """N x Hb x Wb x 3: the padded batch that holds ``images`` (their shared bucket, and
        the rows a compiled model runs)."""
        sizes = [im.shape[:2] for im in images]  # type: ignore[attr-defined]
        bucket = bucket_of(max(h for h, _ in sizes), max(w for _, w in sizes), self.bucket_multiple)
        return self.batch_rows(bucket, len(images)), *bucket, 3

    def predict_padded(
        self, host: torch.Tensor, images: Sequence[np.ndarray], scores: bool = False
    ) -> list[np.ndarray]:
        """``images`` padded into ``host`` (a ``staging_shape`` buffer), run synchronously,
        each answer cropped back to its image's size: label maps, or with ``scores`` float16
        class scores."""
        sizes = [im.shape[:2] for im in images]
        pad_into(host.numpy(), images)
        return crop(self.predict_host(host, sizes, scores), sizes)  # type: ignore[return-value]

    def warmup_plan(self, sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
        """(height, width) -> the batch sizes to warm: 1 and the full batch of its bucket, or
        every size a compiled model will run."""
        plan = {}
        for h, w in sizes:
            full = self.capacity(bucket_of(h, w, self.bucket_multiple))
            plan[(h, w)] = compiled_batch_sizes(full) if self.compiled else [1, full]
        return plan

    def warmup(
        self,
        plan: dict[tuple[int, int], Sequence[int]],
        run: Callable[[list[np.ndarray]], object],
    ) -> None:
        """Call ``run`` on blank batches of every (height, width) -> batch sizes, so the first
        real images meet no cold start. Compiled, these are then the only batch sizes run for
        that bucket, and the compiler's shape cache is made to hold them all."""
        if self.compiled:
            allow_recompiles(sum(len(set(s)) for s in plan.values()) + 8)
        for (h, w), batch_sizes in plan.items():
            bucket = bucket_of(h, w, self.bucket_multiple)
            warmed = sorted(set(batch_sizes) | set(self._warmed_batch_sizes.get(bucket, [])))
            for n in sorted(set(batch_sizes)):
                for _ in range(self.warmup_runs):
                    run([np.zeros((h, w, 3), dtype=np.uint8)] * n)
            self._warmed_batch_sizes[bucket] = warmed


class Segmenter:
    """Images of any sizes -> label maps at their own sizes, batched by size bucket.

    For callers that hold their images: ``fcn-segment --local``, bulk jobs, notebooks::

        segmenter = Segmenter.from_weights("weights/fcn8s-mnv2-voc.safetensors")
        labels = segmenter.segment([rgb_a, rgb_b])  # H x W uint8 class maps
    """

    def __init__(
        self,
        model: nn.Module,
        normalization: Normalization | Callable[[torch.Tensor], torch.Tensor],
        config: InferenceConfig = InferenceConfig(),
        meta: WeightsMetadata | None = None,
    ) -> None:
        self.predictor = Predictor(model, normalization, config, meta=meta)
        self.meta = meta
        """The weights' metadata (needed by the ONNX backends; set ``from_weights``)."""

    @classmethod
    def from_weights(
        cls,
        path: str | Path,
        config: InferenceConfig = InferenceConfig(),
    ) -> Segmenter:
        loaded = load_weights(path, device="cpu")
        return cls(loaded.model, loaded.meta.normalization, config, loaded.meta)

    def predict_batch(self, images: Sequence[np.ndarray], scores: bool = False) -> list[np.ndarray]:
        """H x W x 3 uint8 images (any sizes; one bucket is fastest) -> their label maps, or
        with ``scores`` their C x H x W float16 class scores."""
        p = self.predictor
        staging = torch.zeros(p.staging_shape(images), dtype=torch.uint8)
        return p.predict_padded(staging, images, scores)

    def segment_tiled(self, image: np.ndarray, policy: TilePolicy) -> np.ndarray:
        """One image's label map at full resolution, from overlapping tiles (``fcn_core.tiling``)
        run in batches as large as the tile's bucket allows."""
        p = self.predictor
        return segment_tiled(
            image,
            lambda tiles: self.predict_batch(tiles, scores=True),
            policy,
            lambda h, w: p.capacity(bucket_of(h, w, p.bucket_multiple)),
        )

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Label maps for ``images``, in order; batches formed as the server forms them."""
        out: list[np.ndarray | None] = [None] * len(images)
        for indices, labels in self.segment_batches(images):
            for i, lab in zip(indices, labels, strict=True):
                out[i] = lab
        return out  # type: ignore[return-value]

    def segment_batches(
        self, images: Sequence[np.ndarray]
    ) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """(indices, label maps) per batch, as each batch finishes."""
        p = self.predictor
        sizes = [im.shape[:2] for im in images]
        for indices in plan_batches(
            sizes, p.bucket_multiple, p.max_batch_size(), p.config.max_batch_pixels
        ):
            yield indices, self.predict_batch([images[i] for i in indices])

    def warmup(self, sizes: Sequence[tuple[int, int]]) -> None:
        self.predictor.warmup(self.predictor.warmup_plan(sizes), self.predict_batch)
