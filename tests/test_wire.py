"""``fcn_client``: the wire names are the server's own, and importing them stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fcn_client import wire

REPO = Path(__file__).resolve().parents[1]


def test_the_client_package_imports_no_server_stack() -> None:
    # A fresh interpreter (this one has torch and the service loaded already) imports every
    # module of the package but those that run the server's stages in process by design
    # (``local`` for --local; ``bulk`` and the engines' adapters over it; ``ray_data``, whose
    # rows are numpy columns) and ``__main__``, which would run the CLI. The commands,
    # fcn-segment-bulk included, stay light.
    probe = (
        "import importlib, pkgutil, sys, fcn_client\n"
        "for m in pkgutil.iter_modules(fcn_client.__path__):\n"
        "    if m.name not in ('local', 'bulk', 'engines', 'ray_data', '__main__'):\n"
        "        importlib.import_module('fcn_client.' + m.name)\n"
        "assert 'fcn_client.wire' in sys.modules\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & HEAVY)))"
    ).replace("HEAVY", repr({"torch", "numpy", "service"}))
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"fcn_client imported {done.stdout.strip()}"


def test_the_server_uses_the_wire_names() -> None:
    from service.app import create_app
    from service.settings import Settings

    schema = create_app(Settings(warmup=False)).openapi()
    params = {p["name"]: p for p in schema["paths"]["/segment"]["post"]["parameters"]}
    components = schema["components"]["schemas"]
    for name, enum in (("output", wire.Output), ("format", wire.ImageFormat)):
        ref = params[name]["schema"]["$ref"].rsplit("/", 1)[1]
        assert components[ref]["enum"] == [member.value for member in enum]
