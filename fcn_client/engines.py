"""Spark and Beam over the bulk core: the adapters that let their inference helpers run
:class:`fcn_client.bulk.BulkSegmenter`.

This module owns the two adapters and the row both emit, one per image:
``labels_png`` (the server's ``output=labels`` bytes; None on error), ``classes`` (the classes
present as a JSON list, as in the server's JSON answer) and ``error`` ("<status>: <detail>",
None on success). A file that cannot be decoded gives a row with ``error`` set; the job goes on.

- PySpark: :func:`segment_udf`, over ``pyspark.ml.functions.predict_batch_udf`` (the model is
  loaded once per Python worker and reused across tasks).
- Apache Beam: ``SegmentModelHandler``, a ``ModelHandler`` for ``RunInference``.

Both take encoded images (bytes) of any sizes in one batch. The engines' stock helpers do not:
Beam's PyTorch/TensorFlow handlers stack a batch's tensors, and ``predict_batch_udf``'s tensor
columns need one fixed ``input_tensor_shapes``, so photos of mixed sizes fail there; here the
core groups a batch by size bucket and answers each image at its own size.

pyspark and apache_beam are imported only when an adapter is built, so this module imports
without them (``pip install 'fcn-serve[spark]'`` or ``'fcn-serve[beam]'``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from fcn_client.bulk import BulkResult, BulkSegmenter
from service import codecs

if TYPE_CHECKING:
    from pyspark.sql import Column

FIELDS = ("labels_png", "classes", "error")


class SegmentRow(TypedDict):
    """One image's answer as the engines emit it (plain values: any coder or format takes it)."""

    labels_png: bytes | None
    classes: str
    error: str | None


def segment_row(model: BulkSegmenter, result: BulkResult) -> SegmentRow:
    return {
        "labels_png": model.png(result) if result.ok else None,
        "classes": result.classes_json(),
        "error": result.error,
    }


# -- PySpark ---------------------------------------------------------------------------------


def segment_udf(
    weights: str | Path | None = None,
    device: str | None = None,
    backend: str | None = None,
    *,
    batch_size: int = 16,
) -> Callable[[Column | str], Column]:
    """A column function for ``binaryFile`` rows: ``df.withColumn("seg", segment_udf()("content"))``
    gives ``seg`` a struct of ``labels_png`` (binary), ``classes`` (string, JSON) and ``error``
    (string).

    ``weights``, ``device`` and ``backend`` override the executors' ``FCN_*`` settings (set
    the others with ``spark.executorEnv.FCN_...``). ``batch_size`` images are decoded and run
    together; the model's own batch limits (``FCN_MAX_BATCH_SIZE``, pixels) still apply inside.
    """
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    # predict_batch_udf refuses binary fields in a struct ("Unsupported field type in return
    # struct type": only numbers and strings), so the PNG crosses as base64 text and is turned
    # back into bytes in the JVM. The UDF still runs once per row (one ArrowEvalPython node).
    udf = predict_batch_udf(
        functools.partial(_spark_predict_fn, weights, device, backend),
        return_type=StructType([StructField(name, StringType()) for name in FIELDS]),
        batch_size=batch_size,
    )

    def segment(content: Column | str) -> Column:
        seg = udf(content)
        return seg.withField("labels_png", F.unbase64(seg.getField("labels_png")))

    return segment


def _spark_predict_fn(
    weights: str | Path | None, device: str | None, backend: str | None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """predict_batch_udf's ``make_predict_fn``: runs in each Python worker, once."""
    model = BulkSegmenter.from_environment(weights, device, backend)

    def predict(contents: np.ndarray) -> dict[str, np.ndarray]:
        # A binary column arrives as an object array of bytes; a null cell is answered as the
        # server answers an empty body, not by failing the task.
        results = model.segment([b if b is not None else b"" for b in contents])
        rows = [segment_row(model, r) for r in results]
        columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in FIELDS}
        columns["labels_png"] = [
            None if png is None else codecs.b64(png) for png in columns["labels_png"]
        ]
        return {name: np.array(values, dtype=object) for name, values in columns.items()}

    return predict


# -- Apache Beam -----------------------------------------------------------------------------


def _define_model_handler() -> type:
    from apache_beam.ml.inference.base import ModelHandler

    class SegmentModelHandler(ModelHandler[bytes, SegmentRow, BulkSegmenter]):
        """``RunInference(SegmentModelHandler())``: encoded images in, :class:`SegmentRow` out.

        Wrap it in ``KeyedModelHandler`` to carry a key (the file's path) through. Each worker
        loads the model once (``load_model``); ``weights``/``device``/``backend`` override
        its ``FCN_*`` settings, and ``env_vars`` (Beam's own convention) are set in the worker
        before the model loads, e.g. ``{"FCN_TORCH_THREADS": "1"}``.
        """

        def __init__(
            self,
            weights: str | Path | None = None,
            device: str | None = None,
            backend: str | None = None,
            *,
            min_batch_size: int = 1,
            max_batch_size: int = 16,
            env_vars: Mapping[str, str] | None = None,
        ) -> None:
            super().__init__()
            self.weights = str(weights) if weights else None
            self.device = device
            self.backend = backend
            self._batching = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}
            self._env_vars = dict(env_vars or {})  # read by ModelHandler.set_environment_vars

        def load_model(self) -> BulkSegmenter:
            return BulkSegmenter.from_environment(self.weights, self.device, self.backend)

        def run_inference(
            self,
            batch: Sequence[bytes],
            model: BulkSegmenter,
            inference_args: dict[str, Any] | None = None,
        ) -> Iterable[SegmentRow]:
            return [segment_row(model, r) for r in model.segment(batch)]

        def batch_elements_kwargs(self) -> Mapping[str, Any]:
            return self._batching

        def get_num_bytes(self, batch: Sequence[bytes]) -> int:
            return sum(len(b) for b in batch)  # the default pickles the batch to measure it

        def get_metrics_namespace(self) -> str:
            return "fcn_segment"

    # Found by pickle under this module's name (module __getattr__ below), so that Beam ships
    # the handler by reference, as it would a class defined at the top level.
    SegmentModelHandler.__qualname__ = "SegmentModelHandler"
    return SegmentModelHandler


def __getattr__(name: str) -> Any:
    # The handler subclasses Beam's ModelHandler, so it is defined when first asked for:
    # importing this module must not need apache_beam.
    if name == "SegmentModelHandler":
        cls = globals()[name] = _define_model_handler()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
