"""Servers under test as real uvicorn subprocesses on loopback, and their resident memory.

A separate process per server is what production runs, keeps the load generator's own CPU
use out of the server's event loop, and lets memory be read from ``/proc/<pid>`` for that
server alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .http import Upload

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited or never became ready; carries the tail of its log."""


@dataclass
class ServerProcess:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    upload: Upload | None = None

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


@dataclass
class ServerSpec:
    """``python argv...`` from the repository root, ready when ``ready_path`` answers 200."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    upload: Upload | None = None  # how it takes an image; None: the service's multipart field


def start(spec: ServerSpec, log_dir: Path) -> ServerProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    env = {**os.environ, **spec.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as log:
        # A session (and process group) of its own, so that stop() reaches the processes a
        # server spawns (LitServe's workers), not the server alone.
        proc = subprocess.Popen(
            [sys.executable, *spec.argv],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    return ServerProcess(
        spec.name, f"http://127.0.0.1:{spec.port}", proc, log_path, upload=spec.upload
    )


@contextmanager
def serve_all(
    specs: Sequence[ServerSpec], log_dir: Path, ready_timeout_s: float = 300.0
) -> Iterator[dict[str, ServerProcess]]:
    """Start every server at once (start-up is mostly imports and weights), wait until all
    are ready, yield them by name, and stop them all however the block ends."""
    running: dict[str, ServerProcess] = {}
    try:
        for spec in specs:
            running[spec.name] = start(spec, log_dir)
        for spec in specs:
            wait_ready(running[spec.name], spec.ready_path, ready_timeout_s)
        yield running
    finally:
        for server in running.values():
            stop(server.process)


@contextmanager
def alone(running: dict[str, ServerProcess], name: str) -> Iterator[ServerProcess]:
    """Server ``name`` with every other one of ``running`` paused (SIGSTOP to its process
    group), resumed after. The servers start together, but an idle one is not idle to the
    CPU: LitServe's workers poll their queues, 0.6 of a core on the 2-core bench VM with no
    request in sight, which every server measured beside it lost."""
    others = [server for n, server in running.items() if n != name]
    for server in others:
        _signal_group(server.process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    for server in others:  # delivered asynchronously: wait until every process has stopped
        while group_states(server.process.pid) - {"T", "Z"} and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        yield running[name]
    finally:
        for server in others:
            _signal_group(server.process.pid, signal.SIGCONT)


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
    """SIGTERM to the server's whole process group, SIGKILL to what is left after the grace:
    a server's children outliving it would load the machine of every later measurement."""
    group = proc.pid  # its own session: the group id is its pid
    if proc.poll() is None:
        _signal_group(group, signal.SIGTERM)
        _signal_group(group, signal.SIGCONT)  # a paused group (``alone``) acts on it now
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    _signal_group(group, signal.SIGKILL)  # children that ignored SIGTERM, or outlived it
    proc.wait()
    deadline = time.monotonic() + 5.0
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously


def group_alive(group: int) -> bool:
    """Whether a process of this group still runs (zombies, dead but not reaped by an init
    that does not reap, do not count)."""
    return bool(group_states(group) - {"Z"})


def group_states(group: int) -> set[str]:
    """The states (``R``, ``S``, ``T`` stopped, ``Z`` zombie...) of this group's processes,
    from /proc."""
    states = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == group:
            states.add(fields[0])
    return states


def _signal_group(group: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # nothing left
        os.killpg(group, sig)
