"""Helpers that only tests use: loopback ports and waiting for a server started by a test.

The benchmark harness keeps its own ``free_port`` (``bench/servers.py``): ``bench`` ships with
the project, and shipped code never imports the tests.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    every: float = 0.2,
    details: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``check`` until it holds; fail saying what never happened, then ``details()``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(every)
    more = details()
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f":\n{more}" if more else "")
    )


def answers_ok(url: str) -> bool:
    """``GET url`` answers 200; a refused or broken connection is a no, not an error."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for_http(
    url: str,
    timeout: float,
    *,
    proc: subprocess.Popen | None = None,
    output: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``url`` until it answers 200: a server's readiness, started by the test as ``proc``.

    Fails at once, with ``output()`` (the server's log), if ``proc`` exits first. On a time-out
    ``proc`` is killed before ``output()`` is read, so that reading a pipe to its end cannot
    hang on a server that is still running.
    """

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"the server exited with {proc.returncode} before {url} answered:\n{output()}"
            )
        return answers_ok(url)

    def killed_output() -> str:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return output()

    wait_for(f"{url} to answer 200", ready, timeout, details=killed_output)


def start_server(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A server process whose output (stdout and stderr together) the test reads at the end."""
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM, as an orchestrator stops a replica; it must exit cleanly. Returns its output."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the server ignored SIGTERM:\n{out}")
    # uvicorn re-raises the signal it handled once it has shut down cleanly.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
    return out
