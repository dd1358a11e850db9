"""Tiled inference (fcn_core/tiling.py): where tiles lie, how they blend, and the same labels
through the in-process core, bulk jobs, ``/segment`` and the protocol's ``/v2`` infer.

The quality checks use the shipped weights on a large image stitched from real photos: the
tiled label map agrees with one whole-image pass, and no seam shows along the tile edges.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fcn_client.bulk import BulkSegmenter
from fcn_core.inference import InferenceConfig, Segmenter
from fcn_core.shipped import CAMVID_WEIGHTS_NAME, DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.tiling import TileBlender, TilePolicy, plan_tiles, ramp, tile_starts
from fcn_core.weights import LoadedWeights, load_weights
from tests.conftest import (
    SHARED_DATA,
    InstrumentedModel,
    LiveServer,
    ServeFactory,
    labels_from_png,
    test_settings,
)

PHOTOS = SHARED_DATA / "voc-photos"
SMALL_TILES = {"max_side": 320, "tile_size": 256, "tile_overlap": 64}
"""Server settings that tile a 700 x 500 image into 12 tiles: cheap on a CPU."""


def photos(n: int) -> list[np.ndarray]:
    paths = sorted(PHOTOS.rglob("*.jpg"))[: 10 * n : 10]
    if len(paths) < n:
        pytest.skip(f"real photos not found at {PHOTOS}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def mosaic(rows: int, cols: int, cell: tuple[int, int] = (512, 640)) -> np.ndarray:
    """A large image stitched from real photos, each resized to ``cell`` (height, width)."""
    h, w = cell
    cells = [np.asarray(Image.fromarray(p).resize((w, h))) for p in photos(rows * cols)]
    return np.concatenate(
        [np.concatenate(cells[r * cols : (r + 1) * cols], 1) for r in range(rows)], 0
    )


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# -- the plan and the blend -----------------------------------------------------------------


@pytest.mark.parametrize("length", [1536, 1537, 2560, 4000, 8000])
def test_tiles_cover_each_side_with_at_least_the_overlap(length: int) -> None:
    size, overlap = 1536, 256
    starts = tile_starts(length, size, overlap)
    assert starts[0] == 0 and starts[-1] + size == max(length, size)
    assert all(b - a <= size - overlap for a, b in itertools.pairwise(starts))
    assert starts == sorted(set(starts))


def test_plan_rows_hold_the_image() -> None:
    rows = plan_tiles(3000, 4000, 1536, 256)
    covered = np.zeros((3000, 4000), np.int32)
    for row in rows:
        assert len({t.top for t in row}) == 1
        for t in row:
            covered[t.top : t.top + t.height, t.left : t.left + t.width] += 1
    assert covered.min() >= 1
    assert plan_tiles(500, 700, 1536, 256) == [[plan_tiles(500, 700, 1536, 256)[0][0]]]


def test_ramp_weights_fall_towards_the_edges_and_never_reach_zero() -> None:
    w = ramp(1536, 256)
    assert w.min() > 0 and w[768] == 1.0
    assert np.all(np.diff(w[:256]) > 0) and np.all(np.diff(w[-256:]) < 0)


@pytest.mark.parametrize(
    ("h", "w", "size", "overlap"),
    [(300, 420, 128, 32), (100, 1000, 128, 32), (1000, 60, 128, 0), (257, 257, 128, 63)],
)
def test_blender_is_the_argmax_of_the_weighted_sum(h: int, w: int, size: int, overlap: int) -> None:
    # Random scores per tile, blended by the band-at-a-time blender, against the sum over
    # the whole image computed directly; images thinner than a tile, one row or one column of
    # tiles, no overlap.
    classes = 5
    blender = TileBlender(h, w, size, overlap)
    rng = np.random.default_rng(0)
    total = np.zeros((classes, h, w), np.float32)
    th, tw = min(size, h), min(size, w)
    weights = np.outer(ramp(th, overlap), ramp(tw, overlap))
    for tile in blender.tiles:
        scores = rng.normal(size=(classes, th, tw)).astype(np.float16)
        blender.add(scores)
        region = total[:, tile.top : tile.top + th, tile.left : tile.left + tw]
        region += scores * weights
    assert blender.done
    np.testing.assert_array_equal(blender.labels, total.argmax(0))


def test_tile_policy_decides_from_the_mode() -> None:
    auto, on, off = (TilePolicy(m, 256, 64) for m in ("auto", "on", "off"))
    assert not auto.tiles(300, 300, max_side=320)  # fits one pass
    assert auto.tiles(300, 400, max_side=320)  # would be downscaled: tiled instead
    assert on.tiles(300, 300, max_side=2048) and not on.tiles(256, 200, max_side=2048)
    assert not off.tiles(5000, 5000, max_side=320)
    with pytest.raises(ValueError, match="overlap"):
        TilePolicy("on", 256, 128)


# -- quality on real photos, shipped weights --------------------------------------------------


Stitched = tuple[np.ndarray, np.ndarray, np.ndarray, TilePolicy, str]


# Each shipped model, with the share of pixels where its tiled map must equal one whole pass:
# the VOC default's DeepLab head pools each tile's own mean, so its tiles see less context.
TILED_AGREEMENT = {DEFAULT_WEIGHTS_NAME: 0.98, CAMVID_WEIGHTS_NAME: 0.99}


@pytest.fixture(scope="module", params=sorted(TILED_AGREEMENT))
def stitched(request: pytest.FixtureRequest) -> Stitched:
    """(image, whole-pass labels, tiled labels, policy, weights file name) for a 2560 x 1920
    mosaic: 2 x 2 tiles of the default size."""
    weights = default_weights_dir() / request.param
    segmenter = Segmenter.from_weights(weights, InferenceConfig(backend="torch"))
    image = mosaic(3, 4, cell=(640, 640))
    policy = TilePolicy("on")
    whole = segmenter.segment([image])[0]
    tiled = segmenter.segment_tiled(image, policy)
    return image, whole, tiled, policy, request.param


def test_tiled_labels_agree_with_one_whole_image_pass(stitched: Stitched) -> None:
    _, whole, tiled, _, name = stitched
    agreement = float((whole == tiled).mean())
    assert agreement >= TILED_AGREEMENT[name], agreement


def test_no_seam_along_tile_edges(stitched: Stitched) -> None:
    """Label changes across each line where a tile starts or ends are no more frequent in
    the tiled map than in the whole-image map along the same line (a seam would add them)."""
    image, whole, tiled, policy, _ = stitched
    h, w = image.shape[:2]
    cols = {x for s in tile_starts(w, policy.size, policy.overlap) for x in (s, s + policy.size)}
    rows = {y for s in tile_starts(h, policy.size, policy.overlap) for y in (s, s + policy.size)}
    for x in sorted(c for c in cols if 0 < c < w):
        tiled_changes = (tiled[:, x - 1] != tiled[:, x]).mean()
        whole_changes = (whole[:, x - 1] != whole[:, x]).mean()
        assert tiled_changes <= whole_changes + 0.01, (x, tiled_changes, whole_changes)
    for y in sorted(r for r in rows if 0 < r < h):
        tiled_changes = (tiled[y - 1] != tiled[y]).mean()
        whole_changes = (whole[y - 1] != whole[y]).mean()
        assert tiled_changes <= whole_changes + 0.01, (y, tiled_changes, whole_changes)


# -- the server and bulk jobs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def large() -> np.ndarray:
    """A 700 x 500 photo mosaic: 12 tiles under SMALL_TILES."""
    return mosaic(2, 2, cell=(250, 350))


def bulk_answer(weights: Path, data: bytes, **overrides: object) -> tuple[np.ndarray, bytes]:
    """The bulk core's label map and label PNG for ``data``, under the server's settings."""
    bulk = BulkSegmenter(test_settings(weights, **SMALL_TILES, **overrides), load_weights(weights))
    try:
        (result,) = bulk.segment([data])
        assert result.labels is not None, result.error
        return result.labels, bulk.png(result)
    finally:
        bulk.close()


def post(server: LiveServer, data: bytes, **params: str) -> httpx.Response:
    return server.client.post(
        "/segment", params=params, files={"image": ("large.jpg", data, "image/jpeg")}
    )


def test_server_tiles_through_the_batcher_as_bulk_does(
    serve: ServeFactory, service_weights: Path, large: np.ndarray
) -> None:
    server = serve(**SMALL_TILES)
    data = jpeg(large)
    batches = server.metric("fcn_batch_size_count")
    answer = post(server, data)
    assert answer.status_code == 200, answer.text
    labels, _ = labels_from_png(answer.content)
    assert labels.shape == large.shape[:2]  # full resolution, not downscaled to 320
    # 12 tiles, one per batch on the CPU (a 256 x 256 tile's batch is the CPU worker count
    # at most, and they come a batch's worth at a time).
    assert server.metric("fcn_batch_size_count") - batches >= 6
    assert server.metric("fcn_batch_size_sum") >= 12
    assert answer.content == bulk_answer(service_weights, data)[1]  # byte for byte
    # tile=off: downscaled to 320 and scaled back, as bulk does with FCN_TILE=off.
    off = post(server, data, tile="off")
    assert off.status_code == 200, off.text
    assert off.content == bulk_answer(service_weights, data, tile="off")[1]
    assert not np.array_equal(labels_from_png(off.content)[0], labels)


def test_an_operators_off_cannot_be_turned_on(
    serve: ServeFactory, service_weights: Path, large: np.ndarray
) -> None:
    server = serve(**SMALL_TILES, tile="off")
    data = jpeg(large)
    on = post(server, data, tile="on")
    assert on.status_code == 200, on.text
    assert on.content == bulk_answer(service_weights, data, tile="off")[1]


def test_a_tiled_request_past_its_deadline_leaves_nothing_behind(
    serve: ServeFactory, reference: LoadedWeights, large: np.ndarray
) -> None:
    """12 tiles at 0.3 s each cannot finish in 1 s: 504, the tiles not yet run are withdrawn
    (the queue is empty, the model stops), and the next request is answered."""
    slow = InstrumentedModel(reference.model, delay_s=0.3)
    server = serve(model=slow, meta=reference.meta, request_timeout_s=1.0, **SMALL_TILES)
    answer = post(server, jpeg(large))
    assert answer.status_code == 504, answer.text
    time.sleep(0.8)  # a batch that was running when the deadline passed finishes
    computed = slow.images_computed
    assert computed < 12
    assert server.metric("fcn_queue_depth") == 0
    small = post(server, jpeg(large[:200, :300]))
    assert small.status_code == 200, small.text
    assert slow.images_computed == computed + 1


def test_an_image_that_fits_one_tile_is_not_tiled(serve: ServeFactory, large: np.ndarray) -> None:
    server = serve(max_side=2048, tile_size=1024, tile_overlap=128)
    data = jpeg(large)
    on, off = post(server, data, tile="on"), post(server, data, tile="off")
    assert on.status_code == off.status_code == 200
    assert on.content == off.content


def test_tiled_images_have_their_own_pixel_limit(serve: ServeFactory, large: np.ndarray) -> None:
    server = serve(**SMALL_TILES, max_image_pixels=10_000_000, tile_max_pixels=300_000)
    answer = post(server, jpeg(large))  # 350,000 pixels
    assert answer.status_code == 413
    assert "300000" in answer.json()["detail"]
    assert post(server, jpeg(large), tile="off").status_code == 200  # downscaled: allowed


def test_a_bad_tile_mode_is_a_clear_error(serve: ServeFactory, large: np.ndarray) -> None:
    server = serve(**SMALL_TILES)
    answer = post(server, jpeg(large), tile="sometimes")
    assert answer.status_code == 422
    assert "tile" in answer.text


def test_protocol_infer_tiles_with_its_tile_parameter(
    serve: ServeFactory, service_weights: Path, large: np.ndarray
) -> None:
    server = serve(**SMALL_TILES)
    data = jpeg(large)
    name = service_weights.stem
    encoded = base64.b64encode(data).decode()

    def infer(parameters: dict) -> np.ndarray:
        body = {
            "inputs": [{"name": "IMAGES", "datatype": "BYTES", "shape": [1], "data": [encoded]}],
            "parameters": parameters,
        }
        answer = server.client.post(f"/v2/models/{name}/infer", content=json.dumps(body))
        assert answer.status_code == 200, answer.text
        (out,) = [o for o in answer.json()["outputs"] if o["name"] == "LABELS"]
        return np.asarray(out["data"], np.uint8).reshape(out["shape"])[0]

    np.testing.assert_array_equal(infer({}), bulk_answer(service_weights, data)[0])  # tiled
    downscaled = bulk_answer(service_weights, data, tile="off")[0]
    np.testing.assert_array_equal(infer({"tile": "off"}), downscaled)
    bad = server.client.post(
        f"/v2/models/{name}/infer",
        content=json.dumps({"inputs": [], "parameters": {"tile": "always"}}),
    )
    assert bad.status_code == 400 and "tile" in bad.json()["error"]
