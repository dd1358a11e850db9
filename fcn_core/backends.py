"""Runtimes that run the network: PyTorch, ONNX Runtime, OpenVINO, behind one small interface.

A :class:`Network` maps a normalised float N x 3 x H x W batch to the network's output on the
predictor's device: N x C x H x W logits, or on the CPU an FCN's coarse scores, which the
predictor finishes into labels (``fcn_core.final_upsampling``). The :class:`~fcn_core.inference.Predictor` owns everything around it
(normalisation with the padding zeroed, the one-image-per-thread pool on the CPU, the argmax,
the crop), so a backend changes only the arithmetic of the forward pass, and the batcher,
buckets, codecs and metrics never know which one runs.

Threading is the backend's: each call says how many cores it may use, 1 on a pool worker that
runs one image of a batch beside the others, every usable core for an image run alone. PyTorch
sets its (per-thread) intra-op thread count; ONNX Runtime keeps a session per thread count;
OpenVINO keeps a compiled model with one stream per worker for the pool and a latency-tuned one
for lone images. OpenVINO is pinned to f32: on CPUs with bf16 its default precision silently
changes labels (~2.4 % of pixels on this model); bf16 is used only when asked for.

The ONNX backends run the graph ``fcn-export`` makes, cached by the weights' content hash, so
only the first start with a new weights file pays for the export.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from fcn_core.export import INPUT
from fcn_core.models import CoarseScores
from fcn_core.weights import LoadedWeights, WeightsMetadata

log = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "openvino")

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    # Fastest first, by bench/results/2026-12-03-cpu-alone{,-run2}.md (2-core AMD EPYC,
    # 480x360 JPEGs, each server measured alone, labels from the coarse scores): req/s at
    # concurrency 8, ONNX Runtime 25.8 / 27.2 against OpenVINO 24.5 / 25.4 (and ahead in the
    # three -backends runs before: 28.1 / 19.8 / 20.9 against 19.3 / 18.5 / 18.4); p50 at
    # concurrency 1 a tie (74.8 / 49.7 against 57.1 / 46.3 ms); labels equal to torch's on
    # 100 % of pixels. A backend whose packages are not installed is skipped. GPUs: torch
    # until another runtime is measured against the CUDA path.
    "cpu": ("onnxruntime", "openvino", "torch"),
    "cuda": ("torch",),
}


class Network(Protocol):
    """A normalised float N x 3 x H x W batch on the device -> the served network's output
    (logits, or an FCN's coarse scores)."""

    name: str

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """``threads``: the cores this call may use (CPU); calls may run concurrently."""
        ...


_SET_THREADS = threading.Lock()


class TorchNetwork:
    """The module itself (optionally ``torch.compile``-d); intra-op threads set per call,
    as torch keeps the count per thread."""

    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        if self.device.type == "cpu" and threads and torch.get_num_threads() != threads:
            # The count is per thread, but setting it also rebuilds a process-wide thread
            # pool (pthreadpool), which is not safe from two threads at once: one at a time
            # (the CPU pool's threads all set theirs on their first image).
            with _SET_THREADS:
                torch.set_num_threads(threads)
        return self.module(x)


class OnnxRuntimeNetwork:
    """ONNX Runtime's CPU provider, one session per thread count (made on first use).

    Sessions run concurrent calls safely. The session of a lone image does not spin its
    threads between runs, so that they do not take cores from the pool's single-thread runs.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime  # noqa: F401  (fail at start, not on the first request)

        self.path = onnx_path
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()
        self.session(1)

    def session(self, threads: int):  # -> onnxruntime.InferenceSession
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                if threads > 1:
                    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._sessions[threads] = ort.InferenceSession(
                    str(self.path), options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[threads]

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        (out,) = self.session(max(1, threads)).run(None, {INPUT: x.numpy()})
        return torch.from_numpy(out)


class OpenVinoNetwork:
    """OpenVINO on the CPU: the pool's compiled model has one stream per worker (each call on
    one core), a lone image's is latency-tuned over every core. Infer requests are per thread
    (a thread's request is used by that thread alone)."""

    name = "openvino"

    def __init__(self, onnx_path: Path, workers: int, cores: int, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
        capable = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision != "fp32" and precision.upper() not in capable:
            # OpenVINO would quietly run f32 while the service reported the precision asked
            raise ValueError(
                f"precision {precision}: this CPU cannot run it in OpenVINO "
                f"(its capabilities: {', '.join(capable)}); use fp32"
            )
        model = core.read_model(str(onnx_path))
        common = {"INFERENCE_PRECISION_HINT": hint}
        self._pool = core.compile_model(
            model,
            "CPU",
            {
                **common,
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": workers,
                "INFERENCE_NUM_THREADS": workers,
            },
        )
        self._lone = core.compile_model(
            model,
            "CPU",
            {**common, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": cores},
        )
        # One infer request per (compiled model, thread), owned here rather than in the
        # threads' own storage: a pool thread that outlives this network would otherwise
        # destroy its requests after their compiled model was freed, which crashes.
        self._requests: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        compiled = self._pool if threads <= 1 else self._lone
        key = (id(compiled), threading.get_ident())
        with self._lock:
            request = self._requests.get(key)
            if request is None:
                request = self._requests[key] = compiled.create_infer_request()
        result = request.infer({0: x.numpy()})  # type: ignore[attr-defined]
        return torch.from_numpy(np.array(result[0]))  # a copy: the request reuses its output

    def __del__(self) -> None:
        self._requests.clear()  # the requests first, then the compiled models they run on


NEEDS: dict[str, tuple[str, ...]] = {
    "torch": (),
    "onnxruntime": ("onnxruntime", "onnx", "onnxscript"),  # dependencies of fcn-serve
    "openvino": ("openvino", "onnx", "onnxscript"),  # dependencies of fcn-serve too
}


class NetworkModule(nn.Module):
    """A network as a module, for code written against ``nn.Module`` (``fcn-eval``): each
    forward pass may use ``threads`` cores."""

    def __init__(self, network: Network, threads: int) -> None:
        super().__init__()
        self.network = network
        self.threads = threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, self.threads)


def missing(name: str) -> list[str]:
    """The packages a backend needs that are not installed."""
    import importlib.util

    return [m for m in NEEDS[name] if importlib.util.find_spec(m) is None]


def choose_backend(name: str, device: torch.device, meta: WeightsMetadata | None) -> str:
    """``auto`` -> the fastest installed backend for the device; anything else is checked.

    The ONNX backends export the weights, so they need the weights' metadata (a module served
    without it runs on torch)."""
    if name == "auto":
        if meta is None:
            return "torch"
        return next(b for b in AUTO_ORDER.get(device.type, ("torch",)) if not missing(b))
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name != "torch":
        if device.type != "cpu":
            raise ValueError(f"the {name} backend runs on the CPU; on {device} use torch")
        if meta is None:
            raise ValueError(f"the {name} backend needs a weights file's metadata to export")
        if absent := missing(name):
            raise ValueError(
                f"the {name} backend needs {', '.join(absent)}: pip install {' '.join(absent)}"
            )
    return name


def onnx_export(network: nn.Module, meta: WeightsMetadata, cache: str | Path | None) -> Path:
    """The cached ONNX export of the served network (an FCN's ``CoarseScores`` exports the
    coarse graph); in a temporary folder when the cache cannot be written (a read-only
    image), with a warning, rather than not starting."""
    from fcn_core.export import cache_dir, cached_export

    coarse = isinstance(network, CoarseScores)
    loaded = LoadedWeights(network.fcn if coarse else network, meta)  # type: ignore[arg-type]
    try:
        return cached_export(loaded, cache, coarse)
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="fcn-export-"))
        log.warning(
            "cannot write the export cache %s (%s); exporting to %s",
            cache_dir(cache),
            exc,
            fallback,
        )
        return cached_export(loaded, fallback, coarse)


def build_network(
    name: str,
    model: nn.Module,
    meta: WeightsMetadata | None,
    device: torch.device,
    *,
    workers: int,
    cores: int,
    precision: str = "fp32",
    cache: str | Path | None = None,
) -> Network:
    """The network for backend ``name`` (already chosen: see :func:`choose_backend`).
    ``model`` is the network to run (``served_network``): on the CPU for the ONNX backends,
    which export it, and on ``device`` (perhaps compiled) for torch."""
    if name == "torch":
        return TorchNetwork(model, device)
    assert meta is not None
    path = onnx_export(model, meta, cache)
    if name == "onnxruntime":
        return OnnxRuntimeNetwork(path)
    return OpenVinoNetwork(path, workers, cores, precision)
