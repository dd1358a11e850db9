"""A batch of image files through a backend: ``fcn-segment``'s work, without its arguments.

This module owns what a run does with files: turning inputs (files, folders, globs) into
jobs whose output names never clash, where each output goes, running the jobs with N images
in flight behind a progress bar, writing every output atomically (``fcn_core.files``, so an
interrupted run leaves no half-written PNG), and the summary. A failed image is counted and
reported, never raised, so one bad file does not cost the others.

A :class:`Backend` turns one image file into the encoded outputs asked for: through a server
(:class:`RemoteBackend`, here) or in this process (``fcn_client.local``, imported only for
``--local``, as it needs torch).
"""

from __future__ import annotations

import asyncio
import glob
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fcn_client.sdk import AsyncSegmentationClient, SegmentationError
from fcn_client.wire import ImageFormat, Output
from fcn_core.files import atomic_write

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class BackendSetupError(RuntimeError):
    """A backend cannot start (bad settings, weights that do not load): exit 2, no images run."""


@dataclass
class Job:
    source: Path
    name: Path  # the outputs' path below the output directory, without suffix


@dataclass
class Summary:
    total: int
    done: int = 0
    retries: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def text(self, out_dir: Path) -> str:
        return (
            f"{self.done}/{self.total} images segmented in {self.elapsed_s:.2f} s "
            f"({self.images_per_s:.2f} images/s), {len(self.failures)} failed, "
            f"{self.retries} retries; outputs in {out_dir}"
        )


def collect_jobs(inputs: Sequence[str], out_dir: Path | None = None) -> list[Job]:
    """Files, folders (recursively, image suffixes only) and globs -> one job per image.

    A folder's images keep their path below the folder, so that ``a/x.jpg`` and ``a/b/x.jpg``
    never overwrite each other's outputs; a name clash left over is an error before any work.
    A folder search skips ``out_dir``, so ``fcn-segment . -o seg`` run twice does not segment
    its own label maps.
    """
    skip = out_dir.resolve() if out_dir is not None else None
    jobs: dict[Path, Job] = {}
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and (skip is None or not p.resolve().is_relative_to(skip))
            )
            if not found:
                raise ValueError(f"{arg}: no images ({' '.join(sorted(IMAGE_SUFFIXES))})")
            pairs = [(p, p.relative_to(path).with_suffix("")) for p in found]
        elif path.is_file():
            pairs = [(path, Path(path.stem))]
        elif glob.has_magic(arg):
            found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"{arg}: the pattern matches no files")
            pairs = [(p, Path(p.stem)) for p in found]
        else:
            raise ValueError(f"{arg}: no such file or folder")
        for source, name in pairs:
            jobs.setdefault(source.resolve(), Job(source, name))
    owners: dict[Path, Path] = {}
    for job in jobs.values():
        other = owners.setdefault(job.name, job.source)
        if other != job.source:
            raise ValueError(
                f"{other} and {job.source} would write the same outputs ({job.name}.*); "
                "segment them in separate runs, or pass their common folder instead"
            )
    return list(jobs.values())


def output_paths(
    job: Job, out_dir: Path, kinds: Sequence[Output], fmt: ImageFormat
) -> dict[Output, Path]:
    """``NAME.png`` for the label map, ``NAME_overlay.png|jpg`` for the overlay."""
    overlay = "_overlay.jpg" if fmt == ImageFormat.jpeg else "_overlay.png"
    suffixes = {Output.labels: ".png", Output.overlay: overlay}
    return {k: out_dir / job.name.parent / (job.name.name + suffixes[k]) for k in kinds}


class Backend(Protocol):
    """An image file -> the encoded outputs asked for: through a server, or in this process.

    Failures an image can have (unreadable, refused, not computed) are ``SegmentationError``
    or ``OSError``; anything else is a bug and ends the run.
    """

    def in_flight(self, requested: int) -> int:
        """Images to keep in flight when the user asked for ``requested`` (``-j``)."""
        ...

    async def segment(
        self, source: Path, kinds: Sequence[Output], fmt: ImageFormat, alpha: float
    ) -> dict[Output, bytes]: ...

    async def aclose(self) -> None: ...


class RemoteBackend:
    """One request per output kind: the server encodes, so the files are exactly its answers."""

    def __init__(self, client: AsyncSegmentationClient, model: str | None = None) -> None:
        self.client = client
        self.model = model  # the server's default when None

    def in_flight(self, requested: int) -> int:
        return requested  # the server batches whatever arrives; -j is the user's to choose

    async def segment(
        self, source: Path, kinds: Sequence[Output], fmt: ImageFormat, alpha: float
    ) -> dict[Output, bytes]:
        data = await asyncio.to_thread(source.read_bytes)
        out: dict[Output, bytes] = {}
        for kind in kinds:
            overlay = kind == Output.overlay
            result = await self.client.segment(
                data, kind, fmt if overlay else None, alpha if overlay else None, self.model
            )
            out[kind] = result.content
        return out

    async def aclose(self) -> None:
        await self.client.aclose()


async def run_jobs(
    jobs: Sequence[Job],
    backend: Backend,
    out_dir: Path,
    kinds: Sequence[Output],
    fmt: ImageFormat = ImageFormat.png,
    alpha: float = 0.5,
    concurrency: int = 4,
    progress: bool = True,
    summary: Summary | None = None,
) -> Summary:
    """Segment every job with ``backend.in_flight(concurrency)`` images in flight."""
    from tqdm import tqdm

    summary = summary or Summary(total=len(jobs))
    pending = list(reversed(jobs))
    bar = tqdm(total=len(jobs), unit="img", disable=not progress, file=sys.stderr)

    async def worker() -> None:
        while pending:
            job = pending.pop()
            try:
                encoded = await backend.segment(job.source, kinds, fmt, alpha)
                for kind, path in output_paths(job, out_dir, kinds, fmt).items():
                    await asyncio.to_thread(atomic_write, path, encoded[kind])
                summary.done += 1
            except (SegmentationError, OSError) as exc:
                summary.failures.append((job.source, str(exc)))
            bar.set_postfix(failed=len(summary.failures), retries=summary.retries, refresh=False)
            bar.update(1)

    workers = max(1, min(backend.in_flight(concurrency), len(jobs)))
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - started
    return summary
