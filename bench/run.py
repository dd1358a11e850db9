"""``fcn-bench``: the model's ceiling, the service and the plain server, side by side, one run.

Steps, all on this machine: (1) the raw model sweep (``bench.model``); (2) the service, the
plain server (``bench.baseline_server``) and the service with its trivial model (the
HTTP/codec ceiling), each a real uvicorn subprocess on loopback, driven by the closed-loop
generator (``bench.http``) at each concurrency, the servers taking turns at each level so
that a drift in machine load hits them alike; (3) the service's resident memory over a long
run; then the targets of the issue as measured ratios. Writes
``bench/results/<date>-<device>[-tag].json`` and the same figures as a Markdown table.
What a run does is its plan (``bench.plan``: the scenarios it lists, in order); what it saves
is ``bench.records``.

    fcn-bench                  # full run for this device (CPU: about 10 minutes on 2 cores)
    fcn-bench --preset smoke   # seconds: checks that the harness works, measures nothing
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fcn_client.wire import IMAGE_FIELD
from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE, VOC_CLASSES, VOC_PALETTE
from fcn_core.models import build_model
from fcn_core.models.backbones import default_normalization
from fcn_core.shipped import CAMVID_WEIGHTS_NAME, default_weights_dir
from fcn_core.weights import WeightsMetadata, read_metadata, save_weights

from .http import LoadResult, Upload, closed_loop
from .images import DEFAULT_DATA_ROOT, WORKLOADS, workload_jpegs
from .machine import MachineInfo, default_device, describe
from .model import backend_cases, randomise_scores, run_sweep, sweep_cases
from .plan import Plan, Scenario, make_plan, select_variants
from .records import BenchReport, MemoryCheck, ScenarioResult
from .report import markdown
from .servers import ServerProcess, ServerSpec, alone, free_port, serve_all
from .targets import check_targets

REPO_ROOT = Path(__file__).resolve().parents[1]
CAMVID_WEIGHTS = default_weights_dir() / CAMVID_WEIGHTS_NAME  # the CamVid scenario's model
RESULTS_DIR = REPO_ROOT / "bench" / "results"
ENDPOINT = "/segment"
UPLOAD = Upload(field=IMAGE_FIELD)  # what fcn_client sends
# What the results say of the weights a scenario timed when it had no trained ones.
UNTRAINED_NOTES = {
    "efficientnet_lite0": "untrained FCN-8s Lite0 (no shipped weights yet): same cost, labels not "
    "meaningful",
    "vgg16": "untrained FCN-8s VGG16 (timing only; same FLOPs as the reference net)",
}


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


def server_specs(scenario: Scenario, weights: Path, plan: Plan) -> list[ServerSpec]:
    """The plain server, the service, its variants and (optionally) the trivial-model one."""
    w, h, _ = WORKLOADS[scenario.workload]
    common = {
        "FCN_DEVICE": plan.device,
        "FCN_WARMUP_SIZES": f"{w}x{h}",
        "FCN_PRECISION": scenario.precision,
        **plan.service_env,
    }
    services = {"service": {**common, "FCN_WEIGHTS": str(weights)}}
    for name, env in plan.service_variants.items():
        services[name] = {**common, **env, "FCN_WEIGHTS": str(weights)}
    if scenario.trivial:
        services["service-trivial"] = {**common, "FCN_TRIVIAL_MODEL": "true"}
    specs = [peer_spec(name, weights, plan.device) for name in scenario.peers]
    for name, env in services.items():
        port = free_port()
        argv = ["-m", "service.cli", "--host", "127.0.0.1", "--port", str(port)]
        specs.append(ServerSpec(name, [*argv, "--log-level", "warning"], port, "/readyz", env))
    return specs


PEERS = {
    # name -> (module of this package, how it takes the image)
    "baseline": ("baseline_server", UPLOAD),
    "litserve": ("litserve_server", Upload(field=IMAGE_FIELD, json_base64=True)),
}


def peer_spec(name: str, weights: Path, device: str) -> ServerSpec:
    """A peer server of the same weights (bench.baseline_server, bench.litserve_server)."""
    module, upload = PEERS[name]
    if name == "litserve" and importlib.util.find_spec("litserve") is None:
        raise SystemExit("the LitServe peer needs litserve: pip install 'fcn-serve[bench]'")
    port = free_port()
    # This package's own name: "bench" in the repository, "fcn_bench" where installed.
    argv = ["-m", f"{__package__}.{module}", "--weights", str(weights)]
    argv += ["--port", str(port), "--device", device]
    return ServerSpec(name, argv, port, "/healthz", upload=upload)


def load_sweep(
    running: dict[str, ServerProcess],
    payloads: Sequence[bytes],
    plan: Plan,
    log: Callable[[str], None],
) -> dict[str, list[LoadResult]]:
    """Each concurrency level, each server in turn (order alternating between levels), the
    others paused meanwhile (``alone``)."""
    results: dict[str, list[LoadResult]] = {name: [] for name in running}
    names = list(running)
    for i, c in enumerate(plan.concurrency):
        for name in names if i % 2 == 0 else names[::-1]:
            with alone(running, name) as server:
                r = asyncio.run(
                    closed_loop(
                        server.base_url + ENDPOINT,
                        payloads,
                        c,
                        max_requests=max(plan.requests_per_level, 2 * c),
                        max_seconds=plan.seconds_per_level,
                        warmup_requests=c,
                        metrics_url=server.base_url + "/metrics",
                        upload=server.upload or UPLOAD,
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
    scenario: Scenario,
    plan: Plan,
    weights: Path,
    weights_note: str,
    *,
    data_root: Path,
    log_dir: Path,
    log: Callable[[str], None],
) -> tuple[ScenarioResult, MemoryCheck | None]:
    """The scenario's raw model sweep, then its servers under load, then its memory run."""
    name, precision = scenario.name, scenario.precision
    meta = read_metadata(weights)
    w, h, _ = WORKLOADS[scenario.workload]
    model_report = None
    if scenario.model_batches:
        log(f"[{name}] raw model, {w}x{h}")
        batches, threads = list(scenario.model_batches), list(scenario.model_threads)
        sizes = [(h, w), *scenario.model_sizes]
        cases = sweep_cases(
            sizes,
            batches,
            scenario.model_precisions,
            plan.model_channels_last,
            [False],
            threads,
        )
        if not plan.device.startswith("cuda"):
            cases += backend_cases(sizes, batches, threads, scenario.model_backends)
        if scenario.model_compile:  # compiling takes minutes on the CPU: batch 1 only there
            compiled = batches if plan.device.startswith("cuda") else batches[:1]
            cases += sweep_cases([(h, w)], compiled, [precision], [True], [True], threads[:1])
        model_report = run_sweep(
            cases,
            device=plan.device,
            weights=weights,
            iters=scenario.model_iters,
            max_seconds=plan.model_seconds,
            data_root=data_root,
            log=lambda s: log("  " + s),
        )
        model_report.weights = weights_note
    results: dict[str, list[LoadResult]] = {}
    check = None
    if scenario.http:
        payloads = workload_jpegs(scenario.workload, 8, data_root)
        log(f"[{name}] HTTP, {len(payloads)} real {w}x{h} JPEGs, concurrency {plan.concurrency}")
        with serve_all(server_specs(scenario, weights, plan), log_dir) as running:
            rss_ready = running["service"].rss_bytes()
            results = load_sweep(running, payloads, plan, log)
            if scenario.memory and plan.memory_requests:
                log(f"[{name}] memory: {plan.memory_requests} requests to the service")
                with alone(running, "service") as service:
                    check = memory_run(
                        service,
                        payloads,
                        plan.memory_requests,
                        plan.memory_concurrency,
                        rss_ready,
                    )
                log(f"  RSS {check.rss_mib_samples[0][1]} -> {check.rss_mib_samples[-1][1]} MiB")
    result = ScenarioResult(
        name=name,
        arch=meta.arch,
        backbone=meta.backbone,
        weights=weights_note,
        workload=scenario.workload,
        image_size=(w, h),
        precision=precision,
        model=model_report,
        http=results,
    )
    return result, check


def scenario_weights(scenario: Scenario, weights: Path | None, directory: Path) -> tuple[Path, str]:
    """The file the scenario times and what the results say of it: the run's weights for a
    scenario that wants trained ones, when there are any; else untrained ones made here."""
    if scenario.trained and weights is not None:
        return weights, display_path(weights)
    return untrained_weights(directory, scenario.backbone), UNTRAINED_NOTES[scenario.backbone]


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
        if weights is None and CAMVID_WEIGHTS.is_file():
            weights = CAMVID_WEIGHTS
        scenarios: list[ScenarioResult] = []
        memory = None
        for scenario in plan.scenarios:
            path, note = scenario_weights(scenario, weights, tmpdir)
            if scenario.trained and weights is None:
                notes.append(note)  # figures of untrained weights where trained were meant
            result, check = run_scenario(
                scenario, plan, path, note, data_root=data_root, log_dir=tmpdir / "logs", log=log
            )
            scenarios.append(result)
            memory = memory or check  # the report holds one: the scenario with memory=True
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
    p.add_argument("--weights", type=Path, help=f"default: {CAMVID_WEIGHTS.name} if present")
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
