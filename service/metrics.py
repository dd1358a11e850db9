"""The Prometheus metrics, on a registry of their own.

One registry per app (not the process-global default) so that several apps in one process,
as in the tests, never collide, and ``/metrics`` shows exactly this service. Names are part
of the API (dashboards and alerts depend on them): base units, histograms for durations.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REJECT_REASONS = (
    "queue_full",
    "timeout",
    "too_large",
    "bad_input",
    "unauthorized",
    "disconnected",
    "shutting_down",
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "fcn_request_duration_seconds",
            "Time from request arrival to the end of the response, by route and status.",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "fcn_queue_wait_seconds",
            "Time an image waited in the batch queue, from arrival to dispatch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "fcn_inference_duration_seconds",
            "Time of one batch on the device: normalise, forward, argmax, copy out "
            "(CUDA events on a GPU, so time queued behind the previous batch is not counted).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fcn_batch_size", "Images per forward pass.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("fcn_queue_depth", "Images waiting in the queue.", registry=r)
        self.rejected = Counter(
            "fcn_requests_rejected",
            "Requests answered with an error or not computed, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.images = Counter("fcn_images", "Images segmented (computed).", registry=r)
        self.oom_splits = Counter(
            "fcn_oom_splits",
            "Batches split in two and retried after a CUDA out-of-memory error.",
            registry=r,
        )
        self.model_info = Gauge(
            "fcn_model_info",
            "The served model (value 1).",
            ["arch", "backbone", "weights_hash", "device", "precision", "backend"],
            registry=r,
        )
        self.gpu_memory: Gauge | None = None

    def set_model(
        self,
        arch: str,
        backbone: str,
        weights_hash: str,
        device: str,
        precision: str,
        backend: str,
    ) -> None:
        self.model_info.labels(arch, backbone, weights_hash, device, precision, backend).set(1)

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
