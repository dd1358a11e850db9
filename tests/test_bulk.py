"""Bulk jobs: ``fcn-segment-bulk`` in this process and on a real local Ray cluster, and
``RaySegmenter`` in a pipeline as Ray users write one.

Real photos of mixed sizes (demo and VOC photos, one made grey), two broken files (a
truncated JPEG, random bytes named .jpg), the tests' weights, and the real app served on
loopback to compare with: every label PNG must be byte for byte what the server answers.
Every ``FCN_*`` variable is cleared for the module and the tests' settings set instead
(torch on one thread, as the server fixture runs, and a 320-pixel side to keep it quick);
Ray is started once for the module, after that, so its workers inherit them.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_client.bulk_cli import ERRORS_FILE, main
from fcn_client.sdk import SegmentationClient
from fcn_client.wire import Output
from service.app import create_app
from tests.conftest import DEMO_PHOTOS, SHARED_DATA, labels_from_png, run_server, test_settings
from tests.helpers import wait_for

VOC_PHOTOS = SHARED_DATA / "voc-photos"
# Mixed sizes: landscape, portrait, square, one above the 320-pixel side in both directions.
PHOTOS = {
    "dog.jpg": DEMO_PHOTOS / "dog.jpg",  # 768 x 576
    "giraffe.jpg": DEMO_PHOTOS / "giraffe.jpg",  # 500 x 500
    "scream.jpg": DEMO_PHOTOS / "scream.jpg",  # 352 x 448
    "coco/000000000540.jpg": VOC_PHOTOS / "coco" / "000000000540.jpg",  # 500 x 332
    "coco/000000000562.jpg": VOC_PHOTOS / "coco" / "000000000562.jpg",  # 330 x 500
    "det/person.jpg": VOC_PHOTOS / "imagenet-det" / "n00007846_147031_person.jpg",  # 333 x 500
}
GREY = "grey.png"  # horses.jpg as an 8-bit grey PNG: Ray's read_images leaves it 2-D
BROKEN = ["broken/truncated.jpg", "broken/random.jpg"]
MAX_SIDE = 320
SUMMARY = re.compile(r"(\d+)/(\d+) images segmented .* (\d+) skipped \(done before\), (\d+) failed")


@pytest.fixture(scope="module")
def bulk_env(service_weights: Path) -> Iterator[dict[str, str]]:
    """The module's FCN_* settings, and no others; torch's thread count put back after."""
    env = {
        "FCN_WEIGHTS": str(service_weights),
        "FCN_BACKEND": "torch",  # the references are torch's labels (conftest.test_settings)
        "FCN_TORCH_THREADS": "1",  # as the server fixture: the untrained model has near-ties
        "FCN_WARMUP": "false",
        "FCN_MAX_SIDE": str(MAX_SIDE),
    }
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("FCN_")]:
            mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        yield env
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``photos/``: the real photos (some in subfolders), the grey one and the broken ones."""
    missing = [str(p) for p in PHOTOS.values() if not p.is_file()]
    if missing:
        pytest.skip(f"shared photos not found: {missing}")
    root = tmp_path_factory.mktemp("bulk") / "photos"
    for name, source in PHOTOS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / name)
    Image.open(DEMO_PHOTOS / "horses.jpg").convert("L").save(root / GREY)
    (root / "broken").mkdir()
    dog = (root / "dog.jpg").read_bytes()
    (root / BROKEN[0]).write_bytes(dog[: len(dog) // 3])  # a JPEG cut a third of the way
    (root / BROKEN[1]).write_bytes(np.random.default_rng(0).bytes(4000))
    return root


def good_names() -> list[str]:
    return [*PHOTOS, GREY]


@pytest.fixture(scope="module")
def server(bulk_env: dict[str, str], service_weights: Path) -> Iterator[str]:
    """The real app on loopback, with the module's settings: its URL."""
    settings = test_settings(service_weights, max_side=MAX_SIDE)
    with run_server(create_app(settings)) as live:
        yield live.url


@pytest.fixture(scope="module")
def answers(server: str, photos: Path) -> dict[str, bytes]:
    """The server's label PNG of each good photo, by its path below ``photos``."""
    with SegmentationClient(server) as client:
        return {name: client.segment(photos / name).content for name in good_names()}


@pytest.fixture(scope="module")
def ray_cluster(bulk_env: dict[str, str]) -> Iterator[object]:
    """One local Ray of two CPUs for the module (it takes seconds to start)."""
    ray = pytest.importorskip(
        "ray", reason="ray[data] is not installed: pip install 'fcn-serve[ray]'"
    )
    pytest.importorskip("ray.data", reason="ray is installed without ray[data]")
    ray.init(
        address="local",  # this machine's own, whatever RAY_ADDRESS says
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


def outputs(out: Path) -> dict[str, bytes]:
    """Every label PNG under ``out``, by its path below it without the suffix."""
    return {
        p.relative_to(out).with_suffix("").as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*.png"))
    }


def without_suffix(names: list[str]) -> list[str]:
    return sorted(Path(n).with_suffix("").as_posix() for n in names)


def summary_counts(stdout: str) -> tuple[int, int, int, int]:
    """(segmented, to do, skipped, failed) from the run's summary line."""
    match = SUMMARY.search(stdout)
    assert match, stdout
    done, todo, skipped, failed = map(int, match.groups())
    return done, todo, skipped, failed


def assert_bad_images_reported(out: Path, photos: Path, stderr: str) -> None:
    records = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(photos / b) for b in BROKEN)
    by_name = {Path(r["path"]).name: r["error"] for r in records}
    assert by_name["truncated.jpg"].startswith("422: JPEG image data is truncated")
    assert by_name["random.jpg"].startswith("415: not a recognised image")
    for name in BROKEN:
        assert f"failed: {photos / name}: " in stderr
    assert not (out / "broken").exists()  # nothing written for them


def test_in_process_cli_writes_the_servers_bytes_and_reports_bad_images(
    photos: Path, answers: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main([str(photos), "-o", str(out), "--batch-size", "3", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1, captured  # two images failed; the others are done
    written = outputs(out)
    assert sorted(written) == without_suffix(good_names())
    for name, answer in answers.items():
        assert written[Path(name).with_suffix("").as_posix()] == answer, name
    assert summary_counts(captured.out) == (7, 9, 0, 2)
    assert_bad_images_reported(out, photos, captured.err)


def test_a_killed_job_restarts_where_it_stopped(
    photos: Path, answers: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL once some outputs exist; the rerun computes only the rest and leaves the
    finished files alone (same inode, same modification time); no file is ever half there."""
    good = tmp_path / "good"
    for name in good_names():
        (good / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / name, good / name)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fcn_client.bulk_cli", str(good), "-o", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--batch-size", "1", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for("two outputs", lambda: len(list(out.rglob("*.png"))) >= 2, 180, every=0.02)
        assert proc.poll() is None, "the job finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, log
    first = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    assert 2 <= len(first) < len(good_names())
    for path in first:  # whole files under final names, whatever the kill interrupted
        assert labels_from_png(path.read_bytes())[0].size > 0

    time.sleep(0.01)  # a rewrite would show in the modification time
    assert main([str(good), "-o", str(out), "--batch-size", "2", "--no-progress"]) == 0
    remaining = len(good_names()) - len(first)
    assert summary_counts(capsys.readouterr().out) == (remaining, remaining, len(first), 0)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first} == first
    written = outputs(out)
    assert sorted(written) == without_suffix(good_names())
    for name, answer in answers.items():
        assert written[Path(name).with_suffix("").as_posix()] == answer, name


def test_parquet_output_holds_the_servers_answers_and_resumes(
    photos: Path, answers: dict[str, bytes], server: str, tmp_path: Path, capsys
) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="--format parquet needs pyarrow")
    out = tmp_path / "out"
    args = [str(photos), "-o", str(out), "--format", "parquet", "--batch-size", "4"]
    assert main([*args, "--no-progress"]) == 1  # the broken ones
    assert summary_counts(capsys.readouterr().out) == (7, 9, 0, 2)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3  # one per batch of 4 (9 images), each holding its good rows
    rows = {r["name"]: r for part in parts for r in pq.read_table(part).to_pylist()}
    assert sorted(rows) == without_suffix(good_names())
    with SegmentationClient(server) as client:
        for name, answer in answers.items():
            row = rows[Path(name).with_suffix("").as_posix()]
            assert row["labels_png"] == answer and row["path"] == str(photos / name)
            body = client.segment(photos / name, output=Output.json).json()
            assert json.loads(row["classes"]) == body["classes"], name

    assert main([*args, "--no-progress"]) == 1  # the broken ones fail again
    assert summary_counts(capsys.readouterr().out) == (0, 2, 7, 2)
    assert sorted(out.glob("part-*.parquet")) == parts  # nothing new to write


def test_ray_cli_writes_the_servers_bytes_skips_done_and_reports_bad_images(
    ray_cluster: object,
    photos: Path,
    answers: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two outputs there from an earlier run: the Ray job does the other five good photos on
    two actors, reports the two broken ones and goes on."""
    out = tmp_path / "out"
    earlier = {}
    for name in ["dog.jpg", "coco/000000000562.jpg"]:
        path = out / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(answers[name])
        earlier[path] = (path.stat().st_ino, path.stat().st_mtime_ns)
    args = [str(photos), "-o", str(out), "--ray", "--actors", "2", "--batch-size", "2"]
    code = main([*args, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert summary_counts(captured.out) == (5, 7, 2, 2)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in earlier} == earlier
    written = outputs(out)
    assert sorted(written) == without_suffix(good_names())
    for name, answer in answers.items():
        assert written[Path(name).with_suffix("").as_posix()] == answer, name
    assert_bad_images_reported(out, photos, captured.err)


def test_ray_segmenter_in_a_pipeline_as_users_write_it(
    ray_cluster: object,
    photos: Path,
    answers: dict[str, bytes],
    service_weights: Path,
    tmp_path: Path,
) -> None:
    """read_images (pixel arrays of mixed sizes, the grey one 2-D) -> RaySegmenter on two
    actors with label maps asked for -> write_pngs: the server's bytes, labels and files."""
    import ray

    from fcn_client.ray_data import RaySegmenter, write_pngs

    sources = [str(photos / name) for name in good_names()]
    ds = ray.data.read_images(sources, include_paths=True)
    ds = ds.map_batches(
        RaySegmenter,
        fn_constructor_kwargs={"weights": str(service_weights), "labels": True},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,  # two actors and a read task on two CPUs
        batch_size=2,
        batch_format="numpy",
    )
    out = tmp_path / "out"
    ds = ds.map_batches(
        write_pngs, fn_kwargs={"out_dir": str(out), "roots": [str(photos)]}, batch_format="numpy"
    )
    rows = {Path(r["path"]).relative_to(photos).as_posix(): r for r in ds.take_all()}
    assert sorted(rows) == sorted(good_names())
    for name, answer in answers.items():
        row = rows[name]
        assert row["error"] == "" and row["labels_png"] == answer, (name, row["error"])
        np.testing.assert_array_equal(row["labels"], labels_from_png(answer)[0])
        shares = json.loads(row["classes"])
        assert sum(s["pixels"] for s in shares) == row["labels"].size
        target = out / Path(name).with_suffix(".png")
        assert row["output"] == str(target) and target.read_bytes() == answer
    assert Image.open(io.BytesIO(rows[GREY]["labels_png"])).size == Image.open(photos / GREY).size


def test_output_names_keep_the_path_below_their_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray hands back paths as it was given them, relative or not: both kinds find their root;
    a path under no root keeps its file name, as fcn-segment names a lone file's output."""
    from fcn_client.ray_data import output_name

    monkeypatch.chdir(tmp_path)
    assert output_name("photos/a/b.jpg", ["photos/"]) == Path("a/b")
    assert output_name(str(tmp_path / "photos/a/b.jpg"), ["photos"]) == Path("a/b")
    assert output_name("photos/a/b.jpg", [tmp_path / "photos"]) == Path("a/b")
    assert output_name("elsewhere/c.jpeg", ["photos"]) == Path("c")
