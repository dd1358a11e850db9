"""fcn_core.inference: the automatic counts, batching plans, and the Segmenter's labels equal to
the model's own on real photos of several sizes, one image at a time or batched."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_core.inference import (
    InferenceConfig,
    Segmenter,
    batch_capacity,
    bucket_of,
    plan_batches,
    usable_cores,
)
from fcn_core.weights import LoadedWeights
from tests.conftest import DEMO_PHOTOS, predict


def test_automatic_counts_follow_the_device() -> None:
    auto = InferenceConfig()
    cores = usable_cores()
    assert (auto.cpu_workers_for("cpu"), auto.cpu_workers_for("cuda")) == (cores, 1)
    assert auto.max_batch_size_for("cpu") == cores  # a batch = one image per worker
    assert auto.max_batch_size_for("cuda") == 8
    assert auto.threads_for("cuda", alone=True) == 0  # not ours to set
    assert auto.threads_for("cpu", alone=False) == 1  # a pool worker: one image on one core
    assert auto.threads_for("cpu", alone=True) == cores  # a lone image takes every core
    chosen = InferenceConfig(cpu_workers=3, max_batch_size=5, torch_threads=2)
    assert chosen.cpu_workers_for("cpu") == 3
    assert chosen.max_batch_size_for("cuda") == chosen.max_batch_size_for("cpu") == 5
    assert chosen.threads_for("cpu", alone=False) == chosen.threads_for("cpu", alone=True) == 2
    # channels-last: torch on the CPU by default, never for the ONNX backends' own layouts
    assert auto.channels_last_for("cpu", "torch") and not auto.channels_last_for("cuda", "torch")
    assert not auto.channels_last_for("cpu", "onnxruntime")
    on, off = InferenceConfig(channels_last=True), InferenceConfig(channels_last=False)
    assert on.channels_last_for("cuda", "torch") and not on.channels_last_for("cpu", "openvino")
    assert not off.channels_last_for("cpu", "torch")


def test_usable_cores_honour_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    unlimited = usable_cores(tmp_path / "absent")
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == unlimited
    cpu_max.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert usable_cores(cpu_max) == min(unlimited, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("garbage\n")
    assert usable_cores(cpu_max) == unlimited


def test_batches_hold_one_bucket_within_size_and_pixel_budget() -> None:
    sizes = [(360, 480), (40, 60), (370, 470), (360, 480), (33, 64), (360, 480)]
    batches = plan_batches(sizes, 32, max_batch_size=2, max_batch_pixels=10**9)
    assert batches == [[0, 2], [3, 5], [1, 4]]  # buckets in order of first appearance
    for batch in batches:
        assert len({bucket_of(*sizes[i], 32) for i in batch}) == 1
    # the pixel budget cuts the batch: one 384 x 480 bucket per batch
    assert batch_capacity((384, 480), 8, 384 * 480 * 3 // 2) == 1
    assert plan_batches(sizes[:3], 32, 8, 384 * 480)[0] == [0]


def photos() -> list[np.ndarray]:
    images = []
    for name in ("dog.jpg", "horses.jpg", "person.jpg"):
        with Image.open(DEMO_PHOTOS / name) as im:
            im = im.convert("RGB")
            im.thumbnail((320, 320))
            images.append(np.asarray(im))
    images.append(images[0][:97, :131].copy())  # odd sizes pad inside the bucket
    return images


@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_segmenter_labels_equal_the_model_run_alone(
    reference: LoadedWeights, max_batch_size: int
) -> None:
    config = InferenceConfig(device="cpu", max_batch_size=max_batch_size, cpu_workers=1)
    segmenter = Segmenter(copy.deepcopy(reference.model), reference.meta.normalization, config)
    images = photos()
    labels = segmenter.segment(images)
    assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]
    for image, lab in zip(images, labels, strict=True):
        assert lab.dtype == np.uint8
        assert np.array_equal(lab, predict(reference, image))
