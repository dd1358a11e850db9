"""Two weights files through the service, side by side: does a new model cost throughput?

Starts one ``fcn-serve`` per weights file (same settings, real uvicorn on loopback), then
drives them in interleaved rounds (A, B, A, B, ...) with the same 480x360 JPEGs at each
concurrency, so that drift of a shared machine falls on both alike; the best round of each
is reported (the least disturbed one). Prints a table and saves it as Markdown and JSON under
``bench/results/``.

    python -m bench.weights weights/fcn8s-lite0-camvid.safetensors \\
        weights/fcn8s-mnv2-voc.safetensors --concurrency 1 8 --requests 120 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .http import closed_loop
from .images import DEFAULT_DATA_ROOT, workload_jpegs
from .machine import describe
from .run import ENDPOINT, RESULTS_DIR, UPLOAD
from .servers import ServerSpec, alone, free_port, serve_all


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.weights", description=__doc__)
    p.add_argument("weights", nargs=2, type=Path, help="the two weights files")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=120, help="per round and concurrency")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, help="results stem (default bench/results/<date>-weights)")
    return p.parse_args(argv)


async def measure(url: str, payloads: list[bytes], concurrency: int, requests: int) -> dict:
    result = await closed_loop(
        url + ENDPOINT,
        payloads,
        concurrency,
        max_requests=requests,
        max_seconds=600,
        warmup_requests=concurrency,
        upload=UPLOAD,
    )
    return {"req_s": result.throughput_rps, "p50_ms": result.latency_ms_p50, "ok": result.ok}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    payloads = workload_jpegs("camvid", 8, args.data_root)
    specs = []
    for i, weights in enumerate(args.weights):
        port = free_port()
        argv_ = ["-m", "service", "--host", "127.0.0.1", "--port", str(port)]
        specs.append(
            ServerSpec(
                f"w{i}-{weights.stem}",
                argv_,
                port,
                "/readyz",
                {"FCN_WEIGHTS": str(weights.resolve())},
            )
        )
    best: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as logs, serve_all(specs, Path(logs)) as servers:
        for _ in range(args.rounds):
            for c in args.concurrency:
                for spec in specs:
                    with alone(servers, spec.name) as server:
                        got = asyncio.run(measure(server.base_url, payloads, c, args.requests))
                    key = (spec.name, c)
                    if key not in best or got["req_s"] > best[key]["req_s"]:
                        best[key] = got
    rows = [
        "| weights | " + " | ".join(f"c={c} req/s | c={c} p50 ms" for c in args.concurrency) + " |"
    ]
    rows.append("|---|" + "---|---|" * len(args.concurrency))
    for spec, weights in zip(specs, args.weights, strict=True):
        cells = [
            f"{best[(spec.name, c)]['req_s']:.2f} | {best[(spec.name, c)]['p50_ms']:.1f}"
            for c in args.concurrency
        ]
        rows.append(f"| `{weights.name}` | " + " | ".join(cells) + " |")
    a, b = (specs[0].name, specs[1].name)
    ratios = {c: best[(b, c)]["req_s"] / best[(a, c)]["req_s"] for c in args.concurrency}
    info = describe("cpu")
    machine = f"{info.device_name}, load {info.load_average}"
    text = "\n".join(
        [
            f"# Weights side by side ({dt.date.today()})",
            "",
            f"Machine: {machine}. 480x360 JPEGs, {args.requests} requests per round and level, "
            f"{args.rounds} interleaved rounds, best round shown; service defaults.",
            "",
            *rows,
            "",
            "Throughput of the second over the first: "
            + ", ".join(f"c={c}: {r:.3f}x" for c, r in ratios.items()),
        ]
    )
    print(text)
    stem = args.out or RESULTS_DIR / f"{dt.date.today()}-weights"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(text + "\n")
    record = {
        "machine": machine,
        "weights": [str(w) for w in args.weights],
        "best": {f"{name}@c={c}": v for (name, c), v in best.items()},
        "ratios": {str(c): r for c, r in ratios.items()},
    }
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
