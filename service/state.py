"""What one running service holds: settings, metrics, the model repository, the codec pool.

Start-up and shutdown live here (the lifespan calls them in a thread) so that the order is in
one place: load and warm up every model (``service/repository.py``), then report ready; on the
way out, report not-ready first, then drain every model's queue within a bound. The default
model's runner, batcher and metadata are reachable directly, for the routes that serve it.
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
from service.metrics import Metrics
from service.repository import ModelRepository, ServedModel
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
        self.repository = ModelRepository(settings, self.metrics)
        self._given = (model, meta)
        self.codec_pool = ThreadPoolExecutor(
            settings.resolved_codec_threads(), thread_name_prefix="fcn-codec"
        )
        self.ready = False
        self.not_ready_reason = "starting"

    # -- the default model ------------------------------------------------------------------

    @property
    def default(self) -> ServedModel | None:
        try:
            return self.repository.get()
        except LookupError:
            return None

    @property
    def runner(self) -> Runner | None:
        return self.default.runner if self.default else None

    @property
    def batcher(self) -> DynamicBatcher | None:
        return self.default.batcher if self.default else None

    @property
    def meta(self) -> WeightsMetadata | None:
        return self.default.meta if self.default else None

    @property
    def device(self) -> str:
        return str(self.runner.device) if self.runner else "none"

    @property
    def precision(self) -> str:
        return self.runner.precision if self.runner else self.settings.precision

    @property
    def backend(self) -> str:
        return self.runner.predictor.backend if self.runner else self.settings.backend

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Blocking: load and warm up every model, start their workers, report ready."""
        self.not_ready_reason = "loading and warming up"
        self.repository.start(*self._given)
        self._given = (None, None)
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            device = torch.device(self.device)
            self.metrics.watch_gpu_memory(
                lambda: torch.cuda.memory_allocated(device),
                lambda: torch.cuda.memory_reserved(device),
            )
        self.ready = True
        self.not_ready_reason = ""
        log.info(
            "ready: %s (default %s)",
            ", ".join(self.repository.names()),
            self.repository.default_name,
        )

    def begin_shutdown(self) -> None:
        """Report not-ready at once (a load balancer stops sending), before the drain."""
        self.ready = False
        self.not_ready_reason = "shutting down"

    def stop(self) -> None:
        """Blocking: drain every queue for up to ``shutdown_timeout_s``, fail the rest."""
        self.begin_shutdown()
        self.repository.stop(self.settings.shutdown_timeout_s)
        self.codec_pool.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> tuple[bool, str]:
        if not self.ready:
            return False, self.not_ready_reason
        default = self.default
        if default is None:
            return False, f"the default model {self.repository.default_name!r} is not loaded"
        if not default.batcher.running:
            return False, "the batch worker is not running"
        return True, ""

    async def in_codec_pool(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """Run CPU-bound codec work off the event loop; returns (result, seconds)."""
        loop = asyncio.get_running_loop()

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            return fn(*args), time.perf_counter() - start

        return await loop.run_in_executor(self.codec_pool, timed)
