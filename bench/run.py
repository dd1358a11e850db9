"""``fcn-bench``: the model's ceiling, the service and the plain server, side by side, one run.

Steps, all on this machine: (1) the raw model sweep (``bench.model``); (2) the service, the
plain server (``bench.baseline_server``) and the service with its trivial model (the
HTTP/codec ceiling), each a real uvicorn subprocess on loopback, driven by the closed-loop
generator (``bench.http``) at each concurrency, the servers taking turns at each level so
that a drift in machine load hits them alike; (3) the service's resident memory over a long
run; then the targets of the issue as measured ratios. Writes
``bench/results/<date>-<device>[-tag].json`` and the same figures as a Markdown table.

    fcn-bench                  # full run for this device (CPU: about 10 minutes on 2 cores)
    fcn-bench --preset smoke   # seconds: checks that the harness works, measures nothing
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel

from bench.http import LoadResult, Upload, closed_loop
from bench.images import DEFAULT_DATA_ROOT, WORKLOADS, workload_jpegs
from bench.machine import MachineInfo, default_device, describe
from bench.model import ModelReport, randomise_scores, run_sweep, sweep_cases
from bench.report import markdown
from bench.servers import ServerProcess, ServerSpec, free_port, serve_all
from bench.targets import TargetCheck, check_targets
from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE, VOC_CLASSES, VOC_PALETTE
from fcn_core.models import build_model
from fcn_core.models.backbones import default_normalization
from fcn_core.weights import WeightsMetadata, read_metadata, save_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = REPO_ROOT / "weights" / "fcn8s-lite0-camvid.safetensors"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
ENDPOINT = "/segment"
UPLOAD = Upload(field="image")  # what service.client sends: multipart field "image"


class Plan(BaseModel):
    """Everything a run does; recorded in the results so that a figure can be reproduced."""

    preset: str
    device: str
    concurrency: list[int]
    requests_per_level: int  # at most, per server and level (at least 2 x concurrency)
    seconds_per_level: float  # at most, per server and level
    memory_requests: int
    memory_concurrency: int
    model_batches: list[int]
    model_precisions: list[str]
    model_channels_last: list[bool]
    model_compile: bool  # add torch.compile'd cases (channels_last, the service's precision)
    model_threads: list[int] = [0]  # CPU intra-op threads to sweep (0: torch's default)
    model_iters: int
    model_seconds: float
    vgg16_http: bool  # the FCN-8s VGG16 scenario through HTTP (GPU); else its raw figures only
    vgg16_model_batches: list[int]
    vgg16_model_iters: int
    service_env: dict[str, str]  # FCN_* settings the service runs with, besides precision
    # more configurations of the service, measured beside it: name -> FCN_* settings on top
    service_variants: dict[str, dict[str, str]] = {}
    lite0_precision: str = "fp32"  # FCN_PRECISION of the service per scenario (CUDA only)
    vgg16_precision: str = "fp32"


def make_plan(preset: str, device: str) -> Plan:
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
            model_batches=[1],
            model_precisions=["fp32"],
            model_channels_last=[False],
            model_compile=False,
            model_iters=1,
            model_seconds=5,
            vgg16_http=False,
            vgg16_model_batches=[],
            vgg16_model_iters=0,
            service_env={"FCN_MAX_BATCH_SIZE": "2"},
        )
    if cuda:
        return Plan(
            preset=preset,
            device=device,
            concurrency=[1, 4, 16, 64],
            requests_per_level=2000 if preset == "full" else 400,
            seconds_per_level=30 if preset == "full" else 10,
            memory_requests=2000 if preset == "full" else 400,
            memory_concurrency=16,
            model_batches=[1, 8, 16, 32],
            model_precisions=["fp32", "bf16", "fp16"],
            model_channels_last=[False, True],
            model_compile=preset == "full",
            model_iters=30,
            model_seconds=10,
            vgg16_http=True,
            vgg16_model_batches=[1, 8, 16, 32],
            vgg16_model_iters=20,
            lite0_precision="fp16",
            vgg16_precision="bf16",
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
        )
    quick = preset == "quick"
    return Plan(
        preset=preset,
        device=device,
        concurrency=[1, 8] if quick else [1, 4, 8, 16],
        requests_per_level=16 if quick else 120,  # short levels swing by 10-15 %
        seconds_per_level=20 if quick else 40,
        memory_requests=200 if quick else 2000,
        memory_concurrency=8,
        model_batches=[1, 8],
        model_precisions=["fp32"] if quick else ["fp32", "bf16"],
        model_channels_last=[False, True],
        model_compile=not quick,
        model_threads=[1, 0],
        model_iters=3 if quick else 8,
        model_seconds=10,
        vgg16_http=False,
        vgg16_model_batches=[] if quick else [1],
        vgg16_model_iters=2,
        service_env={},
        # The service's CPU defaults (a worker per core, one torch thread each) against GPU-style
        # batching on intra-op threads, and each switch on top of the defaults.
        service_variants={
            "service-batching": {"FCN_CPU_WORKERS": "1", "FCN_MAX_BATCH_SIZE": "8"},
            "service-no-pipeline": {"FCN_PIPELINE_DEPTH": "1"},
            "service-device-decode": {"FCN_DECODE_ON_DEVICE": "true"},
        },
    )


class Scenario(BaseModel):
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


class BenchReport(BaseModel):
    created: str
    code: str | None = None  # git commit of the code measured, "+dirty" with local changes
    machine: MachineInfo
    plan: Plan
    duration_s: float
    scenarios: list[Scenario]
    memory: MemoryCheck | None
    targets: list[TargetCheck]
    notes: list[str]


def untrained_weights(directory: Path, backbone: str) -> Path:
    """A weights file for timing when none is shipped: untrained backbone, random scores."""
    classes, palette = (
        (CAMVID_CLASSES, CAMVID_PALETTE) if backbone != "vgg16" else (VOC_CLASSES, VOC_PALETTE)
    )
    torch.manual_seed(0)
    model = randomise_scores(build_model("fcn8s", len(classes), backbone))
    path = directory / f"untrained-fcn8s-{backbone}.safetensors"
    meta = WeightsMetadata(
        arch="fcn8s",
        backbone=backbone,
        class_names=list(classes),
        palette=[list(c) for c in palette],
        normalization=default_normalization(backbone),
        notes="untrained, for benchmarking only",
    )
    save_weights(path, model, meta)
    return path


def server_specs(
    weights: Path, workload: str, precision: str, plan: Plan, trivial: bool
) -> list[ServerSpec]:
    """The plain server, the service, its variants and (optionally) the trivial-model one."""
    w, h, _ = WORKLOADS[workload]
    common = {
        "FCN_DEVICE": plan.device,
        "FCN_WARMUP_SIZES": f"{w}x{h}",
        "FCN_PRECISION": precision,
        **plan.service_env,
    }
    services = {"service": {**common, "FCN_WEIGHTS": str(weights)}}
    for name, env in plan.service_variants.items():
        services[name] = {**common, **env, "FCN_WEIGHTS": str(weights)}
    if trivial:
        services["service-trivial"] = {**common, "FCN_TRIVIAL_MODEL": "true"}
    port = free_port()
    baseline_argv = ["-m", "bench.baseline_server", "--weights", str(weights)]
    specs = [
        ServerSpec(
            "baseline",
            [*baseline_argv, "--port", str(port), "--device", plan.device],
            port,
            "/healthz",
        )
    ]
    for name, env in services.items():
        port = free_port()
        argv = ["-m", "service.cli", "--host", "127.0.0.1", "--port", str(port)]
        specs.append(ServerSpec(name, [*argv, "--log-level", "warning"], port, "/readyz", env))
    return specs


def load_sweep(
    running: dict[str, ServerProcess],
    payloads: Sequence[bytes],
    plan: Plan,
    log: Callable[[str], None],
) -> dict[str, list[LoadResult]]:
    """Each concurrency level, each server in turn (order alternating between levels)."""
    results: dict[str, list[LoadResult]] = {name: [] for name in running}
    names = list(running)
    for i, c in enumerate(plan.concurrency):
        for name in names if i % 2 == 0 else names[::-1]:
            server = running[name]
            r = asyncio.run(
                closed_loop(
                    server.base_url + ENDPOINT,
                    payloads,
                    c,
                    max_requests=max(plan.requests_per_level, 2 * c),
                    max_seconds=plan.seconds_per_level,
                    warmup_requests=c,
                    metrics_url=server.base_url + "/metrics",
                    upload=UPLOAD,
                )
            )
            log(
                f"  {name:16s} c={c:<3d} {r.throughput_rps:8.2f} req/s  p50 {r.latency_ms_p50} ms"
                f"  p99 {r.latency_ms_p99} ms  batch {r.mean_batch_size}  errors {r.errors}"
            )
            results[name].append(r)
    return results


def memory_run(
    server: ServerProcess,
    payloads: Sequence[bytes],
    requests: int,
    concurrency: int,
    rss_ready: int,
) -> MemoryCheck:
    """``requests`` requests in 20 chunks, the server's RSS read before and after each chunk.

    It runs after the concurrency sweep, whose batches of every size have already grown the
    allocators to their working set, so growth here is what a long-running replica sees."""
    chunk = max(1, requests // 20)
    done = 0
    samples: list[tuple[int, float]] = [(0, round(server.rss_bytes() / 2**20, 1))]
    errors: dict[str, int] = {}
    start = time.perf_counter()
    while done < requests:
        n = min(chunk, requests - done)
        r = asyncio.run(
            closed_loop(
                server.base_url + ENDPOINT,
                payloads,
                min(concurrency, n),
                max_requests=n,
                max_seconds=3600,
                upload=UPLOAD,
            )
        )
        done += r.requests
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
        samples.append((done, round(server.rss_bytes() / 2**20, 1)))
    return MemoryCheck(
        server=server.name,
        requests=done,
        concurrency=concurrency,
        errors=errors,
        rss_mib_ready=round(rss_ready / 2**20, 1),
        rss_mib_samples=samples,
        growth=round(samples[-1][1] / samples[0][1] - 1, 4),
        max_growth=round(max(v for _, v in samples) / samples[0][1] - 1, 4),
        seconds=round(time.perf_counter() - start, 1),
    )


def run_scenario(
    name: str,
    weights: Path,
    weights_note: str,
    workload: str,
    precision: str,
    plan: Plan,
    *,
    http: bool,
    trivial: bool,
    memory: bool,
    model_batches: list[int],
    model_iters: int,
    model_precisions: list[str],
    compile_cases: bool,
    model_threads: list[int],
    data_root: Path,
    log_dir: Path,
    log: Callable[[str], None],
) -> tuple[Scenario, MemoryCheck | None]:
    meta = read_metadata(weights)
    w, h, _ = WORKLOADS[workload]
    model_report = None
    if model_batches:
        log(f"[{name}] raw model, {w}x{h}")
        cases = sweep_cases(
            [(w, h)],
            model_batches,
            model_precisions,
            plan.model_channels_last,
            [False],
            model_threads,
        )
        if compile_cases:  # compiling takes minutes on the CPU: batch 1 only there
            batches = model_batches if plan.device.startswith("cuda") else model_batches[:1]
            cases += sweep_cases([(w, h)], batches, [precision], [True], [True], model_threads[:1])
        model_report = run_sweep(
            cases,
            device=plan.device,
            weights=weights,
            iters=model_iters,
            max_seconds=plan.model_seconds,
            data_root=data_root,
            log=lambda s: log("  " + s),
        )
        model_report.weights = weights_note
    results: dict[str, list[LoadResult]] = {}
    check = None
    if http:
        payloads = workload_jpegs(workload, 8, data_root)
        log(f"[{name}] HTTP, {len(payloads)} real {w}x{h} JPEGs, concurrency {plan.concurrency}")
        specs = server_specs(weights, workload, precision, plan, trivial)
        with serve_all(specs, log_dir) as running:
            rss_ready = running["service"].rss_bytes()
            results = load_sweep(running, payloads, plan, log)
            if memory and plan.memory_requests:
                log(f"[{name}] memory: {plan.memory_requests} requests to the service")
                check = memory_run(
                    running["service"],
                    payloads,
                    plan.memory_requests,
                    plan.memory_concurrency,
                    rss_ready,
                )
                log(f"  RSS {check.rss_mib_samples[0][1]} -> {check.rss_mib_samples[-1][1]} MiB")
    scenario = Scenario(
        name=name,
        arch=meta.arch,
        backbone=meta.backbone,
        weights=weights_note,
        workload=workload,
        image_size=(w, h),
        precision=precision,
        model=model_report,
        http=results,
    )
    return scenario, check


def select_variants(plan: Plan, names: str) -> None:
    """Keep only the named service variants ('none': none of them)."""
    wanted = [] if names.strip() == "none" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(plan.service_variants))
    if unknown:
        known = ", ".join(plan.service_variants) or "none"
        raise ValueError(f"unknown variants {unknown}; this plan has: {known}")
    plan.service_variants = {n: plan.service_variants[n] for n in wanted}


def code_version() -> str | None:
    """The commit measured, so figures can be traced to code; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def display_path(path: Path) -> str:
    """Repository-relative when inside it, so results do not record a home directory."""
    full = path.resolve()
    return str(full.relative_to(REPO_ROOT) if full.is_relative_to(REPO_ROOT) else path)


def result_stem(machine: MachineInfo, tag: str, when: dt.datetime) -> str:
    return f"{when:%Y-%m-%d}-{machine.slug}" + (f"-{tag}" if tag else "")


def run(
    plan: Plan,
    *,
    weights: Path | None,
    data_root: Path,
    out_dir: Path,
    tag: str,
    notes: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> tuple[BenchReport, Path]:
    started = time.perf_counter()
    code = code_version()  # at the start: the servers this run spawns import this code
    notes = list(notes)
    machine = describe(plan.device)
    log(f"fcn-bench ({plan.preset}) on {machine.device_name}, torch {machine.torch}")
    with tempfile.TemporaryDirectory(prefix="fcn-bench-") as tmp:
        tmpdir = Path(tmp)
        if weights is None and SHIPPED_WEIGHTS.is_file():
            weights = SHIPPED_WEIGHTS
        if weights is None:
            weights = untrained_weights(tmpdir, "efficientnet_lite0")
            note = (
                "untrained FCN-8s Lite0 (no shipped weights yet): same cost, labels not meaningful"
            )
            notes.append(note)
        else:
            note = display_path(weights)
        scenarios = []
        lite0, memory = run_scenario(
            "lite0-camvid",
            weights,
            note,
            "camvid",
            plan.lite0_precision,
            plan,
            http=True,
            trivial=True,
            memory=True,
            model_batches=plan.model_batches,
            model_iters=plan.model_iters,
            model_precisions=plan.model_precisions,
            compile_cases=plan.model_compile,
            model_threads=plan.model_threads,
            data_root=data_root,
            log_dir=tmpdir / "logs",
            log=log,
        )
        scenarios.append(lite0)
        if plan.vgg16_http or plan.vgg16_model_batches:
            vgg = untrained_weights(tmpdir, "vgg16")
            vgg_note = "untrained FCN-8s VGG16 (timing only; same FLOPs as the reference net)"
            vgg_precisions = plan.model_precisions if plan.vgg16_http else ["fp32"]
            scenario, _ = run_scenario(
                "vgg16-voc",
                vgg,
                vgg_note,
                "voc",
                plan.vgg16_precision,
                plan,
                http=plan.vgg16_http,
                trivial=False,
                memory=False,
                model_batches=plan.vgg16_model_batches,
                model_iters=plan.vgg16_model_iters,
                model_precisions=vgg_precisions,
                compile_cases=plan.model_compile and plan.vgg16_http,
                model_threads=plan.model_threads[:1],
                data_root=data_root,
                log_dir=tmpdir / "logs",
                log=log,
            )
            scenarios.append(scenario)
    when = dt.datetime.now(dt.timezone.utc)
    report = BenchReport(
        created=when.isoformat(timespec="seconds"),
        code=code,
        machine=machine,
        plan=plan,
        duration_s=round(time.perf_counter() - started, 1),
        scenarios=scenarios,
        memory=memory,
        targets=[],
        notes=notes,
    )
    report.targets = check_targets(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(machine, tag, when)
    stem.with_suffix(".json").write_text(report.model_dump_json(indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    log(f"wrote {stem}.json and {stem}.md in {report.duration_s:.0f} s")
    return report, stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="fcn-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=["full", "quick", "smoke"], default="full")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--weights", type=Path, help=f"default: {SHIPPED_WEIGHTS.name} if present")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--concurrency", help="override the preset's levels, e.g. 1,8")
    p.add_argument("--memory-requests", type=int, help="override the preset's memory run")
    p.add_argument(
        "--variants",
        help="service variants to run besides the defaults, comma-separated, or 'none' "
        "(default: all of the preset's; a GPU run may need splitting to fit a time limit)",
    )
    p.add_argument(
        "--note",
        action="append",
        default=[],
        help="context to keep with the figures, e.g. 'a training run shared the CPU'",
    )
    a = p.parse_args(argv)
    plan = make_plan(a.preset, a.device)
    if a.concurrency:
        plan.concurrency = [int(c) for c in a.concurrency.split(",")]
    if a.memory_requests is not None:
        plan.memory_requests = a.memory_requests
    if a.variants is not None:
        try:
            select_variants(plan, a.variants)
        except ValueError as exc:
            p.error(str(exc))
    run(
        plan,
        weights=a.weights,
        data_root=a.data_root,
        out_dir=a.out_dir,
        tag=a.tag,
        notes=a.note,
    )


if __name__ == "__main__":
    main()
