"""``fcn-serve [--host H] [--port P]``: one process, one device, uvicorn in front.

Settings come from ``FCN_*`` environment variables (``fcn-serve --settings`` lists them). The
weights header is checked before uvicorn starts, so a missing or broken file is one clear
line, not a traceback. SIGTERM/SIGINT report not-ready at once, then drain.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from fcn_core.weights import WeightsError, read_metadata
from service.app import create_app
from service.settings import PACKAGE_ROOT, Settings


class _Server(uvicorn.Server):
    """uvicorn, reporting not-ready the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: object) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: object) -> None:
        self._on_exit()  # type: ignore[operator]
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcn-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.add_argument(
        "--settings", action="store_true", help="print every FCN_* setting as a table and exit"
    )
    args = parser.parse_args(argv)
    if args.settings:
        print(Settings.table())
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"fcn-serve: bad settings:\n{exc}", file=sys.stderr)
        return 2
    if not settings.trivial_model:
        try:
            read_metadata(settings.resolved_weights())
        except WeightsError as exc:
            where = (
                ""
                if settings.weights.is_absolute()
                else f"looked under {Path.cwd()} and {PACKAGE_ROOT}; "
            )
            print(f"fcn-serve: {exc} ({where}set FCN_WEIGHTS to a weights file)", file=sys.stderr)
            return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )
    server = _Server(config, app.state.service.begin_shutdown)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
