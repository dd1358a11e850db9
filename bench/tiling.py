"""Very large images through the service: tiled at full resolution against downscaled.

Starts ``fcn-serve`` (real uvicorn on loopback, the shipped default weights and settings,
a deadline long enough for the largest image) and posts JPEGs stitched from real photos, one
at a time: each size with ``?tile=auto`` (the default: full resolution in tiles) and
``?tile=off`` (downscaled to ``FCN_MAX_SIDE``, the label map scaled back). Reports the latency
(best and median of the repeats), the server's own stage times (``Server-Timing``), the
number of tiles and the server's peak resident memory while each size ran. Prints a table
and saves Markdown and JSON under ``bench/results/``.

    python -m bench.tiling --sizes 4000x3000 8000x6000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fcn_core.tiling import TilePolicy, plan_tiles
from service.settings import parse_size

from .images import DEFAULT_DATA_ROOT
from .machine import describe
from .run import RESULTS_DIR
from .servers import ServerSpec, free_port, serve_all


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tiling", description=__doc__)
    p.add_argument("--sizes", nargs="+", default=["4000x3000", "8000x6000"], help="WxH")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, help="results stem (default bench/results/<date>-tiling)")
    return p.parse_args(argv)


def stitched_jpeg(width: int, height: int, data_root: Path) -> bytes:
    """A JPEG of real photos, 4 x 3 cells of ``voc-photos`` resized to fill the size."""
    paths = sorted((data_root / "voc-photos").rglob("*.jpg"))[:120:10]
    if len(paths) < 12:
        raise SystemExit(f"need 12 photos under {data_root / 'voc-photos'}")
    cw, ch = width // 4, height // 3
    cells = [np.asarray(Image.open(p).convert("RGB").resize((cw, ch))) for p in paths]
    rows = [np.concatenate(cells[r * 4 : (r + 1) * 4], 1) for r in range(3)]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, 0)).resize((width, height)).save(
        buf, format="JPEG", quality=90
    )
    return buf.getvalue()


class PeakRss:
    """Polls a process's resident memory in a thread; ``peak`` is the most seen."""

    def __init__(self, server) -> None:  # a bench.servers.ServerProcess
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_bytes())
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: decode;dur=12.3, ...`` -> {stage: milliseconds}."""
    stages = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            stages[name] = float(rest)
    return stages


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    spec = ServerSpec(
        "fcn-serve",
        ["-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        port,
        "/readyz",
        {"FCN_REQUEST_TIMEOUT_S": "600", "FCN_MAX_BODY_BYTES": str(64 * 2**20)},
    )
    policy = TilePolicy()
    results = []
    with tempfile.TemporaryDirectory() as logs, serve_all([spec], Path(logs)) as servers:
        server = servers["fcn-serve"]
        with httpx.Client(base_url=server.base_url, timeout=900) as client:
            for size in args.sizes:
                h, w = parse_size(size)
                data = stitched_jpeg(w, h, args.data_root)
                for mode in ("auto", "off"):
                    seconds, stages = [], []
                    with PeakRss(server) as rss:
                        for _ in range(args.repeats):
                            start = time.perf_counter()
                            answer = client.post(
                                "/segment",
                                params={"tile": mode},
                                content=data,
                                headers={"Content-Type": "image/jpeg"},
                            )
                            seconds.append(time.perf_counter() - start)
                            if answer.status_code != 200:
                                raise SystemExit(f"{size} tile={mode}: {answer.text}")
                            stages.append(server_timing(answer.headers["Server-Timing"]))
                    tiles = sum(map(len, plan_tiles(h, w, policy.size, policy.overlap)))
                    results.append(
                        {
                            "size": size,
                            "tile": mode,
                            "tiles": tiles if mode == "auto" else 0,
                            "jpeg_mb": round(len(data) / 2**20, 1),
                            "best_s": round(min(seconds), 2),
                            "median_s": round(statistics.median(seconds), 2),
                            "stages_ms": stages[int(np.argmin(seconds))],
                            "peak_rss_mb": round(rss.peak / 2**20),
                        }
                    )
                    print(json.dumps(results[-1]), flush=True)
    info = describe("cpu")
    machine = f"{info.device_name}, {info.cpu_cores} cores, load {info.load_average}"
    rows = [
        "| image | tile | tiles | best s | median s | inference ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['size']} ({r['jpeg_mb']} MB JPEG) | {r['tile']} | {r['tiles'] or '-'} | "
            f"{r['best_s']} | {r['median_s']} | {r['stages_ms'].get('inference', 0):.0f} | "
            f"{r['peak_rss_mb']} |"
        )
    text = "\n".join(
        [
            f"# Very large images: tiled against downscaled ({dt.date.today()})",
            "",
            f"Machine: {machine}. `fcn-serve` with the shipped default weights and defaults "
            f"(tiles {policy.size} px, {policy.overlap} shared), FCN_REQUEST_TIMEOUT_S=600; "
            f"one request at a time, {args.repeats} repeats. `off` downscales to FCN_MAX_SIDE.",
            "",
            *rows,
        ]
    )
    print(text)
    stem = args.out or RESULTS_DIR / f"{dt.date.today()}-tiling"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(text + "\n")
    Path(f"{stem}.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
