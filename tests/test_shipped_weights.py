"""The shipped weights on real photos. The VOC model is the default (distilled from a DeepLabV3
teacher; weights/README.md): its metadata says honestly what it is and how it scored, and on
real photos it names the VOC objects in them. The CamVid model stays servable beside it."""

from __future__ import annotations

import numpy as np
import pytest

from fcn_core.data.palettes import CAMVID_CLASSES, VOC_CLASSES
from fcn_core.inference import InferenceConfig, Segmenter
from fcn_core.shipped import CAMVID_WEIGHTS_NAME, DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.weights import read_metadata
from service.codecs import decode
from tests.conftest import DEMO_PHOTOS

VOC = default_weights_dir() / DEFAULT_WEIGHTS_NAME
CAMVID = default_weights_dir() / CAMVID_WEIGHTS_NAME


def shares(segmenter: Segmenter, photo: str) -> dict[str, float]:
    """Class -> fraction of the photo's pixels, decoded as the server decodes it."""
    image = decode((DEMO_PHOTOS / photo).read_bytes(), 50_000_000, 2048)
    (labels,) = segmenter.segment([image.rgb])
    counts = np.bincount(labels.ravel(), minlength=256)
    names = segmenter.meta.class_names  # type: ignore[union-attr]
    return {names[i]: counts[i] / labels.size for i in np.flatnonzero(counts)}


def largest_object(found: dict[str, float]) -> str:
    objects = {k: v for k, v in found.items() if k != "background"}
    return max(objects, key=objects.__getitem__)


@pytest.fixture(scope="module")
def voc() -> Segmenter:
    return Segmenter.from_weights(VOC, InferenceConfig(device="cpu"))


def test_the_voc_default_says_what_it_is() -> None:
    meta = read_metadata(VOC)
    assert VOC.name == "fcn8s-mnv2-voc.safetensors"
    assert meta.class_names == VOC_CLASSES and meta.arch == "fcn8s"
    assert meta.backbone == "mobilenet_v2"
    assert "Apache-2.0" in meta.teacher and "deeplabv3_mnv2_pascal_quant" in meta.teacher
    assert meta.dataset == "photos:voc-photos (2028 images)"
    assert meta.metrics_split == "folder/val (100 images)"  # coco-voc
    assert meta.metrics["mean_iu_present"] >= 0.52  # the target for a VOC default
    assert "voc/val (7 images)" in meta.evaluations  # voc-tiny
    assert meta.command.startswith("fcn-train --teacher") and "--init-from-deeplab" in meta.command


def test_the_voc_default_names_the_objects_in_real_photos(voc: Segmenter) -> None:
    """dog.jpg: its dog, bicycle and car (the bicycle is the larger, 10 % against 8 %, as
    its teacher has it too: 8.9 % against 7.7 %); person.jpg: the person, dog and horse."""
    dog = shares(voc, "dog.jpg")
    assert dog.get("dog", 0) > 0.05 and dog.get("bicycle", 0) > 0.05 and dog.get("car", 0) > 0.01
    assert largest_object(shares(voc, "eagle.jpg")) == "bird"
    assert largest_object(shares(voc, "horses.jpg")) == "horse"
    person = shares(voc, "person.jpg")
    assert min(person.get(name, 0) for name in ("person", "dog", "horse")) > 0.002, person


def test_the_camvid_model_stays_servable() -> None:
    camvid = Segmenter.from_weights(CAMVID, InferenceConfig(device="cpu"))
    assert camvid.meta is not None and camvid.meta.class_names == CAMVID_CLASSES
    assert {"road", "car"} <= set(shares(camvid, "dog.jpg"))
    meta = read_metadata(CAMVID)
    # Trained on the train split alone, so its validation figure is a held-out one.
    assert meta.dataset.startswith("camvid/train") and meta.metrics_split.startswith("camvid/val")
    assert meta.metrics["mean_iu"] >= 0.68  # the target for the CamVid model
