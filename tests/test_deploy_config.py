"""The shipped deployment files, checked by the tools that run them and against each other.

No Docker engine runs here, so what the containers would run is checked piece by piece:
``nginx -t`` on the template rendered with docker-compose.yml's own values, ``promtool`` on the
Prometheus config and rules (and the rules' unit tests), and the places where two files must
agree (ports, the body limit, metric names, mounted paths, the files the image copies).
``tests/test_deploy.py`` then runs the same nginx and Prometheus files for real on loopback.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose/k8s files")

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = DOCKER / "compose.cpu.yml"
DOCKERFILE = DOCKER / "Dockerfile"
PROMETHEUS_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fcn-serve.json"
K8S = DOCKER / "k8s"


def load_render() -> ModuleType:
    """docker/render.py, imported by path: docker/ is not a package (and must not shadow the
    ``docker`` SDK)."""
    spec = importlib.util.spec_from_file_location("fcn_deploy_render", DOCKER / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


def tool(name: str) -> str:
    """Path of a system tool, looking in sbin too (nginx lives there, off a user's PATH)."""
    path = shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )
    if path is None:
        pytest.skip(
            f"{name} is not installed (apt-get install nginx prometheus; scripts/test.sh does)"
        )
    return path


def run_tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shlex.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


class ComposeLoader(yaml.SafeLoader):
    """Reads Compose's ``!reset`` / ``!override`` merge tags as plain values."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_sequence(node)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node)
    ),
)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def compose_default(value: str) -> str:
    """The value Compose uses for ``${VAR:-default}`` when VAR is unset."""
    m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", value)
    return m.group(2) if m else value


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    return {k: compose_default(str(v)) for k, v in env.items()}


def service_port() -> int:
    """The port the image's command serves on: everything else must point at it."""
    cmd = dockerfile_exec("CMD")
    return int(cmd[cmd.index("--port") + 1])


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_exec(instruction: str) -> list[str]:
    """The exec-form (JSON) arguments of the last ENTRYPOINT/CMD/HEALTHCHECK CMD."""
    args = [rest for word, rest in dockerfile_instructions() if word == instruction][-1]
    if instruction == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :]
    return json.loads(args)


def healthcheck_command(port: int) -> list[str]:
    """The image's HEALTHCHECK, pointed at a replica on ``port``."""
    expected = f"127.0.0.1:{service_port()}/"
    cmd = dockerfile_exec("HEALTHCHECK")
    assert any(expected in part for part in cmd), f"HEALTHCHECK does not call {expected}"
    return [part.replace(expected, f"127.0.0.1:{port}/") for part in cmd]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers
    everything below it."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_what_it_needs_and_nothing_is_ignored_away() -> None:
    from service.settings import DEFAULT_WEIGHTS

    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY"]
    sources = [src for *srcs, _dest in copies for src in srcs if not src.startswith("--")]
    assert any((REPO / DEFAULT_WEIGHTS).is_relative_to(REPO / src) for src in sources), (
        "the image must carry the default weights"
    )
    for src in sources:
        path = REPO / src
        assert path.exists(), f"Dockerfile copies {src}, which is not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel), f".dockerignore drops {rel}, which COPY needs"
    for kept_out in (
        "tests/test_deploy.py",
        "runs/x/last.pt",
        ".git/HEAD",
        "fcn_core/__pycache__/a.pyc",
    ):
        assert dockerignore_excludes(kept_out), f"{kept_out} should stay out of the build context"
    # The package's own data files (the demo page) travel with service/.
    for static in (REPO / "service" / "static").rglob("*"):
        if static.is_file():
            assert not dockerignore_excludes(static.relative_to(REPO).as_posix())


def test_dockerfile_runtime_contract() -> None:
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    # Cheap rebuilds: torch before the dependency list, dependencies before the code.
    torch_at = next(
        i for i, (w, r) in enumerate(instructions) if w == "RUN" and "torch torchvision" in r
    )
    deps_at = next(i for i, (w, r) in enumerate(instructions) if w == "RUN" and "requirements" in r)
    code_at = next(
        i for i, (w, r) in enumerate(instructions) if w == "COPY" and r.startswith("fcn_core")
    )
    assert torch_at < deps_at < code_at
    # A CPU variant next to the CUDA one, chosen by a build argument.
    stages = [r for w, r in instructions if w == "FROM"]
    assert any("AS base-gpu" in s for s in stages) and any("AS base-cpu" in s for s in stages)
    assert any(s.startswith("base-${VARIANT}") for s in stages)
    # Non-root, the port the command serves on, readiness as health, fcn-serve as entry point.
    user = [r for w, r in instructions if w == "USER"][-1]
    assert user not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert [r for w, r in instructions if w == "EXPOSE"] == [str(service_port())]
    assert "/readyz" in " ".join(dockerfile_exec("HEALTHCHECK"))
    entry = dockerfile_exec("ENTRYPOINT")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert entry == ["fcn-serve"]
    assert re.search(r'^fcn-serve = "service\.cli:main"$', pyproject, re.MULTILINE)
    uid = re.search(r"--uid (\d+)", " ".join(r for w, r in instructions if w == "RUN"))
    assert uid is not None
    deployment = next(d for d in k8s_docs() if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
        uid.group(1)
    )


# -- nginx -------------------------------------------------------------------------------------


def test_render_is_envsubst_on_the_fcn_variables(tmp_path: Path) -> None:
    """docker/render.py and the nginx image's envsubst give the same file."""
    envsubst = shutil.which("envsubst")
    if envsubst is None:
        pytest.skip("envsubst (gettext-base) is not installed")
    template = render.NGINX_TEMPLATE.read_text()
    values = render.nginx_values(["10.0.0.5:8000", "10.0.0.6:8000"], "80", 1234, "/var/x", "nginx")
    assert set(values) == render.template_variables(template)
    # The image runs envsubst with the defined FCN_* names only (NGINX_ENVSUBST_FILTER=^FCN_).
    shell_format = " ".join(f"${{{name}}}" for name in values)
    env = {**os.environ, **values, "HOST_NOT_OURS": "x"}
    proc = subprocess.run(
        [envsubst, shell_format],
        input=template,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ours = render.substitute(template, values)
    assert ours == proc.stdout
    assert (
        not render.template_variables(ours)
        and "$upstream_addr" in ours
        and "$fcn_request_id" in ours
    )
    assert "server 10.0.0.5:8000; server 10.0.0.6:8000;" in ours


def test_render_refuses_a_missing_variable() -> None:
    with pytest.raises(KeyError, match="FCN_LISTEN"):
        render.substitute("listen ${FCN_LISTEN};", {})
    with pytest.raises(ValueError, match="FCN_LISTEN"):
        render.substitute("listen $FCN_LISTEN;", {"FCN_LISTEN": "80"})


def test_nginx_accepts_the_compose_configuration(tmp_path: Path) -> None:
    """``nginx -t`` on the template rendered with docker-compose.yml's values. Only what cannot
    exist outside the containers is swapped: the replicas' DNS name, the worker user and the
    scratch directory."""
    nginx = tool("nginx")
    env = compose_env("nginx")
    assert (
        env["NGINX_ENVSUBST_FILTER"] == "^FCN_" and env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    )
    values = {k: v for k, v in env.items() if k.startswith("FCN_")}
    assert set(values) == render.template_variables(render.NGINX_TEMPLATE.read_text())
    local = {
        "FCN_UPSTREAM_SERVERS": f"server 127.0.0.1:{service_port()};",
        "FCN_NGINX_USER": "root" if os.geteuid() == 0 else getpass.getuser(),
        "FCN_NGINX_STATE_DIR": str(tmp_path),
    }
    conf = tmp_path / "nginx.conf"
    conf.write_text(render.substitute(render.NGINX_TEMPLATE.read_text(), {**values, **local}))
    proc = run_tool(nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr")
    assert "test is successful" in proc.stderr


def test_compose_wiring_agrees_across_files() -> None:
    from service.settings import Settings

    doc = compose()
    services = doc["services"]
    port = service_port()
    # Body limit: one default for the replicas and nginx, equal to the service's own default.
    limit = Settings.model_fields["max_body_bytes"].default
    assert compose_env("fcn")["FCN_MAX_BODY_BYTES"] == str(limit)
    assert compose_env("nginx")["FCN_MAX_BODY_BYTES"] == str(limit)
    assert "client_max_body_size ${FCN_MAX_BODY_BYTES};" in render.NGINX_TEMPLATE.read_text()
    # nginx and Prometheus reach every replica by the compose service name at the served port.
    assert compose_env("nginx")["FCN_UPSTREAM_SERVERS"] == f"server fcn:{port};"
    assert services["fcn"]["expose"] == [str(port)]
    job = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["job_name"] == render.SCRAPE_JOB
    assert job["dns_sd_configs"] == [
        {"names": ["fcn"], "type": "A", "port": port, "refresh_interval": "10s"}
    ]
    # Several replicas, each with a GPU reservation; nginx waits for them to be healthy.
    assert services["fcn"]["deploy"]["replicas"] >= 2
    (gpu,) = services["fcn"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["nginx"]["depends_on"]["fcn"]["condition"] == "service_healthy"
    # Grafana reads the Prometheus service, and the dashboard uses that data source.
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    dashboard = json.loads(DASHBOARD.read_text())
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert used == {source["uid"]}
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/fcn.yml").read_text())
    mounts = {
        v.split(":")[1]: v.split(":")[0]
        for v in services["grafana"]["volumes"]
        if v.startswith(".")
    }
    assert REPO / mounts[providers["providers"][0]["options"]["path"]] == DASHBOARD.parent


def test_compose_mounts_and_builds_files_that_exist() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"compose service {name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()
            stage_arg = build["args"]["VARIANT"]
            assert any(
                f"AS base-{stage_arg}" in r for w, r in dockerfile_instructions() if w == "FROM"
            )
    # Every dashboard JSON the provider loads is valid JSON with unique panel ids.
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_cpu_override_builds_the_cpu_image_without_a_gpu_reservation() -> None:
    text = COMPOSE_CPU.read_text()
    assert "devices: !reset []" in text
    fcn = load_yaml(COMPOSE_CPU)["services"]["fcn"]
    assert fcn["build"]["args"]["VARIANT"] == "cpu"
    assert fcn["environment"]["FCN_DEVICE"] == "cpu"
    assert fcn["deploy"]["resources"]["reservations"]["devices"] is None  # reset


# -- Prometheus ----------------------------------------------------------------------------------


def test_promtool_accepts_the_shipped_and_the_loopback_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    run_tool(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(render.render_prometheus(["127.0.0.1:1", "127.0.0.1:2"], "1s"))
    run_tool(promtool, "check", "config", str(rendered))
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    loopback = yaml.safe_load(rendered.read_text())
    # Only the discovery, the intervals and the rule path differ.
    assert loopback["scrape_configs"][0]["static_configs"] == [
        {"targets": ["127.0.0.1:1", "127.0.0.1:2"]}
    ]
    for doc in (shipped, loopback):
        for key in ("scrape_interval", "evaluation_interval", "scrape_timeout"):
            doc["global"].pop(key)
        doc["scrape_configs"][0].pop("dns_sd_configs", None)
        doc["scrape_configs"][0].pop("static_configs", None)
        doc.pop("rule_files")
    assert shipped == loopback


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = tool("promtool")
    proc = run_tool(promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert "SUCCESS" in proc.stdout + proc.stderr
    proc = run_tool(promtool, "test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in proc.stdout + proc.stderr
    alerts = {
        r["alert"] for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]
    }
    assert {"FcnHighP99Latency", "FcnHigh5xxRate", "FcnQueueSaturated", "FcnReplicaDown"} <= alerts
    tested = {
        case["alertname"]
        for t in load_yaml(PROMETHEUS_DIR / "alerts.test.yml")["tests"]
        for case in t["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert tested == alerts, "every alert needs a unit test that makes it fire"


def test_queue_saturation_threshold_follows_the_queue_size() -> None:
    from service.settings import Settings

    rules = {
        r["alert"]: r
        for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
        for r in g["rules"]
    }
    threshold = re.search(
        r"fcn_queue_depth\{[^}]*\}\[\w+\]\) > (\d+)", rules["FcnQueueSaturated"]["expr"]
    )
    assert threshold is not None
    assert int(threshold.group(1)) == Settings.model_fields["max_queue_size"].default * 3 // 4


# -- metric names in dashboards, alerts and the autoscaler ----------------------------------------


def exposed_metric_names() -> set[str]:
    """Every series name the service can expose, GPU memory included (CUDA replicas only)."""
    from service.metrics import Metrics

    metrics = Metrics()
    metrics.watch_gpu_memory(lambda: 0.0, lambda: 0.0)
    names = set()
    for family in metrics.registry.collect():
        suffixes = {
            "histogram": ("_bucket", "_count", "_sum"),
            "counter": ("_total",),
            "gauge": ("",),
        }[family.type]
        names |= {family.name + s for s in suffixes}
    return names


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_dashboards_alerts_and_autoscaler_name_real_metrics() -> None:
    exposed = exposed_metric_names()
    texts = {
        "dashboard": "\n".join(dashboard_expressions()),
        "alerts": (PROMETHEUS_DIR / "alerts.yml").read_text(),
        "hpa": (K8S / "hpa.yaml").read_text(),
        "adapter": (K8S / "prometheus-adapter-rules.yaml").read_text(),
    }
    for where, text in texts.items():
        used = set(re.findall(r"\bfcn_[a-z0-9_]+", text))
        assert used, where
        assert used <= exposed, (
            f"{where} names metrics the service does not expose: {used - exposed}"
        )
    # The dashboard shows every panel the issue lists.
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for wanted in (
        "Request rate by status",
        "Latency p50 / p95 / p99",
        "Queue wait vs inference time",
        "Batch size",
        "Queue depth",
        "Rejections by reason",
        "GPU memory",
    ):
        assert wanted in titles
    for reason in re.findall(r'reason="(\w+)"', texts["alerts"]):
        from service.metrics import REJECT_REASONS

        assert reason in REJECT_REASONS


# -- Kubernetes -----------------------------------------------------------------------------------


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and "kind" in d]
    return docs


def test_k8s_manifests_agree_with_the_service() -> None:
    from service.routes import ROUTERS

    routes = {getattr(r, "path", None) for part in ROUTERS for r in part.routes}
    docs = {d["kind"]: d for d in k8s_docs()}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    deployment = docs["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == service_port()
    assert container["args"] == dockerfile_exec("CMD")
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == port["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    from service.settings import Settings

    assert env["FCN_MAX_BODY_BYTES"] == str(Settings.model_fields["max_body_bytes"].default)
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == selector
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = docs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "fcn_queue_depth"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """The matcher the tests above rely on, on patterns Docker documents."""
    assert dockerignore_excludes("notes.txt")
    assert not dockerignore_excludes("service/api.py")
    assert dockerignore_excludes("service/__pycache__/api.cpython-311.pyc")
    assert dockerignore_excludes("bench/results/run.json")
    assert not dockerignore_excludes("weights/fcn8s-lite0-camvid.safetensors")
    assert dockerignore_excludes("weights/notes.txt")
