"""The run's figures as Markdown, with the machine they came from at the top."""

from __future__ import annotations

from .records import BenchReport

STAGES = ("read", "decode", "queue", "inference", "encode")


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _met(v: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[v]


def markdown(report: BenchReport) -> str:
    m = report.machine
    lines = [
        f"# fcn-bench {report.created[:10]}: {m.device_name}",
        "",
        f"- Device: **{m.device}** ({m.device_name}); CPU {m.cpu_model}, {m.cpu_cores} cores, "
        f"{m.memory_gib} GiB; torch {m.torch}"
        + (f", CUDA {m.cuda}" if m.cuda else "")
        + f", Python {m.python}",
        f"- Load average at start: {m.load_average}; preset `{report.plan.preset}`; "
        f"run took {report.duration_s:.0f} s; code {report.code or 'unknown'}",
    ]
    lines += [f"- {n}" for n in report.notes]
    lines += ["", "## Targets", "", "| Target | Goal | Measured | Met |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.goal} | {t.measured} | {_met(t.met)} |" for t in report.targets]
    for s in report.scenarios:
        w, h = s.image_size
        if s.model:
            md = s.model
            lines += [
                "",
                f"## {s.name}: raw model, FCN-8s {s.backbone}, {w}x{h}",
                "",
                f"Weights: {s.weights}. Timed: {md.what_is_timed}. Measured dense matmul peak: "
                + ", ".join(f"{p} {v:.3f} TFLOP/s" for p, v in md.matmul_tflops.items())
                + ".",
                "",
                "| Backend | Size | Batch | Precision | channels_last | compiled | threads | img/s "
                "| ms/batch (p50) | GFLOP/img | TFLOP/s |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r.backend} | {r.width}x{r.height} | {r.batch} | {r.precision} "
                f"| {'on' if r.channels_last else 'off'} "
                f"| {'on' if r.compiled else 'off'} | {r.threads or 'default'} "
                f"| {r.images_per_s:.2f} "
                f"| {r.batch_ms_p50:.1f} | {r.gflop_per_image:.1f} | {r.achieved_tflops:.3f} |"
                for r in md.results
            ]
            for a in md.agreement:
                lines.append(
                    f"\n{a.backend} {a.precision} vs torch fp32 labels: {a.agreement:.4%} of "
                    f"{a.pixels} pixels "
                    f"agree ({a.images} real photos)."
                )
        if s.http:
            lines += [
                "",
                f"## {s.name}: HTTP, real {w}x{h} JPEGs, closed loop",
                "",
                "| Server | Concurrency | req/s | p50 ms | p90 ms | p99 ms | mean batch "
                "| errors | server p50 ms (" + " / ".join(STAGES) + ") |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for name, results in s.http.items():
                for r in results:
                    t = r.server_timing_ms_p50
                    stages = " / ".join(_fmt(t.get(k)) for k in STAGES) if t else "–"
                    errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
                    lines.append(
                        f"| {name} | {r.concurrency} | {r.throughput_rps:.2f} "
                        f"| {_fmt(r.latency_ms_p50)} | {_fmt(r.latency_ms_p90)} "
                        f"| {_fmt(r.latency_ms_p99)} | {_fmt(r.mean_batch_size, 2)} "
                        f"| {errors} | {stages} |"
                    )
    if report.memory:
        mem = report.memory
        samples = ", ".join(f"{n}: {v}" for n, v in mem.rss_mib_samples)
        lines += [
            "",
            "## Memory",
            "",
            f"Service RSS over {mem.requests} requests at concurrency {mem.concurrency} "
            f"({mem.seconds:.0f} s, errors {mem.errors or 0}): ready {mem.rss_mib_ready} MiB; "
            f"after N requests (MiB): {samples}; growth {mem.growth:+.1%} "
            f"(highest {mem.max_growth:+.1%}).",
        ]
    return "\n".join(lines) + "\n"
