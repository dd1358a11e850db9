"""The shipped weights on real photos. The VOC model is a preview (distilled, below its
targets; weights/README.md): its metadata says honestly what it is, and on real photos it
names VOC objects. The CamVid model is the default and stays street-scene shaped."""

from __future__ import annotations

import numpy as np
import pytest

from fcn_core.data.palettes import CAMVID_CLASSES, VOC_CLASSES
from fcn_core.inference import InferenceConfig, Segmenter
from fcn_core.shipped import DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.weights import read_metadata
from service.codecs import decode
from tests.conftest import DEMO_PHOTOS

VOC = default_weights_dir() / "fcn8s-lite0-voc.safetensors"
CAMVID = default_weights_dir() / "fcn8s-lite0-camvid.safetensors"


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


def test_the_voc_preview_says_what_it_is() -> None:
    meta = read_metadata(VOC)
    assert meta.class_names == VOC_CLASSES and meta.arch == "fcn8s"
    assert meta.backbone == "efficientnet_lite0"
    assert "Apache-2.0" in meta.teacher and "deeplabv3_mnv2_pascal_quant" in meta.teacher
    assert meta.dataset == "photos:voc-photos (2028 images)"
    assert meta.metrics_split == "folder/val (100 images)"  # coco-voc
    assert 0 < meta.metrics["mean_iu_present"] < 1
    assert "voc/val (7 images)" in meta.evaluations  # voc-tiny
    assert meta.command.startswith("fcn-train --teacher")


def test_the_voc_preview_names_voc_objects_on_real_photos(voc: Segmenter) -> None:
    assert largest_object(shares(voc, "eagle.jpg")) == "bird"
    person = shares(voc, "person.jpg")
    assert person.get("person", 0) > 0.02 and person.get("dog", 0) > 0.005, person
    assert shares(voc, "dog.jpg").get("dog", 0) > 0.02  # but bicycle is larger: not yet


def test_the_default_camvid_model_stays_servable() -> None:
    assert CAMVID.name == DEFAULT_WEIGHTS_NAME
    camvid = Segmenter.from_weights(CAMVID, InferenceConfig(device="cpu"))
    assert camvid.meta is not None and camvid.meta.class_names == CAMVID_CLASSES
    assert {"road", "car"} <= set(shares(camvid, "dog.jpg"))
