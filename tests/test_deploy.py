"""The compose deployment, run for real on loopback: two replicas, nginx, Prometheus.

The replicas run the image's own command (ENTRYPOINT + CMD, host and port swapped), nginx runs
the compose template rendered by docker/render.py, Prometheus the shipped config and alerting
rules with loopback targets instead of DNS. Real JPEGs go through nginx; one replica is
SIGKILLed mid-burst and no request may fail. Every process is ours and is stopped at the end.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core.weights import LoadedWeights
from tests.conftest import demo_photos, labels_from_png, predict
from tests.helpers import answers_ok, free_port, wait_for
from tests.test_deploy_config import (
    dashboard_expressions,
    dockerfile_exec,
    healthcheck_command,
    render,
    tool,
)

pytestmark = pytest.mark.deploy

READY_TIMEOUT_S = 120.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group we started (no graceful drain: a crash)."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Deployment:
    tmp: Path
    replicas: list[Proc]
    replica_ports: list[int]
    nginx: Proc
    nginx_port: int
    prometheus: Proc
    prometheus_port: int
    max_body_bytes: int
    photos: list[Photo]
    procs: list[Proc]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.replica_ports[i]}"

    def diagnostics(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(
            f"http://127.0.0.1:{self.prometheus_port}/api/v1/query",
            params={"query": promql},
            timeout=10,
        )
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def alerts(self) -> list[dict[str, str]]:
        """Labels of the alerts Prometheus has pending or firing."""
        r = httpx.get(f"http://127.0.0.1:{self.prometheus_port}/api/v1/alerts", timeout=10)
        return [a["labels"] for a in r.json()["data"]["alerts"]]

    def by_instance(self, promql: str) -> dict[str, float]:
        return {s["metric"]["instance"]: float(s["value"][1]) for s in self.query(promql)}

    def access_log(self, id_prefix: str = "") -> list[dict[str, str]]:
        """nginx's log lines for POST /segment whose request id starts with ``id_prefix``:
        status, replicas tried and their statuses, request id."""
        pattern = re.compile(
            r'"POST /segment\S* HTTP/[\d.]+" (?P<status>\d+) .* '
            r'upstream="(?P<upstream>[^"]*)" ustatus="(?P<ustatus>[^"]*)" .* id=(?P<id>\S+)'
        )
        lines = [pattern.search(line) for line in self.nginx.log.read_text().splitlines()]
        return [m.groupdict() for m in lines if m and m["id"].startswith(id_prefix)]


def start(name: str, cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{name}.log"
    popen = subprocess.Popen(
        cmd,
        stdout=log.open("ab"),  # O_APPEND: nginx reopens it as /dev/stdout
        stderr=subprocess.STDOUT,
        cwd=tmp,
        env=env,
        start_new_session=True,  # its own process group: killed as a whole, never by name
    )
    return Proc(name, popen, log)


def replica_command(port: int) -> list[str]:
    """The image's ENTRYPOINT + CMD, on loopback at ``port``; the console script of this
    interpreter's environment (the one ``pip install -e .`` made)."""
    cmd = dockerfile_exec("ENTRYPOINT") + dockerfile_exec("CMD")
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    script = Path(sys.executable).parent / cmd[0]
    if not script.exists():
        pytest.skip(f"{cmd[0]} is not installed beside {sys.executable}: pip install -e .")
    return [str(script), *cmd[1:]]


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, service_weights: Path, reference: LoadedWeights
) -> Iterator[Deployment]:
    nginx, prometheus, promtool = tool("nginx"), tool("prometheus"), tool("promtool")
    from service.settings import Settings

    tmp = tmp_path_factory.mktemp("deploy")
    max_body = Settings.model_fields["max_body_bytes"].default
    procs: list[Proc] = []
    try:
        # Two replicas, as compose runs them (same command, same body limit as nginx).
        ports = [free_port(), free_port()]
        replicas = []
        for i, port in enumerate(ports):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("FCN_")},
                "FCN_WEIGHTS": str(service_weights),
                "FCN_WARMUP_SIZES": "64x48",
                "FCN_DEVICE": "cpu",
                "FCN_MAX_BODY_BYTES": str(max_body),
                "FCN_TORCH_THREADS": "1",
                # The labels are checked against torch's own (near-ties of the untrained
                # test model may flip on another runtime: tests/test_backends.py).
                "FCN_BACKEND": "torch",
                "FCN_CODEC_THREADS": "1",
                "FCN_MAX_BATCH_SIZE": "4",
                "OMP_NUM_THREADS": "1",
            }
            replicas.append(start(f"replica{i}", replica_command(port), tmp, env))
        procs += replicas

        # nginx from the compose template: loopback upstreams, scratch files in tmp.
        nginx_port = free_port()
        state = tmp / "nginx"
        state.mkdir()
        conf = tmp / "nginx.conf"
        user = "root" if os.geteuid() == 0 else getpass.getuser()
        conf.write_text(
            render.render_nginx(
                [f"127.0.0.1:{p}" for p in ports], f"127.0.0.1:{nginx_port}", max_body, state, user
            )
        )
        nginx_cmd = [nginx, "-p", str(tmp), "-c", str(conf), "-e", "stderr"]
        check = subprocess.run([*nginx_cmd, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        procs.append(start("nginx", [*nginx_cmd, "-g", "daemon off;"], tmp))

        # Prometheus from the shipped config and rules, scraping every second.
        prom_port = free_port()
        prom_conf = tmp / "prometheus.yml"
        prom_conf.write_text(render.render_prometheus([f"127.0.0.1:{p}" for p in ports], "1s"))
        check = subprocess.run(
            [promtool, "check", "config", str(prom_conf)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        procs.append(
            start(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={prom_conf}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp,
            )
        )
        # The expected label maps, computed while the replicas load.
        photos = load_photos(reference)
        d = Deployment(
            tmp=tmp,
            replicas=replicas,
            replica_ports=ports,
            nginx=procs[2],
            nginx_port=nginx_port,
            prometheus=procs[3],
            prometheus_port=prom_port,
            max_body_bytes=max_body,
            photos=photos,
            procs=procs,
        )

        def up(url: str) -> bool:
            dead = [p.name for p in procs if not p.alive()]
            assert not dead, f"{dead} exited:\n{d.diagnostics()}"
            return answers_ok(url)

        for port in ports:
            wait_for(
                f"replica :{port} /readyz",
                lambda p=port: up(f"http://127.0.0.1:{p}/readyz"),
                READY_TIMEOUT_S,
            )
        wait_for("nginx", lambda: up(f"{d.url}/nginx-healthz"), 30)
        wait_for("prometheus", lambda: up(f"http://127.0.0.1:{prom_port}/-/ready"), 60)
        wait_for(
            "prometheus to scrape both replicas",
            lambda: (
                sorted(d.by_instance('up{job="fcn"} == 1')) == sorted(d.target(i) for i in (0, 1))
            ),
            30,
        )
        yield d
    finally:
        for p in reversed(procs):
            p.stop()


@dataclass
class Photo:
    name: str
    jpeg: bytes
    labels: np.ndarray  # the model's own label map for it, computed in this process


def load_photos(reference: LoadedWeights) -> list[Photo]:
    """Reference label maps computed on one torch thread, as the replicas run
    (``FCN_TORCH_THREADS=1``): summing in another order can flip the pixels whose two top
    scores lie within float rounding (3e-6 apart on giraffe.jpg with the test weights)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for path in demo_photos():
            rgb = np.asarray(Image.open(path).convert("RGB"))
            out.append(Photo(path.name, path.read_bytes(), predict(reference, rgb)))
        return out
    finally:
        torch.set_num_threads(before)


def segment(client: httpx.Client, url: str, photo: Photo, request_id: str) -> str:
    """One photo through nginx; "" when the answer is the model's own label map, else why not."""
    headers = {"Content-Type": "image/jpeg", "X-Request-ID": request_id}
    try:
        r = client.post(f"{url}/segment", content=photo.jpeg, headers=headers)
    except httpx.HTTPError as exc:
        return f"{photo.name}: {type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return f"{photo.name}: HTTP {r.status_code} {r.text[:200]}"
    if r.headers.get("x-request-id") != request_id:
        return f"{photo.name}: X-Request-ID {r.headers.get('x-request-id')}, sent {request_id}"
    if r.headers.get("content-type") != "image/png":
        return f"{photo.name}: answered {r.headers.get('content-type')}"
    labels, _ = labels_from_png(r.content)
    if labels.shape != photo.labels.shape or not np.array_equal(labels, photo.labels):
        return f"{photo.name}: label map differs from the model's own"
    return ""


def burst(
    d: Deployment,
    tag: str,
    count: int,
    concurrency: int = 4,
    after: int | None = None,
    then: Callable[[], None] | None = None,
) -> list[str]:
    """``count`` photos through nginx from ``concurrency`` clients, with request ids
    ``{tag}-{i}``; runs ``then`` once ``after`` answers have arrived (while the rest are in
    flight). Returns the failures."""
    pics = d.photos
    failures = []
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(segment, client, d.url, pics[i % len(pics)], f"{tag}-{i}")
            for i in range(count)
        ]
        for done, future in enumerate(as_completed(futures), start=1):
            if problem := future.result():
                failures.append(problem)
            if then is not None and done == after:
                then()
    return failures


def served_by(d: Deployment, i: int) -> int:
    """Requests nginx says replica ``i`` finally answered with 200."""
    return sum(
        1
        for line in d.access_log()
        if line["upstream"].split(", ")[-1] == d.target(i)
        and line["ustatus"].split(", ")[-1] == "200"
    )


def test_errors_through_nginx_are_json(deployment: Deployment) -> None:
    """nginx's body limit is the service's; errors keep the service's JSON shape and id."""
    d = deployment
    with httpx.Client(timeout=30) as client:
        # Over the shared body limit: nginx refuses it itself, in the service's error shape.
        big = b"\0" * (d.max_body_bytes + 1)
        r = client.post(
            f"{d.url}/segment",
            content=big,
            headers={"Content-Type": "image/jpeg", "X-Request-ID": "big-1"},
        )
        assert r.status_code == 413, r.text
        assert r.json() == {
            "detail": f"request body larger than {d.max_body_bytes} bytes",
            "request_id": "big-1",
        }
        # Exactly at the limit: nginx passes it on, and the replica (same limit) reads it
        # whole and refuses it as not an image, not as too large.
        r = client.post(
            f"{d.url}/segment",
            content=big[:-1],
            headers={"Content-Type": "image/jpeg", "X-Request-ID": "limit-1"},
        )
        assert 400 <= r.status_code < 500 and r.status_code != 413, r.text
        wait_for("nginx to log the request", lambda: bool(d.access_log("limit-1")), 5, 0.05)
        assert d.access_log("limit-1")[0]["upstream"].startswith("127.0.0.1:")
        # Not an image: the replica's own 4xx passes through, once (4xx is never retried).
        r = client.post(
            f"{d.url}/segment",
            content=b"not a jpeg",
            headers={"Content-Type": "image/jpeg", "X-Request-ID": "junk-1"},
        )
        assert 400 <= r.status_code < 500 and r.status_code != 413, r.text
        body = r.json()
        assert body["request_id"] == "junk-1" and body["detail"], body
        assert r.headers["x-request-id"] == "junk-1"
        wait_for("nginx to log the request", lambda: bool(d.access_log("junk-1")), 5, 0.05)
        (line,) = d.access_log("junk-1")
        assert "," not in line["upstream"] and line["status"] == str(r.status_code), line


def test_burst_survives_a_replica_kill_and_prometheus_sees_it(deployment: Deployment) -> None:
    d = deployment
    victim, survivor = 0, 1
    # Both replicas serve, and Prometheus has scraped a /segment count from each of them.
    assert burst(d, "warm", 6) == []
    assert served_by(d, victim) > 0 and served_by(d, survivor) > 0, d.access_log()
    count = 'fcn_request_duration_seconds_count{job="fcn", endpoint="/segment", status="200"}'
    wait_for(
        "Prometheus to scrape /segment requests from both replicas",
        lambda: len([v for v in d.by_instance(count).values() if v > 0]) == 2,
        15,
    )

    # The burst: 20 real photos from 4 clients; replica 0 is SIGKILLed after the 5th answer.
    failures = burst(d, "kill", 20, after=5, then=d.replicas[victim].kill)
    assert not d.replicas[victim].alive()
    assert failures == [], (
        f"{len(failures)} requests failed:\n" + "\n".join(failures) + d.diagnostics()
    )
    lines = d.access_log("kill-")
    assert len(lines) == 20 and all(line["status"] == "200" for line in lines), lines
    retried = [
        line for line in lines if line["upstream"] == f"{d.target(victim)}, {d.target(survivor)}"
    ]
    assert retried, f"no request was retried on the surviving replica: {lines}"

    # Prometheus marks the dead replica down, keeps the survivor up, and fires the alert rule.
    wait_for(
        "Prometheus to mark the killed replica down",
        lambda: d.by_instance('up{job="fcn"}') == {d.target(victim): 0.0, d.target(survivor): 1.0},
        15,
    )
    wait_for(
        "the FcnReplicaDown alert for the killed replica",
        lambda: any(
            a["alertname"] == "FcnReplicaDown" and a["instance"] == d.target(victim)
            for a in d.alerts()
        ),
        15,
    )
    # Both replicas' request durations were scraped (the victim's up to its death), and the
    # survivor's count settles at exactly what nginx says it answered.
    scraped = d.by_instance(f"max_over_time({count}[10m])")
    assert set(scraped) == {d.target(victim), d.target(survivor)} and min(scraped.values()) > 0, (
        scraped
    )
    wait_for(
        "the survivor's scraped /segment count to match nginx's log",
        lambda: d.by_instance(count).get(d.target(survivor)) == served_by(d, survivor),
        15,
    )


def test_dashboard_queries_run_on_the_scraped_metrics(deployment: Deployment) -> None:
    """Every Grafana panel's query is valid PromQL over real series; all but GPU memory (CPU
    replicas) and the 5xx share (none happened) return data."""
    d = deployment
    assert burst(d, "dash", 4) == []
    wait_for(
        "a scrape after the burst", lambda: bool(d.query('fcn_images_total{job="fcn"} > 0')), 15
    )
    rules = httpx.get(f"http://127.0.0.1:{d.prometheus_port}/api/v1/rules", timeout=5).json()
    health = {
        r["name"]: (r["health"], r.get("lastError", ""))
        for g in rules["data"]["groups"]
        for r in g["rules"]
    }
    assert health and all(h == "ok" for h, _ in health.values()), health
    empty = []
    for expr in dashboard_expressions():
        # As Grafana sends them: its rate interval, and the model picker on "All".
        if not d.query(expr.replace("$__rate_interval", "1m").replace("$model", ".*")):
            empty.append(expr)
    assert all("fcn_gpu_memory_bytes" in e or 'status=~"5.."' in e for e in empty), empty


def test_healthcheck_command_reports_readiness(deployment: Deployment) -> None:
    """The image's HEALTHCHECK, run as Docker runs it: 0 on a ready replica, not 0 on a dead one."""
    d = deployment
    alive = next(i for i, p in enumerate(d.replicas) if p.alive())
    ok = subprocess.run(
        healthcheck_command(d.replica_ports[alive]), capture_output=True, timeout=30
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(healthcheck_command(free_port()), capture_output=True, timeout=30)
    assert bad.returncode != 0


def test_no_replica_left_is_a_json_503(deployment: Deployment) -> None:
    """With every replica dead nginx answers itself, in the service's error shape, and
    Prometheus raises FcnNoReplicaUp."""
    d = deployment
    for replica in d.replicas:
        replica.kill()
    r = httpx.post(
        f"{d.url}/segment",
        content=d.photos[0].jpeg,
        headers={"Content-Type": "image/jpeg", "X-Request-ID": "none-left"},
        timeout=30,
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json() == {
        "detail": "no segmentation replica reachable, retry later",
        "request_id": "none-left",
    }
    assert r.headers["x-request-id"] == "none-left"
    wait_for(
        "the FcnNoReplicaUp alert",
        lambda: any(a["alertname"] == "FcnNoReplicaUp" for a in d.alerts()),
        15,
    )
