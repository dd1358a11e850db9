"""Render the nginx and Prometheus configuration for hosts that are not docker-compose.

docker-compose.yml hands ``nginx/nginx.conf.template`` to the nginx image, whose entrypoint
runs ``envsubst`` on it with the container's ``FCN_*`` variables; this module performs the same
substitution so that the loopback deployment test (``tests/test_deploy.py``) and bare-metal
hosts run the very file that compose runs, with only the upstream addresses, listen address
and scratch paths filled in differently. Unlike envsubst it refuses a missing variable, because
an empty ``client_max_body_size`` or upstream list is a broken balancer, not a default.

Prometheus cannot expand variables in its configuration, so the shipped
``prometheus/prometheus.yml`` (DNS discovery of the compose service) is rewritten structurally:
static targets replace the discovery, intervals and the rule path are set, nothing else moves.

    python docker/render.py nginx --upstream 10.0.0.5:8000 --upstream 10.0.0.6:8000 \\
        --listen 80 --state-dir /var/lib/fcn-nginx > /etc/nginx/nginx.conf
    python docker/render.py prometheus --target 10.0.0.5:8000 --target 10.0.0.6:8000 \\
        > /etc/prometheus/prometheus.yml
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

DOCKER_DIR = Path(__file__).resolve().parent
NGINX_TEMPLATE = DOCKER_DIR / "nginx" / "nginx.conf.template"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
SCRAPE_JOB = "fcn"

# Only ${FCN_*} names are ours: every other $name in the template is an nginx variable. The
# nginx image is told the same through NGINX_ENVSUBST_FILTER=^FCN_ in docker-compose.yml.
PLACEHOLDER = re.compile(r"\$\{(FCN_[A-Z0-9_]+)\}")
UNBRACED = re.compile(r"\$FCN_[A-Z0-9_]+")


def template_variables(text: str) -> set[str]:
    """The ``FCN_*`` names a template expects."""
    return set(PLACEHOLDER.findall(text))


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``envsubst`` restricted to ``${FCN_*}``, failing on a name without a value."""
    unbraced = UNBRACED.search(text)
    if unbraced:
        name = unbraced.group(0)[1:]
        raise ValueError(f"write template variables as ${{{name}}}, not ${name}")
    missing = sorted(template_variables(text) - set(values))
    if missing:
        raise KeyError(f"no value for template variables {missing}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def nginx_values(
    upstreams: Sequence[str],
    listen: str,
    max_body_bytes: int,
    state_dir: str | Path,
    user: str,
) -> dict[str, str]:
    """The variables of ``nginx.conf.template``; compose sets the same names in its environment."""
    if not upstreams:
        raise ValueError("at least one upstream host:port is needed")
    return {
        "FCN_UPSTREAM_SERVERS": " ".join(f"server {u};" for u in upstreams),
        "FCN_LISTEN": str(listen),
        "FCN_MAX_BODY_BYTES": str(int(max_body_bytes)),
        "FCN_NGINX_STATE_DIR": str(state_dir),
        "FCN_NGINX_USER": user,
    }


def render_nginx(
    upstreams: Sequence[str],
    listen: str,
    max_body_bytes: int,
    state_dir: str | Path,
    user: str,
    template: Path = NGINX_TEMPLATE,
) -> str:
    values = nginx_values(upstreams, listen, max_body_bytes, state_dir, user)
    return substitute(template.read_text(), values)


def render_prometheus(
    targets: Sequence[str],
    interval: str | None = None,
    config: Path = PROMETHEUS_CONFIG,
) -> str:
    """The shipped Prometheus config with static targets for the fcn job instead of DNS.

    Rule files become absolute paths into the shipped directory, so the rendered file can
    live anywhere and still load the same alerting rules.
    """
    import yaml  # PyYAML: only this function needs it

    if not targets:
        raise ValueError("at least one scrape target host:port is needed")
    doc = yaml.safe_load(config.read_text())
    if interval is not None:
        doc["global"]["scrape_interval"] = interval
        doc["global"]["evaluation_interval"] = interval
        doc["global"]["scrape_timeout"] = interval
    doc["rule_files"] = [str((config.parent / r).resolve()) for r in doc.get("rule_files", [])]
    jobs = [j for j in doc["scrape_configs"] if j["job_name"] == SCRAPE_JOB]
    if len(jobs) != 1:
        raise ValueError(f"{config} must have exactly one scrape job named {SCRAPE_JOB!r}")
    job = jobs[0]
    job.pop("dns_sd_configs", None)
    job["static_configs"] = [{"targets": list(targets)}]
    return yaml.safe_dump(doc, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ng = sub.add_parser("nginx", help="nginx.conf for the given fcn-serve replicas")
    ng.add_argument("--upstream", action="append", required=True, metavar="HOST:PORT")
    ng.add_argument("--listen", default="80", help="nginx listen address (default 80)")
    ng.add_argument(
        "--max-body-bytes",
        type=int,
        required=True,
        help="the replicas' FCN_MAX_BODY_BYTES, so that nginx and the service agree",
    )
    ng.add_argument("--state-dir", default="/var/cache/nginx", help="pid file and temp files")
    ng.add_argument("--user", default="nginx", help="worker user (when started as root)")
    pr = sub.add_parser("prometheus", help="prometheus.yml scraping the given replicas")
    pr.add_argument("--target", action="append", required=True, metavar="HOST:PORT")
    pr.add_argument("--interval", default=None, help="scrape and rule interval, e.g. 5s")
    args = parser.parse_args(argv)
    if args.what == "nginx":
        out = render_nginx(
            args.upstream, args.listen, args.max_body_bytes, args.state_dir, args.user
        )
    else:
        out = render_prometheus(args.target, args.interval)
    print(out, end="")


if __name__ == "__main__":
    main()
