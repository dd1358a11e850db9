"""What one running service holds: settings, metrics, the runner, the batcher, the codec pool.

Start-up and shutdown live here (the lifespan calls them in a thread) so that the order is in
one place: load, place on the device, warm up, start the worker, then report ready; on the
way out, report not-ready first, then drain the queue within a bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

from fcn_core.weights import WeightsMetadata
from service.batcher import DynamicBatcher
from service.loading import load_served_model
from service.metrics import Metrics
from service.runner import Runner
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class ServiceState:
    def __init__(
        self,
        settings: Settings,
        model: nn.Module | None = None,
        meta: WeightsMetadata | None = None,
    ) -> None:
        if (model is None) != (meta is None):
            raise ValueError("pass both model and meta, or neither")
        self.settings = settings
        self.metrics = Metrics()
        self._model = model
        self.meta = meta
        self.runner: Runner | None = None
        self.batcher: DynamicBatcher | None = None
        self.codec_pool = ThreadPoolExecutor(
            settings.resolved_codec_threads(), thread_name_prefix="fcn-codec"
        )
        self.ready = False
        self.not_ready_reason = "starting"

    @property
    def device(self) -> str:
        return str(self.runner.device) if self.runner else "none"

    @property
    def precision(self) -> str:
        return self.runner.precision if self.runner else self.settings.precision

    @property
    def backend(self) -> str:
        return self.runner.predictor.backend if self.runner else self.settings.backend

    def start(self) -> None:
        """Blocking: load, warm up, start the worker, report ready."""
        s = self.settings
        if self._model is None:
            loaded = load_served_model(s)
            self._model, self.meta = loaded.model, loaded.meta
        assert self.meta is not None
        self.runner = Runner(
            self._model,
            self.meta.normalization,
            s.inference(),
            self.metrics.oom_splits.inc,
            meta=self.meta,
        )
        self.batcher = DynamicBatcher.from_settings(s, self.runner, self.metrics)
        device = self.runner.device
        self.metrics.set_model(
            self.meta.arch,
            self.meta.backbone,
            self.meta.sha256,
            str(device),
            self.precision,
            self.backend,
        )
        if device.type == "cuda":
            self.metrics.watch_gpu_memory(
                lambda: torch.cuda.memory_allocated(device),
                lambda: torch.cuda.memory_reserved(device),
            )
        if s.warmup and s.warmup_shapes():
            self.not_ready_reason = "warming up"
            seconds = self.runner.warmup(s.warmup_shapes())
            log.info("warm-up of %s took %.2f s", s.warmup_sizes, seconds)
        self.batcher.start()
        self.ready = True
        self.not_ready_reason = ""
        log.info(
            "serving %s/%s (%s) on %s with %s, %s",
            self.meta.arch,
            self.meta.backbone,
            self.meta.sha256[:12],
            device,
            self.backend,
            self.precision,
        )

    def begin_shutdown(self) -> None:
        """Report not-ready at once (a load balancer stops sending), before the drain."""
        self.ready = False
        self.not_ready_reason = "shutting down"

    def stop(self) -> None:
        """Blocking: drain the queue for up to ``shutdown_timeout_s``, fail the rest."""
        self.begin_shutdown()
        if self.batcher is not None:
            self.batcher.stop(self.settings.shutdown_timeout_s)
        self.codec_pool.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> tuple[bool, str]:
        if not self.ready:
            return False, self.not_ready_reason
        if self.batcher is None or not self.batcher.running:
            return False, "the batch worker is not running"
        return True, ""

    async def in_codec_pool(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """Run CPU-bound codec work off the event loop; returns (result, seconds)."""
        loop = asyncio.get_running_loop()

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            return fn(*args), time.perf_counter() - start

        return await loop.run_in_executor(self.codec_pool, timed)
