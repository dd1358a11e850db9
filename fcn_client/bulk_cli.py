"""``fcn-segment-bulk``: folders of images (millions of them) to label PNGs or Parquet, resumably.

This module owns the bulk job's command line: which inputs are still to do (an input whose
output exists is skipped and counted, so a killed job restarts where it stopped), running the
rest in this process over :class:`fcn_client.bulk.BulkSegmenter` or on Ray Data (``--ray``,
:func:`fcn_client.ray_data.segment_dataset`), writing the outputs, reporting images that
cannot be segmented (a stderr line and a record in ``OUT/errors.jsonl``; the job goes on),
progress, and the exit status. Both ways run the same batch callable
(:class:`fcn_client.ray_data.RaySegmenter`) and write here, in this process, so that ``OUT``
is a folder of the machine the command runs on, even with a remote Ray cluster.

Every file is written atomically (``fcn_core.files.atomic_write``): a killed job leaves no
half-written file under a final name. Inputs, names and output paths follow ``fcn-segment``
(``fcn_client.jobs``): a folder's images keep their path below it, ``OUT/<path>.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from fcn_client.cli import add_model_arguments
from fcn_client.jobs import BackendSetupError, Job, Summary, collect_jobs, output_paths
from fcn_client.wire import ImageFormat, Output
from fcn_core.files import atomic_write

PROG = "fcn-segment-bulk"
ERRORS_FILE = "errors.jsonl"
READ_THREADS = 4  # file reads overlap the model's work; more buys nothing on a local disk

Batch = dict[str, Any]  # numpy columns, as fcn_client.ray_data.RaySegmenter returns them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Segment many images in this process or on Ray Data, writing the label "
        "PNG the server would answer for each (OUT/<path below SOURCE>.png) or Parquet. "
        "Resumable: an image whose output exists is skipped. Images that cannot be "
        f"segmented are reported on stderr and in OUT/{ERRORS_FILE}, and the job goes on "
        "(a later run tries them again). "
        "The FCN_* settings of fcn-serve apply (and reach Ray's actors).",
        epilog="Exit status: 0 when every image is done (now or before), 1 when any image "
        "failed (see OUT/errors.jsonl), 2 on bad arguments, no images, or a model, Ray or "
        "Parquet writer that does not start.",
    )
    p.add_argument("inputs", nargs="+", metavar="SOURCE", help="files, folders, globs")
    p.add_argument("-o", "--out-dir", type=Path, required=True, metavar="OUT")
    p.add_argument(
        "--format",
        choices=["png", "parquet"],
        default="png",
        help="png: OUT/<path>.png, one label PNG per image (default). parquet: one file per "
        "batch, OUT/part-<run>-<n>.parquet, columns path, name, labels_png, classes (JSON); "
        "resumable too: an image whose name is in a part already written is skipped (needs "
        "pyarrow, which the ray extra brings)",
    )
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p)
    ray = p.add_argument_group(
        "on Ray Data",
        "ray.init() starts a local Ray unless RAY_ADDRESS names a cluster; then --weights "
        "and the inputs must be paths every node can read.",
    )
    ray.add_argument(
        "--ray", action="store_true", help="run on Ray Data (pip install 'fcn-serve[ray]')"
    )
    ray.add_argument("--actors", type=int, metavar="N", help="model replicas (default 2)")
    ray.add_argument(
        "--cpus-per-actor",
        type=float,
        help="default: the cluster's CPUs less one, shared among the actors",
    )
    ray.add_argument(
        "--gpus-per-actor",
        type=float,
        help="default: one each where the cluster has GPUs, unless --device cpu",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, not {args.batch_size}")
    ray_only = [args.actors, args.cpus_per_actor, args.gpus_per_actor]
    if not args.ray and any(v is not None for v in ray_only):
        p.error("--actors, --cpus-per-actor and --gpus-per-actor are for --ray")
    if args.actors is not None and args.actors < 1:
        p.error(f"--actors must be at least 1, not {args.actors}")


# -- where outputs go, and which are there already ------------------------------------------


class Store(Protocol):
    """Where a job's output goes; whether it is there already (the run skips it)."""

    def done(self, job: Job) -> bool: ...

    def write(self, rows: Sequence[tuple[Job, Batch, int]]) -> None:
        """Each successful row (its job, its batch, its index there), written atomically."""
        ...


class PngStore:
    """``OUT/<name>.png``, as ``fcn-segment`` names its label maps."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def path(self, job: Job) -> Path:
        return output_paths(job, self.out_dir, [Output.labels], ImageFormat.png)[Output.labels]

    def done(self, job: Job) -> bool:
        return self.path(job).is_file()

    def write(self, rows: Sequence[tuple[Job, Batch, int]]) -> None:
        for job, batch, i in rows:
            atomic_write(self.path(job), bytes(batch["labels_png"][i]))


class ParquetStore:
    """One Parquet file per batch; an image is done when its name is in a finished part
    (parts are written atomically, so a part that exists is whole)."""

    def __init__(self, out_dir: Path) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BackendSetupError(
                "--format parquet needs pyarrow: pip install 'fcn-serve[ray]'"
            ) from None
        self._pq = pq
        self.out_dir = out_dir
        self.run = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        self._parts = 0
        self._done = {
            name
            for part in sorted(out_dir.glob("part-*.parquet"))
            for name in pq.read_table(part, columns=["name"]).column("name").to_pylist()
        }

    def done(self, job: Job) -> bool:
        return job.name.as_posix() in self._done

    def write(self, rows: Sequence[tuple[Job, Batch, int]]) -> None:
        if not rows:
            return
        import pyarrow as pa

        table = pa.table(
            {
                "path": [str(job.source) for job, _, _ in rows],
                "name": [job.name.as_posix() for job, _, _ in rows],
                "labels_png": pa.array(
                    [bytes(b["labels_png"][i]) for _, b, i in rows], pa.binary()
                ),
                "classes": [str(b["classes"][i]) for _, b, i in rows],
            }
        )
        self._parts += 1
        part = self.out_dir / f"part-{self.run}-{self._parts:06d}.parquet"
        atomic_write(part, lambda tmp: self._pq.write_table(table, tmp))


# -- the run --------------------------------------------------------------------------------


@dataclass
class BulkSummary(Summary):
    """``total``: images still to do when the run started; ``skipped``: done before it."""

    skipped: int = 0

    def text(self, out_dir: Path) -> str:
        return (
            f"{self.done}/{self.total} images segmented in {self.elapsed_s:.2f} s "
            f"({self.images_per_s:.2f} images/s, start-up included), {self.skipped} skipped "
            f"(done before), {len(self.failures)} failed; outputs in {out_dir}"
        )


class ErrorLog:
    """``OUT/errors.jsonl``: one JSON record per failed image, appended as they fail (the file
    is opened at the first failure, so a clean run leaves none)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def record(self, source: Path, error: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._file.write(json.dumps({"path": str(source), "error": error, "at": at}) + "\n")
        self._file.flush()  # a killed job keeps every record written before

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def source_key(path: str | Path) -> str:
    """How a row's ``path`` names its job: absolute, normalised (Ray hands back the paths it
    was given)."""
    return os.path.normpath(os.path.abspath(path))


def run_batches(
    batches: Iterator[Batch],
    jobs: Sequence[Job],
    store: Store,
    errors: ErrorLog,
    summary: BulkSummary,
    progress: bool,
) -> None:
    """Write each batch's successful rows and report its failed ones, as batches arrive."""
    from tqdm import tqdm

    by_key = {source_key(job.source): job for job in jobs}
    bar = tqdm(total=summary.total, unit="img", disable=not progress, file=sys.stderr)
    bar.set_postfix(skipped=summary.skipped, failed=0)
    try:
        for batch in batches:
            rows = [(by_key[source_key(p)], batch, i) for i, p in enumerate(batch["path"])]
            store.write([row for row in rows if not batch["error"][row[2]]])
            for job, _, i in rows:
                if error := batch["error"][i]:
                    summary.failures.append((job.source, str(error)))
                    errors.record(job.source, str(error))
                    bar.write(f"{PROG}: failed: {job.source}: {error}", file=sys.stderr)
                else:
                    summary.done += 1
            bar.set_postfix(skipped=summary.skipped, failed=len(summary.failures), refresh=False)
            bar.update(len(rows))
    finally:
        bar.close()


def local_batches(jobs: Sequence[Job], args: argparse.Namespace) -> Iterator[Batch]:
    """The jobs in batches through the model in this process, the next batch's files read
    while the model runs; an unreadable file is a row with its error."""
    from fcn_client.bulk import BulkResult
    from fcn_client.local import LocalSetupError
    from fcn_client.ray_data import RaySegmenter, objects

    try:
        segmenter = RaySegmenter(args.weights, args.device, args.backend)  # what actors run
    except LocalSetupError as exc:
        raise BackendSetupError(setup_message(str(exc))) from None
    chunks = [jobs[i : i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="fcn-read") as pool:
        for chunk, reads in read_ahead(pool, chunks):
            blobs = [_result(r) for r in reads]
            readable = [b for b in blobs if isinstance(b, bytes)]
            done = iter(segmenter.bulk.segment(readable))
            results = [
                next(done) if isinstance(b, bytes) else BulkResult(None, [], f"cannot read: {b}")
                for b in blobs
            ]
            yield {**segmenter.columns(results), "path": objects(str(j.source) for j in chunk)}
    segmenter.bulk.close()


def read_ahead(
    pool: ThreadPoolExecutor, chunks: Sequence[Sequence[Job]]
) -> Iterator[tuple[Sequence[Job], list[Future[bytes]]]]:
    """Each chunk with its files' reads, the next chunk's reads started before it is given."""
    pending = None
    for chunk in chunks:
        reads = [pool.submit(job.source.read_bytes) for job in chunk]
        if pending is not None:
            yield pending
        pending = (chunk, reads)
    if pending is not None:
        yield pending


def _result(read: Future[bytes]) -> bytes | OSError:
    try:
        return read.result()
    except OSError as exc:
        return exc


def ray_batches(jobs: Sequence[Job], args: argparse.Namespace) -> Iterator[Batch]:
    """The jobs through Ray Data: ``read_binary_files`` -> ``RaySegmenter`` on ``--actors``
    actors, the results streamed back here as they finish. Starts (and stops) a local Ray
    unless one is running in this process already or ``RAY_ADDRESS`` names a cluster."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BackendSetupError("--ray needs Ray Data: pip install 'fcn-serve[ray]'") from None
    from fcn_client.ray_data import segment_dataset

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        local = {} if address else {"include_dashboard": False}
        try:
            ray.init(address=address or "local", logging_level="WARNING", **local)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BackendSetupError(f"ray.init(address={address or 'local'!r}): {exc}") from None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan, per dataset
        ds = ray.data.read_binary_files([source_key(j.source) for j in jobs], include_paths=True)
        ds = segment_dataset(
            ds,
            weights=portable(args.weights),
            device=args.device,
            backend=args.backend,
            actors=args.actors or 2,
            batch_size=args.batch_size,
            num_cpus=args.cpus_per_actor,
            num_gpus=args.gpus_per_actor,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.ActorDiedError as exc:
        # An actor that cannot load the model dies in its constructor; Ray says so with the
        # actor's traceback as text, whose last line is the setup error.
        found = re.findall(r"LocalSetupError: (.*)", str(exc))
        raise BackendSetupError(setup_message(found[-1] if found else str(exc))) from None
    finally:
        if started:
            ray.shutdown()


def setup_message(text: str) -> str:
    """A model setup error, without the ``--local:`` that ``fcn_client.local`` puts first."""
    return text.removeprefix("--local: ")


def portable(weights: str | None) -> str | None:
    """The weights as an absolute path when they name a file here (``--weights`` or
    ``FCN_WEIGHTS``): an actor's working folder need not be this one."""
    name = weights or os.environ.get("FCN_WEIGHTS")
    if name and Path(name).is_file():
        return str(Path(name).absolute())
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    started = time.perf_counter()
    try:
        jobs = collect_jobs(args.inputs, args.out_dir)
        store: Store = (
            ParquetStore(args.out_dir) if args.format == "parquet" else PngStore(args.out_dir)
        )
    except (ValueError, BackendSetupError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    todo = [job for job in jobs if not store.done(job)]
    summary = BulkSummary(total=len(todo), skipped=len(jobs) - len(todo))
    errors = ErrorLog(args.out_dir / ERRORS_FILE)
    run: Callable[[Sequence[Job], argparse.Namespace], Iterator[Batch]]
    run = ray_batches if args.ray else local_batches
    try:
        if todo:
            run_batches(run(todo, args), todo, store, errors, summary, not args.no_progress)
    except BackendSetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    finally:
        errors.close()
        summary.elapsed_s = time.perf_counter() - started
    print(summary.text(args.out_dir))
    if summary.failures:
        print(f"{PROG}: {len(summary.failures)} failed, listed in {errors.path}", file=sys.stderr)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
