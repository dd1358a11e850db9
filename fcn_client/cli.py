"""``fcn-segment``: the command line of :mod:`fcn_client.jobs`.

This module owns the flags, their checks, choosing the backend (a server, or ``--local``)
and the exit status: 0 when every image was segmented, 1 when any failed, 2 on bad
arguments, no images, or a ``--local`` setup that does not start. ``--local`` imports
torch and the service's codecs only when asked for, so talking to a server stays light.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fcn_client.jobs import (
    Backend,
    BackendSetupError,
    Job,
    RemoteBackend,
    Summary,
    collect_jobs,
    run_jobs,
)
from fcn_client.sdk import DEFAULT_SERVER, AsyncSegmentationClient, RetryPolicy
from fcn_client.wire import ImageFormat, Output


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
    p.add_argument(
        "--format", choices=[f.value for f in ImageFormat], default="png", help="overlay format"
    )
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
    remote.add_argument(
        "--model", help="the served model to use, by name (GET /v1/models); default: the default"
    )
    local = p.add_argument_group(
        "in this process, without a server",
        "The FCN_* settings of fcn-serve apply (batching, workers, threads, precision, "
        "compile, decode limits), so the outputs are the ones a server with them would send. "
        "At least two batches' worth of images are kept in flight, whatever -j says.",
    )
    local.add_argument("--local", action="store_true", help="run the model here")
    add_model_arguments(local)
    return p


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--weights, --device and --backend: the in-process model's overrides of ``FCN_*``
    (``fcn-segment --local`` and ``fcn-segment-bulk``)."""
    parser.add_argument("--weights", help="weights file (default: FCN_WEIGHTS, as fcn-serve)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: FCN_DEVICE, as fcn-serve)")
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "openvino"],
        help="what runs the network (default: FCN_BACKEND, as fcn-serve)",
    )


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be between 0 and 1, not {args.alpha}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be at least 1, not {args.concurrency}")
    if args.retries < 0 or args.backoff < 0 or args.max_backoff < 0 or args.timeout <= 0:
        p.error("--retries, --backoff and --max-backoff must be >= 0, --timeout > 0")
    if (args.weights or args.device or args.backend) and not args.local:
        p.error("--weights, --device and --backend are for --local; a server uses its own")
    if args.model and args.local:
        p.error("--model names a server's model; --local runs --weights")


async def _run(args: argparse.Namespace, jobs: list[Job]) -> Summary:
    summary = Summary(total=len(jobs))

    def count_retry(attempt: int, reason: str, wait_s: float) -> None:
        summary.retries += 1

    backend: Backend
    if args.local:
        from fcn_client.local import LocalBackend  # torch and the service: only when asked

        backend = await asyncio.to_thread(
            LocalBackend.from_environment, args.weights, args.device, args.backend
        )
    else:
        backend = RemoteBackend(
            AsyncSegmentationClient(
                args.server,
                args.api_key,
                timeout_s=args.timeout,
                retry=RetryPolicy(args.retries, args.backoff, args.max_backoff),
                on_retry=count_retry,
                max_connections=args.concurrency,
            ),
            model=args.model,
        )
    both = args.output == "both"
    kinds = [Output.labels, Output.overlay] if both else [Output(args.output)]
    try:
        return await run_jobs(
            jobs,
            backend,
            args.out_dir,
            kinds,
            ImageFormat(args.format),
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
    except BackendSetupError as exc:
        print(f"fcn-segment: {exc}", file=sys.stderr)
        return 2
    for source, reason in summary.failures:
        print(f"fcn-segment: failed: {source}: {reason}", file=sys.stderr)
    print(summary.text(args.out_dir))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
