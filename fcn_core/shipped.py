"""Where the weights shipped with the project are: the one place that knows both layouts.

The repository's ``weights/`` folder is the source of truth. A wheel carries a copy of its
files as the package data ``fcn_core/weights_data`` (``pyproject.toml`` maps that package to
``weights/``), so ``pip install`` then ``fcn-serve`` outside a checkout still finds them; a
checkout, or an editable install of it, reads ``weights/`` itself.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS_NAME = "fcn8s-mnv2-voc.safetensors"
"""The file served when no other is configured (``weights/README.md`` says how it was made)."""

CAMVID_WEIGHTS_NAME = "fcn8s-lite0-camvid.safetensors"
"""The street-scene model shipped beside it (CamVid's 11 classes): ``fcn-bench``'s CamVid
scenario times it, so that its figures stay comparable from run to run."""

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = _PACKAGE / "weights_data"  # only in an installed wheel: never in the repository
_CHECKOUT = _PACKAGE.parent / "weights"


def default_weights_dir() -> Path:
    """The folder holding the shipped weights: the installed copy in a wheel install, else the
    repository's ``weights/`` (a checkout, an editable install)."""
    return _INSTALLED if _INSTALLED.is_dir() else _CHECKOUT
