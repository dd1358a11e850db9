"""Servers under test as real uvicorn subprocesses on loopback, and their resident memory.

A separate process per server is what production runs, keeps the load generator's own CPU
use out of the server's event loop, and lets memory be read from ``/proc/<pid>`` for that
server alone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited or never became ready; carries the tail of its log."""


@dataclass
class ServerProcess:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def rss_bytes(self) -> int:
        """Resident set size of the server process (VmRSS), from /proc."""
        return rss_bytes(self.process.pid)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def serve(
    name: str,
    argv: Sequence[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 180.0,
) -> Iterator[ServerProcess]:
    """Start ``python argv...`` from the repository root, wait until ``ready_path`` answers
    200, yield it, and stop it (SIGTERM, then SIGKILL) however the block ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO_ROOT, env=full_env, stdout=log, stderr=log
        )
    server = ServerProcess(name, f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(server, ready_path, ready_timeout_s)
        yield server
    finally:
        stop(proc)


def wait_ready(server: ServerProcess, ready_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = server.base_url + ready_path
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"{server.name} exited with {server.process.returncode} before it was ready:\n"
                + log_tail(server.log_path)
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(
        f"{server.name} not ready at {url} after {timeout_s:.0f} s:\n" + log_tail(server.log_path)
    )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
