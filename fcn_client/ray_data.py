"""Ray Data: the bulk core as a ``map_batches`` class, and a step that writes the label PNGs.

This module owns the Ray Data face of :mod:`fcn_client.bulk`: turning a batch of rows (a dict
of numpy columns, ``batch_format="numpy"``) into the server's answers as columns, how actors
size themselves to the CPUs Ray gives them, and writing each row's PNG to a folder. What
decides the bytes stays in ``BulkSegmenter`` (the server's settings, model and codecs), so a
``labels_png`` of a ``read_binary_files`` row is what ``POST /segment?output=labels`` answers
for the same file (on the CPU decode path: ``FCN_DECODE_ON_DEVICE`` is the server's alone)::

    import ray
    from fcn_client.ray_data import RaySegmenter

    ds = ray.data.read_binary_files("photos/", include_paths=True)
    ds = ds.map_batches(
        RaySegmenter,
        fn_constructor_kwargs={"weights": "weights/fcn8s-mnv2-voc.safetensors"},
        compute=ray.data.ActorPoolStrategy(size=2),  # concurrency=2 before Ray 2.50
        num_cpus=0.5,  # on CPUs: leave Ray a CPU to read files with
        batch_size=16,
        batch_format="numpy",
    )

Input columns: ``bytes`` (``read_binary_files``: encoded images, decoded as the server
decodes them) or ``image`` (``read_images``: pixel arrays, any sizes; grey, grey+alpha and
RGBA arrays are converted as the server converts those modes, but Ray has decoded them its own
way: no EXIF orientation, palette images as indices, CMYK as four channels; its labels are
those of the pixels given, not the server's for the file); ``path`` is passed through.
Output columns: ``labels_png`` (bytes, empty on error), ``classes`` (JSON text: the classes
present, as in the server's JSON answer), ``error`` (``""`` when fine, else "<HTTP status>:
<what is wrong>", as the server would answer), and ``labels`` (H x W uint8, 0 x 0 on error)
when asked for. A file that cannot be decoded is a row with ``error`` set, never a failed
task, for ``read_binary_files``; ``read_images`` fails its read task on such a file, before
this class sees it.

Ray itself is imported only where a dataset is built (:func:`segment_dataset`), and torch
only in the actors, so ``import fcn_client.ray_data`` costs neither.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcn_core.files import atomic_write

if TYPE_CHECKING:  # torch and the service: in the actors only
    from fcn_client.bulk import BulkResult, BulkSegmenter

BYTES = "bytes"
IMAGE = "image"
PATH = "path"
LABELS_PNG = "labels_png"
CLASSES = "classes"
ERROR = "error"
LABELS = "labels"
OUTPUT = "output"


class RaySegmenter:
    """Rows of encoded images or pixel arrays -> the server's label PNGs, class shares and
    errors, a batch at a time (see the module docstring). One per actor: it holds a model."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | None = None,
        backend: str | None = None,
        *,
        labels: bool = False,
    ) -> None:
        from fcn_client.bulk import BulkSegmenter  # torch: imported in the actor

        fit_threads_to_ray_share()
        self.bulk: BulkSegmenter = BulkSegmenter.from_environment(weights, device, backend)
        self.with_labels = labels

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if BYTES in batch:
            results = self.bulk.segment([bytes(b) for b in batch[BYTES]])
        elif IMAGE in batch:
            results = self.bulk.segment_arrays(list(batch[IMAGE]))
        else:
            raise KeyError(
                f"no '{BYTES}' column (read_binary_files) nor '{IMAGE}' column (read_images) "
                f"in a batch of {sorted(batch)}"
            )
        columns = self.columns(results)
        if PATH in batch:
            columns[PATH] = np.asarray(batch[PATH], dtype=object)
        return columns

    def columns(self, results: Sequence[BulkResult]) -> dict[str, np.ndarray]:
        """Results as Arrow-friendly columns: bytes, JSON text, text (and arrays)."""
        cols = {
            LABELS_PNG: objects(self.bulk.png(r) if r.ok else b"" for r in results),
            CLASSES: objects(r.classes_json() for r in results),
            ERROR: objects(r.error or "" for r in results),
        }
        if self.with_labels:
            empty = np.zeros((0, 0), np.uint8)
            cols[LABELS] = objects(r.labels if r.labels is not None else empty for r in results)
        return cols


def objects(items: Any) -> np.ndarray:
    """A 1-D object array, one item per row, whatever the items are (numpy would otherwise
    make a 3-D array of equally shaped label maps, or a fixed-width byte string array)."""
    values = list(items)
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def fit_threads_to_ray_share() -> None:
    """In a Ray worker, run as many CPU threads as the CPUs Ray gave it (``num_cpus``), not one
    per core of the machine: several actors on one node would otherwise each start a thread
    per core. ``FCN_CPU_WORKERS`` / ``FCN_TORCH_THREADS`` set by the user win. Outside Ray,
    and on a GPU, it does nothing that matters."""
    cpus = ray_cpu_share()
    if cpus is None:
        return
    os.environ.setdefault("FCN_CPU_WORKERS", str(cpus))
    if cpus == 1:  # one worker: a lone image would otherwise get every core of the machine
        os.environ.setdefault("FCN_TORCH_THREADS", "1")


def ray_cpu_share() -> int | None:
    """Whole CPUs Ray assigned to this worker (at least 1), or None outside a Ray worker."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; elsewhere, not worth a second
    if ray is None or not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


def output_name(path: str, roots: Sequence[str | Path] = ()) -> Path:
    """Where a row's outputs go below the output folder, without suffix: its path below the
    first of ``roots`` that holds it, else its file name (``fcn-segment``'s rule). Both are
    taken from the working folder when relative, as Ray hands back the paths it was given."""
    source = Path(path).absolute()
    for root in roots:
        if source.is_relative_to(Path(root).absolute()):
            return source.relative_to(Path(root).absolute()).with_suffix("")
    return Path(source.stem)


def write_pngs(
    batch: Mapping[str, Any], out_dir: str | Path, roots: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """A ``map_batches`` step after :class:`RaySegmenter`: each row's PNG to
    ``out_dir/<output_name>.png``, written atomically (a temporary file in the same folder,
    then a rename), so a killed job leaves no half-written file under a final name. Adds an
    ``output`` column (the file written, ``""`` for rows with an error).

    The folder must be one that every worker can write (one machine, or a shared mount)::

        ds.map_batches(write_pngs, fn_kwargs={"out_dir": "seg/", "roots": ["photos/"]},
                       batch_format="numpy")
    """
    written = []
    for path, png, error in zip(batch[PATH], batch[LABELS_PNG], batch[ERROR], strict=True):
        if error:
            written.append("")
            continue
        target = Path(out_dir) / output_name(str(path), roots).with_suffix(".png")
        written.append(str(atomic_write(target, bytes(png))))
    return {**batch, OUTPUT: objects(written)}


def segment_dataset(
    ds: Any,
    *,
    weights: str | Path | None = None,
    device: str | None = None,
    backend: str | None = None,
    actors: int = 2,
    batch_size: int = 16,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    labels: bool = False,
    env: Mapping[str, str] | None = None,
) -> Any:
    """``ds.map_batches(RaySegmenter, ...)`` on ``actors`` actors, with resources chosen for the
    cluster ``ray.init`` connected to; ``fcn-segment-bulk --ray`` runs this.

    ``num_gpus`` (per actor) defaults to a GPU each where the cluster has them and ``device``
    is not ``cpu``; ``num_cpus`` to the cluster's CPUs less one (left to the read tasks, which
    would otherwise wait for ever behind actors that hold every CPU) shared among the actors.
    ``env`` (default: this process's ``FCN_*`` variables) is the actors' environment, so they
    run the settings the caller has, on whatever node they land.
    """
    import ray

    resources = ray.cluster_resources()
    if num_gpus is None:
        gpus = resources.get("GPU", 0.0)
        num_gpus = min(1.0, gpus / actors) if gpus and device != "cpu" else 0.0
    if num_cpus is None:
        num_cpus = max(0.25, (resources.get("CPU", 1.0) - 1.0) / actors)
        if num_gpus:
            num_cpus = min(num_cpus, 1.0)  # the GPU computes; the CPU decodes and encodes
    if env is None:
        env = {k: v for k, v in os.environ.items() if k.startswith("FCN_")}
    return ds.map_batches(
        RaySegmenter,
        fn_constructor_kwargs={
            "weights": weights,
            "device": device,
            "backend": backend,
            "labels": labels,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env={"env_vars": dict(env)},
    )
