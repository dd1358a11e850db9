"""What an ``fcn-bench`` run does: the plan per preset and device, and the scenarios it lists.

The plan is recorded in the results beside the figures, so that a figure can be reproduced;
everything here is data (no torch, no servers), so the run, its report and its targets can all
import it without importing each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from pydantic import BaseModel


@dataclass(frozen=True)
class Scenario:
    """One model on one workload: its raw sweep, then (``http``) the servers side by side."""

    name: str  # the targets look scenarios up by name ("lite0-camvid", "vgg16-voc")
    backbone: str  # of FCN-8s; untrained weights of it when the run has none to give
    workload: str  # bench.images.WORKLOADS: the photos' source and size
    precision: str = "fp32"  # FCN_PRECISION of the service (the plain server always runs fp32)
    trained: bool = False  # the run's weights (--weights, else the shipped file); else untrained
    http: bool = True  # serve it and drive the servers; else the raw model figures only
    trivial: bool = False  # also the service with its trivial model (the HTTP/codec ceiling)
    memory: bool = False  # then the service's RSS over the plan's memory run
    model_batches: tuple[int, ...] = ()  # raw model batch sizes; none: no raw sweep
    model_precisions: tuple[str, ...] = ("fp32",)
    model_compile: bool = False  # add compiled cases (channels_last, the service's precision)
    model_threads: tuple[int, ...] = (0,)  # CPU intra-op threads to sweep (0: torch's default)
    model_backends: tuple[str, ...] = ("torch",)  # CPU: fcn_core.backends, side by side
    model_sizes: tuple[tuple[int, int], ...] = ()  # (h, w) swept besides the workload's size
    model_iters: int = 10
    peers: tuple[str, ...] = ("baseline",)  # other servers of the same model, side by side


# The shipped model, as served: HTTP beside the plain server and the trivial-model service, then
# the memory run. The presets below set how much of its raw sweep they run.
LITE0 = Scenario(
    name="lite0-camvid",
    backbone="efficientnet_lite0",
    workload="camvid",
    trained=True,
    trivial=True,
    memory=True,
)
# The paper's FCN-8s VGG16 at its cost (untrained weights): raw figures; HTTP on a GPU only.
VGG16 = Scenario(name="vgg16-voc", backbone="vgg16", workload="voc", http=False)


class Plan(BaseModel):
    """Everything a run does; recorded in the results so that a figure can be reproduced."""

    preset: str
    device: str
    concurrency: list[int]
    requests_per_level: int  # at most, per server and level (at least 2 x concurrency)
    seconds_per_level: float  # at most, per server and level
    memory_requests: int
    memory_concurrency: int
    model_channels_last: list[bool]
    model_seconds: float
    service_env: dict[str, str]  # FCN_* settings the service runs with, besides precision
    # more configurations of the service, measured beside it: name -> FCN_* settings on top
    service_variants: dict[str, dict[str, str]] = {}
    scenarios: list[Scenario]  # in the order they run


def make_plan(preset: str, device: str) -> Plan:
    """The plan of a preset (smoke: checks the harness; quick; full) on this device."""
    cuda = device.startswith("cuda")
    if preset == "smoke":
        return Plan(
            preset=preset,
            device=device,
            concurrency=[1, 2],
            requests_per_level=4,
            seconds_per_level=20,
            memory_requests=8,
            memory_concurrency=2,
            model_channels_last=[False],
            model_seconds=5,
            service_env={"FCN_MAX_BATCH_SIZE": "2"},
            scenarios=[replace(LITE0, model_batches=(1,), model_iters=1)],
        )
    if cuda:
        full = preset == "full"
        precisions = ("fp32", "bf16", "fp16")
        return Plan(
            preset=preset,
            device=device,
            concurrency=[1, 4, 16, 64],
            requests_per_level=2000 if full else 400,
            seconds_per_level=30 if full else 10,
            memory_requests=2000 if full else 400,
            memory_concurrency=16,
            model_channels_last=[False, True],
            model_seconds=10,
            service_env={
                "FCN_MAX_BATCH_SIZE": "32",
                "FCN_MAX_BATCH_PIXELS": str(32 * 384 * 512),
                "FCN_MAX_QUEUE_SIZE": "256",
            },
            # Each fast-path switch measured against the service's defaults, in the same run.
            service_variants={
                "service-no-pipeline": {"FCN_PIPELINE_DEPTH": "1"},
                "service-channels-last": {"FCN_CHANNELS_LAST": "true"},
                "service-device-decode": {"FCN_DECODE_ON_DEVICE": "true"},
                "service-cuda-graphs": {
                    "FCN_COMPILE": "true",
                    "FCN_COMPILE_MODE": "reduce-overhead",
                },
            },
            scenarios=[
                replace(
                    LITE0,
                    precision="fp16",
                    model_batches=(1, 8, 16, 32),
                    model_precisions=precisions,
                    model_compile=full,
                    model_iters=30,
                ),
                replace(
                    VGG16,
                    precision="bf16",
                    http=True,
                    model_batches=(1, 8, 16, 32),
                    model_precisions=precisions,
                    model_compile=full,
                    model_iters=20,
                ),
            ],
        )
    quick = preset == "quick"
    # The intra-op threads: one (a pool worker's) and every core (an image run alone).
    threads = (1, 0)
    cores = len(os.sched_getaffinity(0))
    lite0 = replace(
        LITE0,
        model_batches=(1, cores) if cores > 1 else (1,),  # alone, and the service's CPU batch
        model_precisions=("fp32",) if quick else ("fp32", "bf16"),
        model_compile=not quick,
        model_threads=threads,
        model_backends=("torch", "onnxruntime", "openvino"),
        model_sizes=() if quick else ((736, 960),),
        model_iters=3 if quick else 8,
        peers=("baseline", "litserve"),
    )
    vgg16 = replace(VGG16, model_batches=(1,), model_threads=threads[:1], model_iters=2)
    return Plan(
        preset=preset,
        device=device,
        concurrency=[1, 8] if quick else [1, 8, 16],
        requests_per_level=16 if quick else 120,  # short levels swing by 10-15 %
        seconds_per_level=20 if quick else 40,
        memory_requests=200 if quick else 2000,
        memory_concurrency=8,
        model_channels_last=[False, True],
        model_seconds=10,
        service_env={},
        # The service's CPU defaults (FCN_BACKEND=auto; a worker per core, one thread each,
        # every core for a lone image) against each backend pinned, and GPU-style batching.
        service_variants={
            "service-torch": {"FCN_BACKEND": "torch"},
            "service-onnxruntime": {"FCN_BACKEND": "onnxruntime"},
            "service-openvino": {"FCN_BACKEND": "openvino"},
            "service-batching": {"FCN_CPU_WORKERS": "1", "FCN_MAX_BATCH_SIZE": "8"},
        },
        scenarios=[lite0] if quick else [lite0, vgg16],
    )


def select_variants(plan: Plan, names: str) -> None:
    """Keep only the named service variants ('none': none of them)."""
    wanted = [] if names.strip() == "none" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(plan.service_variants))
    if unknown:
        known = ", ".join(plan.service_variants) or "none"
        raise ValueError(f"unknown variants {unknown}; this plan has: {known}")
    plan.service_variants = {n: plan.service_variants[n] for n in wanted}
