"""``fcn-segment`` and the client classes against a real server on loopback.

The servers are the real app under real uvicorn (``tests/conftest.py``); the images are real
CamVid frames and photos. Busy-server retries are provoked for real: a one-image queue and
more requests in flight than it holds, so the server answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_client.cli import main
from fcn_client.jobs import collect_jobs
from fcn_client.sdk import (
    AsyncSegmentationClient,
    RetryPolicy,
    SegmentationClient,
    SegmentationError,
    parse_retry_after,
    parse_server_timing,
)
from fcn_core.weights import LoadedWeights
from tests.conftest import SHARED_DATA, LiveServer, ServeFactory, labels_from_png, predict
from tests.helpers import free_port

CAMVID_VAL = SHARED_DATA / "camvid" / "val"
DEMO = SHARED_DATA / "demo-photos"


def camvid_frames(n: int) -> list[Path]:
    frames = sorted(CAMVID_VAL.glob("*.png"))[:n]
    if len(frames) < n:
        pytest.skip(f"CamVid frames not found at {CAMVID_VAL}")
    return frames


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three CamVid frames, one in a subfolder with the same file name as a top-level one."""
    frames = camvid_frames(3)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(frames[0], folder / frames[0].name)
    shutil.copy(frames[1], folder / frames[1].name)
    shutil.copy(frames[2], folder / "sub" / frames[0].name)  # same name, different picture
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder\n")
    return folder


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_folder_through_server_writes_label_maps_and_overlays(
    live: LiveServer, reference: LoadedWeights, image_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = [str(image_folder), "--server", live.url, "-o", str(out), "--output", "both"]
    code = main([*args, "--format", "jpeg", "--alpha", "0.4", "-j", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "3/3 images segmented" in printed and "0 failed" in printed and "images/s" in printed
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    stems = [p.stem for p in sorted(image_folder.glob("*.png"))]
    expected = sorted(
        [f"{s}.png" for s in stems]
        + [f"{s}_overlay.jpg" for s in stems]
        + [f"sub/{stems[0]}.png", f"sub/{stems[0]}_overlay.jpg"]
    )
    assert written == expected
    for source in [*image_folder.glob("*.png"), *image_folder.glob("sub/*.png")]:
        name = source.relative_to(image_folder).with_suffix("")
        labels, img = labels_from_png((out / f"{name}.png").read_bytes())
        np.testing.assert_array_equal(labels, predict(reference, rgb(source)))
        assert img.getpalette()[:33] == [v for c in reference.meta.palette for v in c]
        overlay = Image.open(out / f"{name}_overlay.jpg")
        assert overlay.format == "JPEG" and overlay.size == img.size


def test_local_mode_writes_the_servers_bytes(
    live: LiveServer, service_weights: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # As the test server runs (tests/conftest.py): torch, one thread per pass; the untrained
    # test model has near-ties that another backend or thread count may flip.
    monkeypatch.setenv("FCN_TORCH_THREADS", "1")
    monkeypatch.setenv("FCN_BACKEND", "torch")
    photos = sorted(DEMO.glob("*.jpg"))[:2] + camvid_frames(1)
    if len(photos) < 3:
        pytest.skip(f"demo photos not found at {DEMO}")
    args = [str(p) for p in photos] + ["--output", "both", "--no-progress"]
    assert main([*args, "--server", live.url, "-o", str(tmp_path / "remote")]) == 0
    assert (
        main([*args, "--local", "--weights", str(service_weights), "-o", str(tmp_path / "local")])
        == 0
    )
    assert "3/3 images segmented" in capsys.readouterr().out
    remote = sorted((tmp_path / "remote").iterdir())
    assert len(remote) == 6
    for path in remote:
        assert (tmp_path / "local" / path.name).read_bytes() == path.read_bytes(), path.name


def test_busy_server_is_ridden_out_with_retry_after(
    serve: ServeFactory, tmp_path: Path, capsys
) -> None:
    server = serve(max_queue_size=1, max_batch_size=1, max_queue_delay_ms=0.0)
    frames = camvid_frames(6)
    rejected_before = server.metric("fcn_requests_rejected_total", reason="queue_full")
    retries: list[tuple[int, str, float]] = []

    async def burst() -> list:
        async with AsyncSegmentationClient(
            server.url,
            retry=RetryPolicy(retries=20, backoff_s=0.05, max_backoff_s=5.0),
            on_retry=lambda attempt, reason, wait: retries.append((attempt, reason, wait)),
        ) as client:
            return await asyncio.gather(*(client.segment(f) for f in frames))

    results = asyncio.run(burst())
    assert [r.content_type for r in results] == ["image/png"] * len(frames)
    assert retries, "six requests at once never filled a one-image queue"
    assert {reason for _, reason, _ in retries} == {"HTTP 503"}
    # Retry-After is at least 1 s from this server, and the client never waited less.
    assert min(wait for _, _, wait in retries) >= 1.0
    assert sum(r.attempts - 1 for r in results) == len(retries)
    rejected = server.metric("fcn_requests_rejected_total", reason="queue_full") - rejected_before
    assert rejected == len(retries)

    # The command line rides it out too, and says how many retries it took.
    code = main(
        [str(f) for f in frames]
        + ["--server", server.url, "-o", str(tmp_path / "out"), "-j", "6", "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "6/6 images segmented" in printed
    cli_retries = int(printed.split(" retries")[0].rsplit(" ", 1)[1])
    assert cli_retries > 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 6


def test_unreachable_server_is_retried_then_reported(tmp_path: Path, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused
    seen: list[str] = []
    with (
        SegmentationClient(
            url,
            retry=RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.02),
            on_retry=lambda attempt, reason, wait: seen.append(reason),
        ) as client,
        pytest.raises(SegmentationError, match=r"cannot reach .* after 3 attempts") as err,
    ):
        client.segment(b"\x89PNG not even sent")
    assert err.value.attempts == 3 and err.value.status is None
    assert seen == ["ConnectError", "ConnectError"]

    frame = camvid_frames(1)[0]
    out = tmp_path / "out"
    args = [str(frame), "--server", url, "-o", str(out), "--no-progress"]
    code = main([*args, "--retries", "1", "--backoff", "0.01"])
    captured = capsys.readouterr()
    assert code == 1
    assert "0/1 images segmented" in captured.out and "1 failed" in captured.out
    assert f"failed: {frame}: cannot reach" in captured.err
    assert not out.exists() or not any(out.iterdir())


def test_bad_files_fail_alone_with_the_servers_reason(live: LiveServer, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    frame = camvid_frames(1)[0]
    shutil.copy(frame, folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"this is text with a .jpg name\n")
    out = tmp_path / "out"
    exe = shutil.which("fcn-segment")
    cmd = [exe] if exe else [sys.executable, "-m", "fcn_client"]
    run = subprocess.run(
        [*cmd, str(folder), "--server", live.url, "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "1/2 images segmented" in run.stdout and "1 failed" in run.stdout
    assert "broken.jpg: HTTP 415: not a recognised image" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]  # no partial or temp files
    assert labels_from_png((out / "good.png").read_bytes())[0].shape == rgb(frame).shape[:2]


def test_api_key_is_sent_as_bearer(
    serve: ServeFactory, tmp_path: Path, capsys, monkeypatch
) -> None:
    server = serve(api_key="s3cret")
    frame = str(camvid_frames(1)[0])
    assert main([frame, "--server", server.url, "-o", str(tmp_path / "a"), "--no-progress"]) == 1
    assert "HTTP 401: missing or wrong API key" in capsys.readouterr().err
    monkeypatch.setenv("FCN_API_KEY", "s3cret")  # the environment, as documented
    assert main([frame, "--server", server.url, "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    with SegmentationClient(server.url, api_key="s3cret") as client:
        assert client.model()["num_classes"] == 11


def test_json_output_and_timing(live: LiveServer, reference: LoadedWeights) -> None:
    frame = camvid_frames(1)[0]
    with SegmentationClient(live.url) as client:
        result = client.segment(frame, output="json")
        model = client.model()
    body = result.json()
    assert model["sha256"] == reference.meta.sha256
    assert (body["width"], body["height"]) == Image.open(frame).size
    labels = predict(reference, rgb(frame))
    counts = np.bincount(labels.ravel(), minlength=11)
    assert {c["index"]: c["pixels"] for c in body["classes"]} == {
        i: int(n) for i, n in enumerate(counts) if n
    }
    png = labels_from_png(base64.b64decode(body["labels_png_base64"]))[0]
    np.testing.assert_array_equal(png, labels)
    assert {"queue", "inference", "encode", "total"} <= set(result.timing_ms)
    assert result.timing_ms["inference"] > 0 and result.request_id and result.attempts == 1


def test_inputs_are_collected_without_clashes(tmp_path: Path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / d / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "y.jpg")
    jobs = collect_jobs([str(tmp_path / "a"), str(tmp_path / "a" / "y.jpg")])
    assert sorted(j.name.as_posix() for j in jobs) == ["x", "y"]  # y.jpg once, not twice
    assert len(collect_jobs([str(tmp_path / "*" / "y.jpg")])) == 1
    (tmp_path / "a" / "seg").mkdir()  # an earlier run's outputs inside the input folder
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "seg" / "x.png")
    assert len(collect_jobs([str(tmp_path / "a")], out_dir=tmp_path / "a" / "seg")) == 2
    with pytest.raises(ValueError, match="would write the same outputs"):
        collect_jobs([str(tmp_path / "*" / "x.png")])
    with pytest.raises(ValueError, match="no such file"):
        collect_jobs([str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="matches no files"):
        collect_jobs([str(tmp_path / "*.webp")])
    assert main([str(tmp_path / "missing.jpg"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "a"), "--alpha", "1.5"])
    assert exit_.value.code == 2
    code = main([str(tmp_path / "a"), "--local", "--weights", str(tmp_path / "none.safetensors")])
    assert code == 2 and "--local" in capsys.readouterr().err


def test_header_parsing() -> None:
    assert parse_server_timing("read;dur=0.5, queue;dur=1.25, inference;dur=75, total;dur=80") == {
        "read": 0.5,
        "queue": 1.25,
        "inference": 75.0,
        "total": 80.0,
    }
    assert parse_server_timing(None) == {}
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    policy = RetryPolicy(retries=5, backoff_s=0.5, max_backoff_s=4.0)
    for attempt in range(1, 8):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    assert policy.delay(1, retry_after_s=3.0) == 3.0
    assert policy.delay(1, retry_after_s=60.0) == 4.0  # capped: a run never stalls for minutes


def test_overlay_options_reach_the_server(live: LiveServer) -> None:
    frame = camvid_frames(1)[0]
    with SegmentationClient(live.url) as client:
        result = client.segment(frame, output="overlay", fmt="png", alpha=0.0)
    # alpha 0: the overlay is the photo itself.
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(result.content))), rgb(frame))
