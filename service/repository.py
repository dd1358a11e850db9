"""The model repository: the models one service serves, by name, loaded and swapped without
downtime.

Where the models come from (``Settings.model_sources``): ``FCN_WEIGHTS`` set, one model; else
``FCN_MODELS``, a list; else every ``*.safetensors`` in ``FCN_MODEL_REPOSITORY`` (default: the
shipped ``weights/``), each named by its file stem. Each :class:`ServedModel` has its own
runner and batcher, so one model's queue never holds up another's requests; on one device
their batches interleave.

A load builds the new model beside the old one, warms it, and only then swaps it in under the
lock, so new requests go to it at once; requests that hold the old one (a :meth:`lease`, taken
before they submit and given back after they answer) finish on it, and it is stopped and freed
after the last one. A load that fails (a missing, corrupt or foreign file) raises and leaves
the serving model untouched. A poller (``FCN_REPOSITORY_POLL_S``) applies what changed in the
folder: files added, replaced (size or modification time), removed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fcn_core.weights import WeightsError, WeightsMetadata
from service.batcher import DynamicBatcher
from service.loading import load_model_file, trivial_model
from service.metrics import Metrics
from service.runner import Runner
from service.settings import Settings

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; known: {', '.join(known) or 'none'}")
        self.name = name
        self.known = known


@dataclass
class ServedModel:
    name: str
    meta: WeightsMetadata
    runner: Runner
    batcher: DynamicBatcher
    source: Path | None  # the weights file; None for a module given in code
    stamp: tuple[int, int] | None  # (size, mtime_ns) of the file when loaded
    memory_bytes: int  # what loading it took: CUDA memory on a GPU, resident memory else
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0
    tile_slot: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    """Held while an image of this model is blended from tiles (service/stages.py)."""
    tiled_waiting: int = 0  # requests waiting for the tile slot

    @property
    def version(self) -> str:
        """The weights' content hash, short: what X-Model-Version and model_version say."""
        return self.meta.sha256[:12]

    @property
    def ready(self) -> bool:
        return self.batcher.running


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def resident_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ModelRepository:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Condition()  # the dict, the leases
        self._loading = threading.Lock()  # one load at a time: memory, and a clear order
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._failed: dict[str, tuple[int, int] | None] = {}  # name -> stamp that failed
        self.default_name = ""

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def models(self) -> list[ServedModel]:
        with self._lock:
            return [self._models[n] for n in sorted(self._models)]

    def get(self, name: str | None = None) -> ServedModel:
        with self._lock:
            key = name or self.default_name
            if key not in self._models:
                raise UnknownModel(key, sorted(self._models))
            return self._models[key]

    @contextmanager
    def lease(self, name: str | None = None) -> Iterator[ServedModel]:
        """The model ``name`` (the default if None), kept running until the block ends even
        if it is replaced meanwhile."""
        with self._lock:
            served = self.get(name)
            served.leases += 1
        try:
            yield served
        finally:
            with self._lock:
                served.leases -= 1
                self._lock.notify_all()

    # -- loading ---------------------------------------------------------------------------

    def start(self, model: nn.Module | None = None, meta: WeightsMetadata | None = None) -> None:
        """Load every configured model (or the module given in code) and start the poller."""
        s = self.settings
        if model is None and s.trivial_model:
            stand_in = trivial_model()
            model, meta = stand_in.model, stand_in.meta
            self.default_name = "trivial"
        elif model is not None:
            self.default_name = s.default_model or Path(s.weights).stem
        if model is not None:
            assert meta is not None
            self._install(self._build(self.default_name, None, model, meta))
            return
        sources = s.model_sources()
        self.default_name = s.resolved_default_model(list(sources))
        for name, path in sources.items():
            self.load(name, path)
        if s.repository_watched() and s.repository_poll_s > 0:
            self._poller = threading.Thread(target=self._poll, name="fcn-repository", daemon=True)
            self._poller.start()

    def load(self, name: str, path: Path | None = None) -> ServedModel:
        """Load ``path`` (default: the model's own file, or ``<repository>/<name>.safetensors``)
        as ``name``, beside any model of that name, then swap. Raises ``WeightsError``,
        ``FileNotFoundError`` or ``ValueError`` and changes nothing if it cannot load."""
        with self._loading:
            try:
                path = path or self._path_of(name)
                if not path.is_file():
                    raise WeightsError(f"{path}: no such weights file")
                loaded = load_model_file(path)
                served = self._build(name, path, loaded.model, loaded.meta)
            except Exception as exc:
                current = self._models.get(name)
                keeps = f"; {name} {current.version} keeps serving" if current else ""
                log.error("model %s not loaded from %s: %s%s", name, path, exc, keeps)
                raise
            self._install(served)
            return served

    def unload(self, name: str) -> None:
        with self._loading, self._lock:
            if name not in self._models:
                raise UnknownModel(name, sorted(self._models))
            old = self._models.pop(name)
        self.metrics.forget_model(name)
        self._retire(old)
        log.info("unloaded %s (%s)", name, old.version)

    def _path_of(self, name: str) -> Path:
        with self._lock:
            current = self._models.get(name)
        if current is not None and current.source is not None:
            return current.source
        sources = self.settings.model_sources()
        if name in sources:
            return sources[name]
        folder = self.settings.resolved_repository()
        if folder is None:
            raise WeightsError(f"no weights file for model {name!r}, and no repository folder")
        return folder / f"{name}.safetensors"

    def _build(
        self, name: str, path: Path | None, model: nn.Module, meta: WeightsMetadata
    ) -> ServedModel:
        s = self.settings
        config = s.inference()
        device_memory = _device_memory(config.device)
        before = device_memory() if device_memory else resident_bytes()
        metrics = self.metrics.for_model(name)
        runner = Runner(model, meta.normalization, config, metrics.oom_splits.inc, meta=meta)
        batcher = DynamicBatcher.from_settings(s, runner, metrics)
        if s.warmup and s.warmup_shapes():
            seconds = runner.warmup(s.warmup_shapes())
            log.info("%s: warm-up of %s took %.2f s", name, s.warmup_sizes, seconds)
        batcher.start()
        after = device_memory() if device_memory else resident_bytes()
        return ServedModel(
            name=name,
            meta=meta,
            runner=runner,
            batcher=batcher,
            source=path,
            stamp=file_stamp(path) if path else None,
            memory_bytes=max(0, after - before),
        )

    def _install(self, served: ServedModel) -> None:
        with self._lock:
            old = self._models.get(served.name)
            self._models[served.name] = served  # new requests take this one from now on
        self.metrics.set_model(served)
        p = served.runner.predictor
        log.info(
            "serving %s = %s/%s (%s) on %s with %s, %s%s",
            served.name,
            served.meta.arch,
            served.meta.backbone,
            served.version,
            p.device,
            p.backend,
            p.precision,
            f", replacing {old.version}" if old else "",
        )
        if old is not None:
            threading.Thread(
                target=self._retire, args=(old,), name=f"fcn-retire-{old.name}", daemon=True
            ).start()

    def _retire(self, old: ServedModel) -> None:
        """Stop ``old`` once the requests that hold it have answered, then free it."""
        timeout = self.settings.request_timeout_s + self.settings.shutdown_timeout_s
        with self._lock:
            self._lock.wait_for(lambda: old.leases == 0, timeout=timeout)
        old.batcher.stop(self.settings.shutdown_timeout_s)
        old.runner = old.batcher = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the folder ------------------------------------------------------------------------

    def scan(self) -> None:
        """Apply what changed in the repository folder since the last look."""
        wanted = self.settings.model_sources()
        with self._lock:
            current = {n: m for n, m in self._models.items() if m.source is not None}
        for name, path in wanted.items():
            served, stamp = current.get(name), file_stamp(path)
            if (served is None or stamp != served.stamp) and self._failed.get(name) != stamp:
                try:
                    self.load(name, path)
                    self._failed.pop(name, None)
                except Exception:  # a file caught half-written, or broken: load() logged it
                    self._failed[name] = stamp  # tried again once the file changes
        for name in set(current) - set(wanted):
            with suppress(UnknownModel):  # unloaded meanwhile
                self.unload(name)

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.repository_poll_s):
            try:
                self.scan()
            except Exception:
                log.exception("repository scan failed")

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        for served in self.models():
            served.batcher.stop(timeout_s)


def _device_memory(device: str):  # -> Callable[[], int] | None
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.memory_allocated
    return None
