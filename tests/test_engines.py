"""Spark and Beam run the bulk core: real engines (a local Spark session, Beam's DirectRunner)
over real photos of mixed sizes and a corrupt file, read as their users read files.

Each row must carry the label PNG that ``BulkSegmenter.segment`` + ``.png`` gives for the same
bytes in this process (the core's equality with the server is tested with the core), and the
corrupt file an error row, not a failed job. A test skips, saying why, where its engine is not
installed: apache-beam is not in the dev extra (see pyproject.toml).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fcn_client.bulk import BulkSegmenter
from fcn_client.engines import segment_row
from tests.conftest import demo_photos

# The untrained test model has near-ties: the references and the engines' workers must run
# torch on one thread each to give the same labels.
PINNED = {"FCN_BACKEND": "torch", "FCN_TORCH_THREADS": "1", "FCN_WARMUP": "false"}
PHOTOS = ("person.jpg", "scream.jpg", "giraffe.jpg")  # 640x424, 352x448, 500x500
CORRUPT = "truncated.jpg"


@pytest.fixture(scope="module")
def engine_env(service_weights: Path) -> Iterator[None]:
    """No inherited FCN_* settings, the test weights, torch on one thread; set before any
    engine starts, so that the workers it forks inherit them too."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("FCN_")]:
            mp.delenv(name)
        mp.setenv("FCN_WEIGHTS", str(service_weights))
        for name, value in PINNED.items():
            mp.setenv(name, value)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three photos of different sizes and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    chosen = [p for p in demo_photos() if p.name in PHOTOS]
    assert len(chosen) == len(PHOTOS), f"missing demo photos: {PHOTOS}"
    for photo in chosen:
        shutil.copy(photo, folder / photo.name)
    (folder / CORRUPT).write_bytes(chosen[0].read_bytes()[:5000])
    return folder


@pytest.fixture(scope="module")
def expected(engine_env: None, photos: Path) -> dict[str, dict[str, Any]]:
    """What the core answers for each file, by file name."""
    files = sorted(photos.iterdir())
    core = BulkSegmenter.from_environment()
    try:
        results = core.segment([f.read_bytes() for f in files])
        rows = {f.name: dict(segment_row(core, r)) for f, r in zip(files, results, strict=True)}
    finally:
        core.close()
    assert rows[CORRUPT]["error"].startswith("422: ")
    assert all(rows[name]["labels_png"] for name in PHOTOS)
    return rows


# -- PySpark ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spark(engine_env: None) -> Iterator[Any]:
    """One local Spark session for the module (it takes ~15 s to start)."""
    pytest.importorskip(
        "pyspark.ml.functions", reason="pyspark is not installed (pip install 'fcn-serve[spark]')"
    )
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("Spark needs a Java runtime (java on PATH or JAVA_HOME)")
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master("local[2]")
        .appName("fcn-engines-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
    )
    # As the README tells users: the executors' settings through spark.executorEnv.
    for name, value in PINNED.items():
        builder = builder.config(f"spark.executorEnv.{name}", value)
    session = builder.getOrCreate()
    yield session
    session.stop()


def test_spark_binary_files_get_the_cores_label_pngs_and_errors(
    spark: Any, photos: Path, service_weights: Path, expected: dict[str, dict[str, Any]]
) -> None:
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType

    from fcn_client.engines import segment_udf

    # One partition, batches of 3: a batch holds photos of different sizes and the corrupt
    # file together, and the last batch is a short one.
    files = spark.read.format("binaryFile").load(str(photos)).coalesce(1)
    seg = files.withColumn("seg", segment_udf(weights=service_weights, batch_size=3)("content"))
    fields = {f.name: f.dataType for f in seg.schema["seg"].dataType.fields}
    assert fields == {"labels_png": BinaryType(), "classes": StringType(), "error": StringType()}

    rows = seg.select(F.element_at(F.split("path", "/"), -1).alias("name"), "seg.*").collect()
    got = {
        r.name: {
            "labels_png": None if r.labels_png is None else bytes(r.labels_png),
            "classes": r.classes,
            "error": r.error,
        }
        for r in rows
    }
    assert got == expected


# -- Apache Beam -----------------------------------------------------------------------------


def digest(row: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """A row with its PNG as a SHA-256, so that a failure prints readably."""
    png = row["labels_png"]
    return (hashlib.sha256(png).hexdigest() if png else None, row["classes"], row["error"])


def test_beam_run_inference_gives_the_cores_label_pngs_and_errors(
    engine_env: None, photos: Path, service_weights: Path, expected: dict[str, dict[str, Any]]
) -> None:
    beam = pytest.importorskip(
        "apache_beam",
        reason="apache-beam is not installed: it pins pillow<13 and pyarrow<26, so it is not "
        "in the dev extra (pip install 'fcn-serve[beam]' in a venv of its own)",
    )
    from apache_beam.io import fileio
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from fcn_client.engines import SegmentModelHandler

    handler = SegmentModelHandler(
        weights=service_weights,
        min_batch_size=len(expected),  # one batch of mixed sizes with the corrupt file in it
        max_batch_size=len(expected),
        env_vars=PINNED,
    )
    want = [(name, digest(row)) for name, row in expected.items()]
    with beam.Pipeline(runner="DirectRunner") as p:
        out = (
            p
            | fileio.MatchFiles(str(photos / "*"))
            | fileio.ReadMatches()
            | beam.Map(lambda f: (Path(f.metadata.path).name, f.read()))
            | RunInference(KeyedModelHandler(handler))
            | beam.MapTuple(lambda name, row: (name, digest(row)))
        )
        assert_that(out, equal_to(want))
