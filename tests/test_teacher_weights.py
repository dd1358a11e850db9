"""A DeepLab TFLite teacher's weights read into our FCN over ``mobilenet_v2``: the real
8-bit teacher file and real photos, compared with what the teacher itself answers."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core.models import build_model
from fcn_core.preprocess import HALF_RGB
from fcn_core.teacher_weights import init_from_deeplab, read_deeplab_convs

pytest.importorskip("ai_edge_litert", reason="the teacher runtime (extra 'distill') is missing")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEACHER = SHARED / "teachers" / "deeplabv3-mnv2-voc" / "deeplabv3_mnv2_pascal_quant.tflite"
PHOTOS = SHARED / "demo-photos"

pytestmark = pytest.mark.skipif(not TEACHER.is_file(), reason=f"teacher not found at {TEACHER}")


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    with Image.open(PHOTOS / name) as im:
        im = im.convert("RGB")
        return np.asarray(im.resize(size) if size else im).copy()


def batch(*images: np.ndarray) -> torch.Tensor:
    return HALF_RGB(torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images]))


@pytest.fixture(scope="module")
def started() -> torch.nn.Module:
    model = build_model("fcn8s", 21, "mobilenet_v2")
    names = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg")
    photos = [batch(*(photo(n, (256, 192)) for n in names))]
    copied = init_from_deeplab(model, TEACHER, photos)
    assert copied == ["54 convolutions of the trunk and head", "the classifier (21 classes)"]
    return model.eval()


def output_stride_16(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights run as the teacher runs them: the last stride undone, the blocks
    after it dilated (the atrous algorithm)."""
    dense = copy.deepcopy(model)
    features = dense.backbone.features
    features[14].conv[1][0].stride = (1, 1)
    for block in features[15:]:
        depthwise = block.conv[1][0]
        depthwise.dilation, depthwise.padding = (2, 2), (2, 2)
    return dense


def test_every_convolution_is_read_in_pytorch_layout() -> None:
    convs = read_deeplab_convs(TEACHER)
    assert len(convs) == 55
    assert convs["MobilenetV2/Conv"][0].shape == (32, 3, 3, 3)
    assert convs["MobilenetV2/expanded_conv/depthwise"][0].shape == (32, 1, 3, 3)
    assert convs["MobilenetV2/expanded_conv_16/project"][0].shape == (320, 960, 1, 1)
    assert convs["concat_projection"][0].shape == (256, 512, 1, 1)
    assert convs["logits/semantic"][0].shape == (21, 256, 1, 1)
    assert all(torch.isfinite(w).all() and torch.isfinite(b).all() for w, b in convs.values())


@pytest.mark.parametrize("name", ["dog.jpg", "horses.jpg"])
def test_started_student_computes_the_teachers_logits(started: torch.nn.Module, name: str) -> None:
    """Run at output stride 16 on the teacher's own 513 x 513 letterbox, the float student
    gives the 8-bit teacher's stride-16 logits: a correlation of 0.99 and the same label at
    >= 97 % of the 33 x 33 positions (8-bit rounding is the difference)."""
    from fcn_core.teachers import TFLiteTeacher, letterbox

    image = photo(name)
    teacher = TFLiteTeacher(TEACHER)(image).logits.astype(np.float32)
    dense = output_stride_16(started)
    with torch.no_grad():
        _, _, top = dense.backbone(batch(letterbox(image, 513)))
        ours = dense.score_fr(top)[0].numpy()
    assert ours.shape == teacher.shape == (21, 33, 33)
    assert np.corrcoef(ours.ravel(), teacher.ravel())[0, 1] > 0.99
    assert (ours.argmax(0) == teacher.argmax(0)).mean() >= 0.97


def test_skips_start_at_zero_and_training_mode_stays_near_the_teacher(
    started: torch.nn.Module,
) -> None:
    """The new skips add nothing yet. In training mode each norm uses its batch's statistics:
    on the photos it was measured on, that is exactly the evaluation-mode net; on two other
    crops of two of them, the labels stay >= 90 % the same (a small batch's noise)."""
    assert not started.score_pool4.weight.any() and not started.score_pool3.weight.any()
    training = copy.deepcopy(started).train()
    training.backbone.drop.p = 0.0
    names = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg")
    measured = batch(*(photo(n, (256, 192)) for n in names))
    other = batch(photo("dog.jpg", (320, 256)), photo("giraffe.jpg", (320, 256)))
    with torch.no_grad():
        same = (started.coarse_scores(measured), training.coarse_scores(measured))
        near = (started.coarse_scores(other), training.coarse_scores(other))
    torch.testing.assert_close(same[1], same[0], rtol=1e-3, atol=1e-3)
    assert (near[0].argmax(1) == near[1].argmax(1)).float().mean() > 0.9


def test_the_started_student_sees_the_dog_and_the_bicycle(started: torch.nn.Module) -> None:
    """Before any training, the whole 768 x 576 photo: its dog and its bicycle."""
    with torch.no_grad():
        labels = started(batch(photo("dog.jpg")))[0].argmax(0)
    share = torch.bincount(labels.ravel(), minlength=21) / labels.numel()
    assert share[12] > 0.05 and share[2] > 0.05  # dog, bicycle


def test_other_classes_take_the_trunk_and_head_and_a_zero_classifier() -> None:
    """Transfer to a new data set (CamVid's 11 classes): everything but the classifier."""
    model = build_model("fcn8s", 11, "mobilenet_v2")
    copied = init_from_deeplab(model, TEACHER, [batch(photo("dog.jpg", (128, 96)))])
    assert copied[1] == "not the classifier (21 classes, the model's 11)"
    assert not model.score_fr.weight.any()
    reference = read_deeplab_convs(TEACHER)["aspp0"][0]
    torch.testing.assert_close(model.backbone.aspp0[0].weight, reference)


def test_refuses_models_that_do_not_fit() -> None:
    photos = [batch(photo("dog.jpg", (64, 64)))]
    with pytest.raises(ValueError, match="needs --backbone mobilenet_v2"):
        init_from_deeplab(build_model("fcn8s", 21, "efficientnet_lite0"), TEACHER, photos)
    with pytest.raises(FileNotFoundError):
        init_from_deeplab(build_model("fcn8s", 21, "mobilenet_v2"), TEACHER.with_name("no"), [])
