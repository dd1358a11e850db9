"""The Prometheus metrics, on a registry of their own.

One registry per app (not the process-global default) so that several apps in one process,
as in the tests, never collide, and ``/metrics`` shows exactly this service. Names are part
of the API (dashboards and alerts depend on them): base units, histograms for durations.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from service.repository import ServedModel

REJECT_REASONS = (
    "queue_full",
    "timeout",
    "too_large",
    "bad_input",
    "unauthorized",
    "disconnected",
    "shutting_down",
    "unknown_model",
)

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's series (its ``model`` label bound): what its batcher and runner record."""

    queue_wait: Histogram
    inference_duration: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    images: Counter
    oom_splits: Counter


class Metrics:
    """Every series that concerns one model carries a ``model`` label (the name it is served
    under), so a dashboard can show models apart or summed; the PromQL equivalents of
    Triton's ``nv_inference_*`` names are in the README."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "fcn_request_duration_seconds",
            "Time from request arrival to the end of the response, by route, status and model "
            "(empty for routes that serve none).",
            ["endpoint", "status", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "fcn_queue_wait_seconds",
            "Time an image waited in the batch queue, from arrival to dispatch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "fcn_inference_duration_seconds",
            "Time of one batch on the device: normalise, forward, argmax, copy out "
            "(CUDA events on a GPU, so time queued behind the previous batch is not counted).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fcn_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "fcn_queue_depth", "Images waiting in the queue.", ["model"], registry=r
        )
        self.rejected = Counter(
            "fcn_requests_rejected",
            "Requests answered with an error or not computed, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.images = Counter("fcn_images", "Images segmented (computed).", ["model"], registry=r)
        self.oom_splits = Counter(
            "fcn_oom_splits",
            "Batches split in two and retried after a CUDA out-of-memory error.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "fcn_model_info",
            "A served model (value 1): its name, version (content hash, short) and how it runs.",
            [
                "model",
                "version",
                "arch",
                "backbone",
                "weights_hash",
                "device",
                "precision",
                "backend",
            ],
            registry=r,
        )
        self.model_memory = Gauge(
            "fcn_model_memory_bytes",
            "Memory a model took when it was loaded (CUDA memory on a GPU, resident memory "
            "on a CPU).",
            ["model"],
            registry=r,
        )
        self.gpu_memory: Gauge | None = None
        self._per_model = (
            self.queue_wait,
            self.inference_duration,
            self.batch_size,
            self.queue_depth,
            self.images,
            self.oom_splits,
            self.model_memory,
        )

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(
            queue_wait=self.queue_wait.labels(name),
            inference_duration=self.inference_duration.labels(name),
            batch_size=self.batch_size.labels(name),
            queue_depth=self.queue_depth.labels(name),
            images=self.images.labels(name),
            oom_splits=self.oom_splits.labels(name),
        )

    def set_model(self, served: ServedModel) -> None:
        """The info series of a model just installed (the one it replaced is dropped)."""
        self._clear_info(served.name)
        meta, p = served.meta, served.runner.predictor
        self.model_info.labels(
            served.name,
            served.version,
            meta.arch,
            meta.backbone,
            meta.sha256,
            str(p.device),
            p.precision,
            p.backend,
        ).set(1)
        self.model_memory.labels(served.name).set(served.memory_bytes)

    def forget_model(self, name: str) -> None:
        """An unloaded model's series go: a dashboard should not show it as served."""
        self._clear_info(name)
        for metric in self._per_model:
            with suppress(KeyError):
                metric.remove(name)

    def _clear_info(self, name: str) -> None:
        for sample in list(self.model_info.collect()[0].samples):
            if sample.labels.get("model") == name:
                with suppress(KeyError):
                    self.model_info.remove(*sample.labels.values())

    def watch_gpu_memory(
        self, allocated: Callable[[], float], reserved: Callable[[], float]
    ) -> None:
        """Registered only when serving on CUDA, read at scrape time."""
        self.gpu_memory = Gauge(
            "fcn_gpu_memory_bytes",
            "CUDA memory of this process, allocated by tensors and reserved by the allocator.",
            ["kind"],
            registry=self.registry,
        )
        self.gpu_memory.labels("allocated").set_function(allocated)
        self.gpu_memory.labels("reserved").set_function(reserved)

    def render(self) -> bytes:
        return generate_latest(self.registry)
