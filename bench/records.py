"""What an ``fcn-bench`` run measured, as saved to ``bench/results/*.json``.

The figures per scenario, the memory run, the targets and the report that holds them: plain
data, so the run that fills them, the targets that judge them and the Markdown that shows them
all import this module and none of the others.
"""

from __future__ import annotations

from pydantic import BaseModel

from .http import LoadResult
from .machine import MachineInfo
from .model import ModelReport
from .plan import Plan


class ScenarioResult(BaseModel):
    """The figures of one ``plan.Scenario``."""

    name: str
    arch: str
    backbone: str
    weights: str
    workload: str
    image_size: tuple[int, int]  # width, height
    precision: str  # the service's (the plain server always runs fp32)
    model: ModelReport | None
    http: dict[str, list[LoadResult]]  # server -> one result per concurrency


class MemoryCheck(BaseModel):
    server: str
    requests: int
    concurrency: int
    errors: dict[str, int]
    rss_mib_ready: float  # before the first request of the whole run
    rss_mib_samples: list[tuple[int, float]]  # (requests done in this run, RSS MiB)
    growth: float  # last sample / first sample (before the run's first request) - 1
    max_growth: float  # highest sample / first sample - 1
    seconds: float


class TargetCheck(BaseModel):
    name: str
    goal: str
    measured: str
    ratio: float | None
    met: bool | None  # None: not measured in this run (device, preset, missing figure)


class BenchReport(BaseModel):
    created: str
    code: str | None = None  # git commit of the code measured, "+dirty" with local changes
    machine: MachineInfo
    plan: Plan
    duration_s: float
    scenarios: list[ScenarioResult]
    memory: MemoryCheck | None
    targets: list[TargetCheck]
    notes: list[str]
