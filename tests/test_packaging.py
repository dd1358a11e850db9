"""The wheel is what a user installs: it must carry the default weights, install no generic
top-level package (``bench``), and find its weights when used outside the checkout.

The wheel is built from a copy of the tree in a temporary folder, without the build outputs,
runs and caches git ignores: a stale ``build/`` cannot slip into it, and the checkout gets no
``build/`` of its own. It is installed into a fresh venv that sees this environment's packages
(``--system-site-packages``: torch and the rest need no download) and run from a folder that is
not the checkout, so only the installed copy can answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fcn_core.shipped import DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.weights import read_metadata

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES: list[str] = SETUPTOOLS["packages"]
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]
DATA_PACKAGES = {"fcn_core.weights_data"}  # package data only: the repository's weights/
# What a fresh checkout does not have: never part of a build (.gitignore names the same).
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    "build",
    "runs",
    "artifacts",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".*cache",
    ".hypothesis",
    ".venv",
    ".whl",
)


def package_folder(package: str) -> Path:
    """The folder a package is built from (pyproject's package-dir, else its dotted path)."""
    top, _, rest = package.partition(".")
    if package in PACKAGE_DIRS:
        return REPO / PACKAGE_DIRS[package]
    base = REPO / PACKAGE_DIRS.get(top, top)
    return base.joinpath(*rest.split(".")) if rest else base


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    """Run ``cmd`` with no PYTHONPATH or FCN_* settings, failing with its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("FCN_")}
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class WheelVenv:
    """A venv with the wheel installed, for running its python and console scripts (fcn-serve,
    fcn-bench) outside the checkout."""

    root: Path
    outside: Path  # an empty working folder, not the checkout

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.root / "bin" / name

    def run_python(self, code: str) -> str:
        return run([str(self.python), "-c", code], cwd=self.outside)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"]
    run([*pip_wheel, "--no-index", "-w", str(tmp / "dist")], cwd=source)
    (built,) = (tmp / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed_wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> WheelVenv:
    """The built wheel installed into a fresh venv; extend it to start ``fcn-serve`` from it."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = WheelVenv(tmp / "venv", tmp / "elsewhere")
    venv.outside.mkdir()
    # No pip of its own: the system's pip (visible through the system site) installs into it.
    run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv.root)],
        tmp,
    )
    pip_install = [str(venv.python), "-m", "pip", "install", "--no-deps", "--force-reinstall"]
    run([*pip_install, "--no-index", str(wheel)], cwd=venv.outside)
    return venv


def test_the_package_list_covers_every_package_folder() -> None:
    """pyproject lists the packages (two install under other names): a new subpackage must be
    listed too, or the wheel would silently lack it."""
    listed = {package_folder(p) for p in PACKAGES if p not in DATA_PACKAGES}
    tops = [d for d in REPO.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    on_disk = {
        d
        for top in tops
        for d in [top, *top.rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert sorted(map(str, on_disk - listed)) == [], "add these to [tool.setuptools] packages"
    assert sorted(map(str, listed - on_disk)) == [], "listed, but no Python files there"


def test_a_checkout_serves_the_weights_of_its_weights_folder() -> None:
    assert default_weights_dir() == REPO / "weights"
    assert (default_weights_dir() / DEFAULT_WEIGHTS_NAME).is_file()


def test_the_wheel_carries_the_weights_and_no_generic_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        shipped = whl.read(f"fcn_core/weights_data/{DEFAULT_WEIGHTS_NAME}")
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        scripts = whl.read(f"{dist_info}/entry_points.txt").decode()
    assert shipped == (REPO / "weights" / DEFAULT_WEIGHTS_NAME).read_bytes()
    tops = {n.split("/")[0] for n in names}
    assert tops == {p.split(".")[0] for p in PACKAGES} | {dist_info}  # no bench, tests, runs
    assert "fcn_bench/run.py" in names and not any(n.startswith("bench/") for n in names)
    assert "fcn-bench = fcn_bench.run:main" in scripts
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_an_installed_wheel_finds_and_loads_its_weights(installed_wheel_venv: WheelVenv) -> None:
    code = """
import json
import fcn_bench.run, fcn_core
from fcn_core.shipped import DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.weights import load_weights

folder = default_weights_dir()
loaded = load_weights(folder / DEFAULT_WEIGHTS_NAME)
print(json.dumps({
    "fcn_core": fcn_core.__file__,
    "fcn_bench": fcn_bench.run.__file__,
    "folder": str(folder),
    "sha256": loaded.meta.sha256,
}))
"""
    found = json.loads(installed_wheel_venv.run_python(code).splitlines()[-1])
    root = installed_wheel_venv.root.resolve()
    assert Path(found["fcn_core"]).is_relative_to(root), "imported the checkout, not the wheel"
    assert Path(found["fcn_bench"]).is_relative_to(root)
    assert Path(found["folder"]) == Path(found["fcn_core"]).parent / "weights_data"
    assert found["sha256"] == read_metadata(REPO / "weights" / DEFAULT_WEIGHTS_NAME).sha256
    assert installed_wheel_venv.script("fcn-bench").is_file()
    assert installed_wheel_venv.script("fcn-serve").is_file()


def test_an_installed_wheel_serves_out_of_the_box(installed_wheel_venv: WheelVenv) -> None:
    """`pip install fcn-serve-*.whl && fcn-serve` from any folder: the default weights load
    from the installed package and a real photo is segmented."""
    from service.settings import DEFAULT_WEIGHTS
    from tests.conftest import DEMO_PHOTOS
    from tests.helpers import free_port, start_server, stop_server, wait_for_http

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("FCN_")}
    env.update(CUDA_VISIBLE_DEVICES="", FCN_WARMUP="false")
    fcn_serve = str(installed_wheel_venv.script("fcn-serve"))
    cmd = [fcn_serve, "--host", "127.0.0.1", "--port", str(port)]
    proc = start_server(cmd, env, installed_wheel_venv.outside)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", 180, proc=proc, output=proc.stdout.read)
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert info["sha256"] == read_metadata(REPO / DEFAULT_WEIGHTS).sha256
        photo = (DEMO_PHOTOS / "dog.jpg").read_bytes()
        answer = httpx.post(
            f"{url}/segment",
            files={"image": ("dog.jpg", photo)},
            params={"output": "json"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["width"], body["height"]) == (768, 576) and body["classes"]
        print(f"wheel install served {DEFAULT_WEIGHTS.name}: {body['classes'][:3]}")
    finally:
        stop_server(proc)
