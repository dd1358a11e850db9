"""A Python client for the segmentation service, and ``fcn-segment``, its command line.

Everything a batch job needs when the server is shared: N requests in flight, retries with
exponential back-off when the server is busy (503, honouring ``Retry-After``) or unreachable,
outputs written atomically so that an interrupted run leaves no half-written PNG, and a
summary with a non-zero exit when anything failed. ``--local`` runs the same weights
in-process through the service's own decode/predict/encode modules, so that its outputs are
the server's outputs without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import glob
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

Output = Literal["labels", "overlay", "json"]
ImageFormat = Literal["png", "jpeg"]

DEFAULT_SERVER = "http://127.0.0.1:8000"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# 503: the queue is full; 502: a proxy in front of the service could not reach it (restart).
RETRY_STATUSES = frozenset({502, 503})


class SegmentationError(RuntimeError):
    """A request that failed for good: the server's status and its ``detail``, or the network."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


@dataclass
class SegmentResult:
    content: bytes
    content_type: str
    timing_ms: dict[str, float]  # Server-Timing: stage name -> milliseconds
    request_id: str | None
    attempts: int  # 1 when the first try succeeded

    def json(self) -> dict[str, Any]:
        """The body of an ``output="json"`` answer: width, height, classes, labels PNG."""
        return json.loads(self.content)


@dataclass
class RetryPolicy:
    """How long to wait before retry ``attempt`` (1-based): full-jitter exponential back-off,
    but never less than what the server asked for in ``Retry-After``."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            wait = max(wait, min(retry_after_s, self.max_backoff_s))
        return wait


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``queue;dur=1.2, inference;dur=75.3`` -> {"queue": 1.2, "inference": 75.3}."""
    timing: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key == "dur":
                with contextlib.suppress(ValueError):
                    timing[name] = float(number.strip('"'))
    return timing


def _error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', e)}"
            if isinstance(e, dict)
            else str(e)
            for e in detail
        )
    return str(detail) if detail else (response.text[:200] or response.reason_phrase)


def _query(output: Output, fmt: ImageFormat | None, alpha: float | None) -> dict[str, str]:
    params = {"output": output}
    if fmt is not None:
        params["format"] = fmt
    if alpha is not None:
        params["alpha"] = f"{alpha:g}"
    return params


def _image_bytes(image: bytes | str | Path) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, "image"
    path = Path(image)
    return path.read_bytes(), path.name


def _result(response: httpx.Response, attempts: int) -> SegmentResult:
    if response.status_code != 200:
        raise SegmentationError(
            f"HTTP {response.status_code}: {_error_detail(response)}",
            response.status_code,
            attempts,
        )
    return SegmentResult(
        response.content,
        response.headers.get("content-type", ""),
        parse_server_timing(response.headers.get("server-timing")),
        response.headers.get("x-request-id"),
        attempts,
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class AsyncSegmentationClient:
    """The service over HTTP, asynchronously; one connection pool shared by every request."""

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[int, str, float], None] | None = None,
        max_connections: int = 64,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=_headers(api_key),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def __aenter__(self) -> AsyncSegmentationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def model(self) -> dict[str, Any]:
        """``GET /v1/model``: architecture, classes, palette, metrics, weights hash."""
        return (await self._send("GET", "/v1/model")).json()

    async def segment(
        self,
        image: bytes | str | Path,
        output: Output = "labels",
        fmt: ImageFormat | None = None,
        alpha: float | None = None,
    ) -> SegmentResult:
        data, name = _image_bytes(image)
        return _result(
            *await self._send_counted(
                "POST",
                "/segment",
                params=_query(output, fmt, alpha),
                files={"image": (name, data, "application/octet-stream")},
            )
        )

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response, attempts = await self._send_counted(method, url, **kwargs)
        if response.status_code != 200:
            _result(response, attempts)  # raises with the server's detail
        return response

    async def _send_counted(
        self, method: str, url: str, **kwargs: Any
    ) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt > self.retry.retries:
                    raise SegmentationError(
                        f"cannot reach {self._http.base_url} after {attempt} attempts: "
                        f"{type(exc).__name__}: {exc}",
                        None,
                        attempt,
                    ) from exc
                reason, retry_after = type(exc).__name__, None
            else:
                if response.status_code not in RETRY_STATUSES or attempt > self.retry.retries:
                    return response, attempt
                reason = f"HTTP {response.status_code}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            wait = self.retry.delay(attempt, retry_after)
            if self.on_retry is not None:
                self.on_retry(attempt, reason, wait)
            await asyncio.sleep(wait)


class SegmentationClient:
    """The same client, blocking, for scripts and notebooks.

    >>> with SegmentationClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     Path("dog.png").write_bytes(client.segment("dog.jpg").content)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[int, str, float], None] | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        # httpx binds its connection pool to the loop it first runs on: this private one.
        self._client = AsyncSegmentationClient(base_url, api_key, timeout_s, retry, on_retry)

    def _run(self, coro: Awaitable[Any]) -> Any:
        return self._loop.run_until_complete(coro)

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.aclose())
            self._loop.close()

    def model(self) -> dict[str, Any]:
        return self._run(self._client.model())

    def segment(
        self,
        image: bytes | str | Path,
        output: Output = "labels",
        fmt: ImageFormat | None = None,
        alpha: float | None = None,
    ) -> SegmentResult:
        return self._run(self._client.segment(image, output, fmt, alpha))


# ---- fcn-segment ----------------------------------------------------------------------------


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
    suffixes = {"labels": ".png", "overlay": "_overlay.jpg" if fmt == "jpeg" else "_overlay.png"}
    return {k: out_dir / job.name.parent / (job.name.name + suffixes[k]) for k in kinds}


def write_atomic(path: Path, data: bytes) -> None:
    """Never leave a half-written output under its final name (an interrupted run, a full disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class Backend(Protocol):
    """Image bytes -> the encoded outputs asked for: through a server, or in this process."""

    async def segment(
        self, data: bytes, kinds: Sequence[Output], fmt: ImageFormat, alpha: float
    ) -> dict[Output, bytes]: ...

    async def aclose(self) -> None: ...


class RemoteBackend:
    """One request per output kind: the server encodes, so the files are exactly its answers."""

    def __init__(self, client: AsyncSegmentationClient) -> None:
        self.client = client

    async def segment(
        self, data: bytes, kinds: Sequence[Output], fmt: ImageFormat, alpha: float
    ) -> dict[Output, bytes]:
        out: dict[Output, bytes] = {}
        for kind in kinds:
            overlay = kind == "overlay"
            result = await self.client.segment(
                data, kind, fmt if overlay else None, alpha if overlay else None
            )
            out[kind] = result.content
        return out

    async def aclose(self) -> None:
        await self.client.aclose()


class LocalSetupError(RuntimeError):
    """``--local`` cannot start: bad settings, or a weights file that is missing or broken."""


class LocalBackend:
    """The service's own stages in this process: ``codecs.decode`` with the same limits,
    ``Runner.predict`` (one image at a time: one model, no batcher), ``api.render``.

    The settings come from the same ``FCN_*`` environment as ``fcn-serve``'s, so the outputs
    are byte for byte the ones a server with those settings would send.
    """

    def __init__(self, weights: str | None = None, device: str | None = None) -> None:
        # Imported here: talking to a server needs httpx alone, not torch and the service.
        from pydantic import ValidationError

        from fcn_core.weights import WeightsError, load_weights
        from service.runner import Runner, resolve_device
        from service.settings import Settings

        overrides: dict[str, Any] = {}
        if weights:
            overrides["weights"] = Path(weights)
        if device:
            overrides["device"] = device
        try:
            self.settings = Settings(**overrides)
            loaded = load_weights(self.settings.resolved_weights())
            torch_device = resolve_device(self.settings.device)
        except (ValidationError, WeightsError, RuntimeError) as exc:
            raise LocalSetupError(f"--local: {exc}") from exc
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.meta = loaded.meta
        self.runner = Runner(
            loaded.model,
            loaded.meta.normalization,
            torch_device,
            self.settings.precision,
            self.settings.bucket_multiple,
        )
        self._model_lock = asyncio.Lock()

    async def segment(
        self, data: bytes, kinds: Sequence[Output], fmt: ImageFormat, alpha: float
    ) -> dict[Output, bytes]:
        from service import api, codecs
        from service.runner import DeviceOutOfMemory

        s = self.settings
        try:
            image = await asyncio.to_thread(codecs.decode, data, s.max_image_pixels, s.max_side)
        except codecs.CodecError as exc:
            raise SegmentationError(f"{exc.status}: {exc.detail}", exc.status) from None
        async with self._model_lock:  # decoding and encoding overlap; the model runs alone
            try:
                prediction = await asyncio.to_thread(self.runner.predict, [image.model_input])
            except DeviceOutOfMemory as exc:
                raise SegmentationError(str(exc)) from None
        labels = prediction.labels[0]
        out: dict[Output, bytes] = {}
        for kind in kinds:
            response = await asyncio.to_thread(
                api.render, image, labels, self.meta, api.Output(kind), api.ImageFormat(fmt), alpha
            )
            out[kind] = bytes(response.body)
        return out

    async def aclose(self) -> None:
        return None


async def run_jobs(
    jobs: Sequence[Job],
    backend: Backend,
    out_dir: Path,
    kinds: Sequence[Output],
    fmt: ImageFormat = "png",
    alpha: float = 0.5,
    concurrency: int = 4,
    progress: bool = True,
    summary: Summary | None = None,
) -> Summary:
    """Segment every job with ``concurrency`` requests in flight; a failure is counted and
    reported, never raised, so one bad image does not cost the others."""
    from tqdm import tqdm

    summary = summary or Summary(total=len(jobs))
    pending = list(reversed(jobs))
    bar = tqdm(total=len(jobs), unit="img", disable=not progress, file=sys.stderr)

    async def worker() -> None:
        while pending:
            job = pending.pop()
            try:
                data = await asyncio.to_thread(job.source.read_bytes)
                encoded = await backend.segment(data, kinds, fmt, alpha)
                for kind, path in output_paths(job, out_dir, kinds, fmt).items():
                    await asyncio.to_thread(write_atomic, path, encoded[kind])
                summary.done += 1
            except (SegmentationError, OSError) as exc:
                summary.failures.append((job.source, str(exc)))
            bar.set_postfix(failed=len(summary.failures), retries=summary.retries, refresh=False)
            bar.update(1)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(jobs))))))
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - started
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fcn-segment",
        description="Segment images through a running fcn-serve (or in this process with "
        "--local) and write label maps and/or overlays.",
        epilog="Exit status: 0 when every image was segmented, 1 when any failed, 2 on bad "
        "arguments, no images, or --local weights that do not load.",
    )
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively), globs")
    p.add_argument(
        "-o", "--out-dir", type=Path, default=Path("segmented"), help="default: %(default)s"
    )
    p.add_argument(
        "--output",
        choices=["labels", "overlay", "both"],
        default="labels",
        help="label maps (palette PNG NAME.png, pixel value = class index), overlays "
        "(NAME_overlay.png|jpg) or both (default labels)",
    )
    p.add_argument("--format", choices=["png", "jpeg"], default="png", help="overlay format")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight 0..1 (0.5)")
    p.add_argument(
        "-j", "--concurrency", type=int, default=4, help="requests in flight (default 4)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    remote = p.add_argument_group("through a server")
    remote.add_argument(
        "--server",
        default=os.environ.get("FCN_SERVER", DEFAULT_SERVER),
        help="base URL (env FCN_SERVER; default %(default)s)",
    )
    remote.add_argument(
        "--api-key",
        default=os.environ.get("FCN_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (env FCN_API_KEY)",
    )
    remote.add_argument(
        "--retries", type=int, default=5, help="per request, on 503/502 and network errors (5)"
    )
    remote.add_argument(
        "--backoff", type=float, default=0.5, help="first back-off in seconds, doubling (0.5)"
    )
    remote.add_argument(
        "--max-backoff", type=float, default=30.0, help="longest wait between tries (30)"
    )
    remote.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    local = p.add_argument_group("in this process, without a server")
    local.add_argument("--local", action="store_true", help="run the model here")
    local.add_argument("--weights", help="weights file (default: FCN_WEIGHTS, as fcn-serve)")
    local.add_argument("--device", help="cpu, cuda, cuda:N (default: FCN_DEVICE, as fcn-serve)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be between 0 and 1, not {args.alpha}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be at least 1, not {args.concurrency}")
    if args.retries < 0 or args.backoff < 0 or args.max_backoff < 0 or args.timeout <= 0:
        p.error("--retries, --backoff and --max-backoff must be >= 0, --timeout > 0")
    if (args.weights or args.device) and not args.local:
        p.error("--weights and --device are for --local; a server uses its own")


async def _run(args: argparse.Namespace, jobs: list[Job]) -> Summary:
    summary = Summary(total=len(jobs))

    def count_retry(attempt: int, reason: str, wait_s: float) -> None:
        summary.retries += 1

    backend: Backend
    if args.local:
        backend = await asyncio.to_thread(LocalBackend, args.weights, args.device)
    else:
        backend = RemoteBackend(
            AsyncSegmentationClient(
                args.server,
                args.api_key,
                timeout_s=args.timeout,
                retry=RetryPolicy(args.retries, args.backoff, args.max_backoff),
                on_retry=count_retry,
                max_connections=args.concurrency,
            )
        )
    kinds: list[Output] = ["labels", "overlay"] if args.output == "both" else [args.output]
    try:
        return await run_jobs(
            jobs,
            backend,
            args.out_dir,
            kinds,
            args.format,
            args.alpha,
            args.concurrency,
            progress=not args.no_progress,
            summary=summary,
        )
    finally:
        await backend.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        jobs = collect_jobs(args.inputs, args.out_dir)
    except ValueError as exc:
        print(f"fcn-segment: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(_run(args, jobs))
    except LocalSetupError as exc:
        print(f"fcn-segment: {exc}", file=sys.stderr)
        return 2
    for source, reason in summary.failures:
        print(f"fcn-segment: failed: {source}: {reason}", file=sys.stderr)
    print(summary.text(args.out_dir))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
