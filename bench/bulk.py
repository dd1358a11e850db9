"""Bulk throughput: the same real photos through each way of segmenting many images at once.

Images per second on N photos (default 500 from ``shared/data/voc-photos``, mixed sizes),
each way a fresh subprocess timed from start to exit, so the model's load (and Ray's start)
count, as a bulk job pays them once:

- ``ray``: ``fcn-segment-bulk --ray --actors 2`` (a local Ray started by the command);
- ``bulk``: ``fcn-segment-bulk`` in its own process;
- ``local``: ``fcn-segment --local``;
- ``server``: ``fcn-segment -j 8`` against ``fcn-serve`` on loopback (started and ready
  before the clock starts: a server is up before a job comes).

The tools' own figures are kept beside the wall-clock ones, and every way's label PNGs are
compared with the server's (the same ``FCN_*`` settings reach all four, so they should be
byte-identical). Results: ``bench/results/<date>-<device>-bulk[-tag].{json,md}``.

    python -m bench.bulk                  # 500 photos, every way
    python -m bench.bulk --count 20       # a check that it runs end to end
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from .images import DEFAULT_DATA_ROOT, source_files
from .machine import MachineInfo, default_device, describe
from .run import CAMVID_WEIGHTS, RESULTS_DIR, code_version, display_path, result_stem
from .servers import ServerSpec, free_port, serve_all

PHOTO_FOLDERS = ("voc-photos/coco", "voc-photos/imagenet-cls", "voc-photos/imagenet-det")
WAYS = ("ray", "bulk", "local", "server")
# "N/M images segmented in T s": both command lines end with this summary.
SUMMARY = re.compile(r"(\d+)/(\d+) images segmented in ([\d.]+) s")


class BulkRun(BaseModel):
    """One way, one run."""

    name: str
    command: list[str]
    exit_code: int
    images: int
    segmented: int
    wall_s: float
    images_per_s: float  # segmented / wall_s
    tool_s: float | None  # the time the tool's own summary gives
    tool_images_per_s: float | None
    differ_from_server: int | None  # label PNGs not byte-identical to the server's (or missing)


class BulkReport(BaseModel):
    created: str
    code: str | None
    machine: MachineInfo
    count: int
    weights: str
    photos: str
    settings: dict[str, str]  # the FCN_* variables every way ran with
    runs: list[BulkRun]
    load_average_after: tuple[float, float, float] | None
    duration_s: float
    notes: list[str]


def link_photos(data_root: Path, count: int, folder: Path) -> list[Path]:
    """``count`` real photos as symbolic links under ``folder`` (their subfolder kept)."""
    photos = source_files(data_root, PHOTO_FOLDERS, count)
    for photo in photos:
        link = folder / photo.parent.name / photo.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(photo)
    return photos


def timed(
    name: str, cmd: list[str], env: dict[str, str], images: int, log: Callable[[str], None]
) -> BulkRun:
    """Run ``cmd`` to its end and read its summary line."""
    log(f"{name}: {' '.join(cmd[1:])}")
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    found = SUMMARY.search(done.stdout)
    segmented = int(found[1]) if found else 0
    tool_s = float(found[3]) if found else None
    if done.returncode != 0 or not found:
        log(f"{name}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    run = BulkRun(
        name=name,
        command=[Path(cmd[0]).name, *cmd[1:]],
        exit_code=done.returncode,
        images=images,
        segmented=segmented,
        wall_s=round(wall, 2),
        images_per_s=round(segmented / wall, 2),
        tool_s=tool_s,
        tool_images_per_s=round(segmented / tool_s, 2) if tool_s else None,
        differ_from_server=None,
    )
    log(f"{name}: {segmented}/{images} in {wall:.1f} s = {run.images_per_s} images/s")
    return run


def way_command(way: str, photos: Path, out: Path, args: argparse.Namespace) -> list[str]:
    bulk = [sys.executable, "-m", "fcn_client.bulk_cli", str(photos), "-o", str(out)]
    bulk += ["--batch-size", str(args.batch_size), "--no-progress"]
    segment = [sys.executable, "-m", "fcn_client", str(photos), "-o", str(out), "--no-progress"]
    return {
        "ray": [*bulk, "--ray", "--actors", str(args.actors)],
        "bulk": bulk,
        "local": [*segment, "--local"],
        "server": [*segment, "-j", str(args.concurrency)],  # --server added once it runs
    }[way]


def differing(out: Path, reference: Path) -> int:
    """Label PNGs under ``reference`` that ``out`` lacks or holds with other bytes."""
    count = 0
    for ref in reference.rglob("*.png"):
        mine = out / ref.relative_to(reference)
        count += not mine.is_file() or mine.read_bytes() != ref.read_bytes()
    return count


def run_ways(
    ways: Sequence[str], photos: Path, work: Path, env: dict[str, str], args: argparse.Namespace
) -> list[BulkRun]:
    """Each way in turn, alone on the machine (the server only during its own turn)."""
    runs = []
    for way in ways:
        cmd = way_command(way, photos, work / way, args)
        if way == "server":
            port = free_port()
            argv = ["-m", "service.cli", "--host", "127.0.0.1", "--port", str(port)]
            spec = ServerSpec("fcn-serve", [*argv, "--log-level", "warning"], port, "/readyz", env)
            with serve_all([spec], work / "logs") as running:
                cmd += ["--server", running["fcn-serve"].base_url]
                runs.append(timed(way, cmd, env, args.count, args.log))
        else:
            runs.append(timed(way, cmd, env, args.count, args.log))
    if "server" in ways:
        for run in runs:
            run.differ_from_server = differing(work / run.name, work / "server")
    return runs


def markdown(report: BulkReport) -> str:
    m = report.machine
    lines = [
        f"# Bulk throughput, {report.created[:10]}",
        "",
        f"{report.count} photos ({report.photos}), weights `{report.weights}`, on "
        f"{m.device_name} ({m.cpu_cores} cores, {m.memory_gib} GiB), torch {m.torch}, "
        f"load average before {m.load_average}, after {report.load_average_after}; "
        f"code {report.code}; {report.duration_s:.0f} s in all.",
        f"Settings: {report.settings or 'defaults'}.",
        "",
        "| Way | Command | Images | Wall s | Images/s (wall) | Tool's s | Images/s (tool) | PNGs not the server's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        cmd = " ".join(a for a in r.command[1:] if "/" not in a)  # no temporary paths
        lines.append(
            f"| {r.name} | `{cmd}` | {r.segmented}/{r.images} | {r.wall_s} | {r.images_per_s} "
            f"| {r.tool_s} | {r.tool_images_per_s} | {r.differ_from_server} |"
        )
    lines += [
        "",
        "Wall: the subprocess from start to exit (the model's load, and Ray's start for "
        "`ray`, included; the server's start not: it ran before). Tool's: the time in the "
        "command's own summary (fcn-segment counts from its first image, its model loaded; "
        "fcn-segment-bulk from its start).",
    ]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> BulkReport:
    p = argparse.ArgumentParser(
        prog="python -m bench.bulk",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--count", type=int, default=500, help="photos (500)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (2)")
    p.add_argument("--batch-size", type=int, default=16, help="fcn-segment-bulk's (16)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--weights", type=Path, default=CAMVID_WEIGHTS)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--note", action="append", default=[], help="context to keep, repeatable")
    args = p.parse_args(argv)
    args.log = lambda line: print(line, flush=True)
    ways = [w for w in args.ways.split(",") if w]
    if unknown := sorted(set(ways) - set(WAYS)):
        p.error(f"unknown ways {unknown}; choose from {', '.join(WAYS)}")

    started = time.perf_counter()
    machine = describe(args.device)
    # Every way reads the same settings; RAY_ADDRESS would send the Ray way elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FCN_WEIGHTS=str(args.weights.absolute()), FCN_DEVICE=args.device)
    with tempfile.TemporaryDirectory(prefix="fcn-bench-bulk-") as tmp:
        work = Path(tmp)
        link_photos(args.data_root, args.count, work / "photos")
        runs = run_ways(ways, work / "photos", work, env, args)
    when = dt.datetime.now(dt.timezone.utc)
    report = BulkReport(
        created=when.isoformat(timespec="seconds"),
        code=code_version(),
        machine=machine,
        count=args.count,
        weights=display_path(args.weights),
        photos=", ".join(PHOTO_FOLDERS),
        settings={k: v for k, v in env.items() if k.startswith("FCN_") and k != "FCN_WEIGHTS"},
        runs=runs,
        load_average_after=tuple(round(v, 2) for v in os.getloadavg()),
        duration_s=round(time.perf_counter() - started, 1),
        notes=args.note,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / result_stem(machine, "-".join(t for t in ("bulk", args.tag) if t), when)
    stem.with_suffix(".json").write_text(report.model_dump_json(indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    args.log(markdown(report))
    args.log(f"wrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
