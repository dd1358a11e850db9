"""Distillation: the real TFLite teacher read at its logits, views labelled where the student
looks, the loss's confidence threshold and soft term, and a tiny ``fcn-train --teacher`` run
whose weights carry the teacher in their metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core import train
from fcn_core.data.transforms import VOID, pad_collate
from fcn_core.distill import (
    DistillationLoss,
    TeacherLabelledPhotos,
    cache_path,
    find_photos,
    label_photos,
    read_rgb,
)
from fcn_core.teachers import TeacherLogits, TFLiteTeacher, letterbox, letterbox_size
from fcn_core.weights import read_metadata
from tests.conftest import DEMO_PHOTOS, SHARED_DATA

pytest.importorskip("ai_edge_litert", reason="the teacher runtime (extra 'distill') is missing")

TEACHER = (
    SHARED_DATA / "teachers" / "deeplabv3-mnv2-voc" / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
)
FULL_TEACHER = TEACHER.with_name("deeplabv3_mnv2_pascal_quant.tflite")
"""Depth 1.0: the one whose layers fit ``mobilenet_v2`` (dm05 has half the channels)."""
VOC_TINY = SHARED_DATA / "voc-tiny"


@pytest.fixture(scope="module")
def teacher() -> TFLiteTeacher:
    return TFLiteTeacher(TEACHER)


def teachers_own_labels(photo: np.ndarray) -> np.ndarray:
    """The TFLite file's own label map (its ArgMax output, fast path), back at photo size."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(TEACHER), num_threads=1)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], letterbox(photo, inp["shape"][1])[None])
    interpreter.invoke()
    ph, pw = letterbox_size(photo.shape[:2], inp["shape"][1])
    placed = interpreter.get_tensor(out["index"])[0][:ph, :pw].astype(np.uint8)
    size = (photo.shape[1], photo.shape[0])
    return np.asarray(Image.fromarray(placed).resize(size, Image.NEAREST))


def test_logits_resampled_to_the_photo_give_the_teachers_own_labels(
    teacher: TFLiteTeacher,
) -> None:
    photo = read_rgb(DEMO_PHOTOS / "dog.jpg")
    labelled = teacher(photo)
    assert labelled.logits.shape == (21, 33, 33) and labelled.image_size == photo.shape[:2]
    ours = labelled.full().argmax(0).numpy()
    theirs = teachers_own_labels(photo)
    # The file resizes quantised logits in uint8; we resize the dequantised floats.
    assert (ours == theirs).mean() > 0.97
    assert {12, 2} <= set(np.unique(ours).tolist())  # dog and bicycle


def test_a_view_is_labelled_where_the_student_looks(teacher: TFLiteTeacher, tmp_path: Path) -> None:
    root = VOC_TINY / "JPEGImages"
    photos = find_photos(root)[:2]
    label_photos(TEACHER, root, photos, tmp_path)
    whole = TeacherLabelledPhotos(
        root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, None, (1, 1), False
    )
    whole.validate()
    image, logits = whole[0]
    cached = TeacherLogits(**_cached(tmp_path, root, photos[0]))
    assert image.shape[1:] == logits.shape[1:] == cached.image_size
    assert torch.allclose(logits, cached.full())
    # A crop wider than the photo: the image is padded with 0 and the teacher's map with NaN.
    h, w = cached.image_size
    wide = TeacherLabelledPhotos(
        root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, (h, w + 24), (1, 1), False
    )
    image, logits = wide[0]
    assert torch.isnan(logits[:, :, w:]).all() and not torch.isnan(logits[:, :, :w]).any()
    assert (image[:, :, w:] == 0).all()
    # A flipped view is the flip of the view.
    flipped = TeacherLabelledPhotos(
        root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, None, (1, 1), True
    )
    torch.manual_seed(1)
    draws = [flipped[0] for _ in range(6)]
    assert any(
        torch.equal(img, image_flip) for img, _ in draws for image_flip in [whole[0][0].flip(-1)]
    )
    for img, lg in draws:
        if torch.equal(img, whole[0][0].flip(-1)):
            assert torch.allclose(lg, cached.full().flip(-1))
    # Twice the scale: the teacher's map follows the photo (labels agree with an upsampling).
    double = TeacherLabelledPhotos(
        root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, None, (2, 2), False
    )
    _, big = double[0]
    up = torch.nn.functional.interpolate(cached.full()[None], size=big.shape[1:], mode="bilinear")[
        0
    ]
    assert (big.argmax(0) == up.argmax(0)).float().mean() > 0.98
    # Batches pad the teacher's map with NaN, the float void.
    _, targets = pad_collate([whole[0], whole[1]])
    assert targets.dtype == torch.float32 and targets.shape[1] == 21


def test_a_mosaic_holds_four_views_each_labelled_where_the_student_looks(tmp_path: Path) -> None:
    root = VOC_TINY / "JPEGImages"
    photos = find_photos(root)[:1]
    label_photos(TEACHER, root, photos, tmp_path)
    cached = TeacherLogits(**_cached(tmp_path, root, photos[0]))
    h, w = cached.image_size
    # One photo, a crop twice its size, scale 2: each quarter is the whole photo at scale 1.
    mosaic = TeacherLabelledPhotos(
        root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, (2 * h, 2 * w), (2, 2), False, 1.0
    )
    image, logits = mosaic[0]
    whole = read_rgb(photos[0])
    assert image.shape == (3, 2 * h, 2 * w) and logits.shape == (21, 2 * h, 2 * w)
    for y, x in [(0, 0), (0, w), (h, 0), (h, w)]:
        assert (image[:, y : y + h, x : x + w].permute(1, 2, 0).numpy() == whole).all()
        assert torch.allclose(logits[:, y : y + h, x : x + w], cached.full())
    with pytest.raises(ValueError, match="crop"):
        TeacherLabelledPhotos(root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, None, mosaic=1)
    with pytest.raises(ValueError, match="fraction"):
        TeacherLabelledPhotos(
            root, photos, tmp_path, ["c"] * 21, [[0, 0, 0]] * 21, (8, 8), mosaic=2
        )


def _cached(cache: Path, root: Path, photo: Path) -> dict:
    with np.load(cache_path(cache, root, photo)) as z:
        return {
            "logits": z["logits"],
            "image_size": tuple(int(v) for v in z["image_size"]),
            "input_size": int(z["input_size"]),
        }


def test_loss_ignores_unsure_pixels_and_pixels_past_the_photo() -> None:
    target = torch.zeros(1, 3, 2, 2)
    target[0, 0, 0, 0] = 5.0  # sure: class 0
    target[0, 1, 0, 1] = 0.1  # unsure: nearly uniform
    target[0, :, 1, :] = float("nan")  # no photo there
    loss = DistillationLoss(confidence=0.6)
    labels = loss.hard_labels(target)
    assert labels.tolist() == [[[0, VOID], [VOID, VOID]]]
    student = torch.zeros(1, 3, 2, 2, requires_grad=True)
    value = loss(student, target)
    assert value.item() == pytest.approx(np.log(3), rel=1e-5)  # one pixel, uniform student
    # The soft term vanishes when the student matches the teacher, and only there.
    soft = DistillationLoss(confidence=0.99, kd_weight=1.0, temperature=2.0, kd_stride=1)
    same = torch.nan_to_num(target)
    assert soft(same.clone(), target).item() == pytest.approx(
        DistillationLoss(confidence=0.99)(same.clone(), target).item(), abs=1e-6
    )
    assert soft(torch.zeros(1, 3, 2, 2), target).item() > 0
    # At stride 4 the soft term compares 4 x 4 averages: still zero only for a matching student.
    big = torch.randn(2, 3, 8, 8)
    big[1, :, 4:, :] = float("nan")
    pooled = DistillationLoss(confidence=0.99, kd_weight=1.0, kd_stride=4)
    assert pooled.soft_loss(torch.nan_to_num(big), big).item() == pytest.approx(0.0, abs=1e-6)
    assert pooled.soft_loss(torch.zeros(2, 3, 8, 8), big).item() > 0
    # Nothing labelled at all: a zero loss that still backpropagates, not NaN.
    empty = DistillationLoss()(student, torch.full((1, 3, 2, 2), float("nan")))
    empty.backward()
    assert empty.item() == 0.0


def tiny_run(tmp_path: Path, out: Path) -> list[str]:
    """What every tiny distillation run here shares: voc-tiny's photos and masks, two steps,
    one process; ``--output out`` last, so that ``[:-2]`` drops it."""
    return [
        "--photos", str(VOC_TINY / "JPEGImages"),
        "--dataset", "voc",
        "--data-root", str(VOC_TINY),
        "--epochs", "1",
        "--max-iters", "2",
        "--num-workers", "0",
        "--teacher-processes", "1",
        "--classes", "voc",
        "--no-progress",
        "--out-dir", str(tmp_path / "run"),
        "--output", str(out),
    ]  # fmt: skip


def test_a_tiny_distillation_run_writes_weights_that_name_their_teacher(tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    args = [
        "--teacher", str(TEACHER),
        "--backbone", "efficientnet_lite0",
        "--no-pretrained",
        "--batch-size", "4",
        "--crop", "96", "96",
        "--kd-weight", "0.5",
        "--temperature", "2",
        "--teacher-note", "Apache-2.0",
        "--also-eval", f"voc/val={VOC_TINY}",
        *tiny_run(tmp_path, out),
    ]  # fmt: skip
    assert train.main(args) == 0
    meta = read_metadata(out)
    assert meta.teacher.startswith(TEACHER.name) and "Apache-2.0" in meta.teacher
    assert meta.class_names[12] == "dog" and meta.num_classes == 21
    assert meta.dataset.startswith("photos:JPEGImages (7 images)")
    assert "mean_iu_present" in meta.metrics
    assert set(meta.evaluations) == {"voc/val (7 images)"}
    assert len(list((tmp_path / "run" / "teacher").rglob("*.npz"))) == 7
    # Labelling is resumable: a second run finds every photo labelled and labels none.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "teacher").rglob("*.npz")}
    assert train.main([*args[:-2], "--output", str(tmp_path / "again.safetensors")]) == 0
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "teacher").rglob("*.npz")}
    assert before == after


def test_a_student_started_from_its_teacher_scores_like_it_from_the_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--init-from-deeplab`` with the teacher's own file: two tiny steps from its weights
    already score on VOC what a trained segmenter scores (a new student scores near 0)."""
    out = tmp_path / "student.safetensors"
    args = [
        "--teacher", str(FULL_TEACHER),
        "--init-from-deeplab", str(FULL_TEACHER),
        "--backbone", "mobilenet_v2",
        "--batch-size", "2",
        "--crop", "128", "128",
        "--lr", "1e-5",
        *tiny_run(tmp_path, out),
    ]  # fmt: skip
    assert train.main(args) == 0
    assert "the classifier (21 classes)" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta.backbone == "mobilenet_v2"
    assert meta.metrics["mean_iu_present"] > 0.4
    # Only a depth-1.0 DeepLab-MobileNetV2 starts a student, and only over mobilenet_v2.
    with pytest.raises(SystemExit) as refused:
        train.main([*args[:-2], "--backbone", "efficientnet_lite0", "--no-pretrained"])
    assert refused.value.code == 2
    assert "needs --backbone mobilenet_v2" in capsys.readouterr().err
    assert train.main([*args[:-2], "--init-from-deeplab", str(TEACHER)]) == 2
    assert "MobilenetV2/Conv: the file has (16, 3, 3, 3)" in capsys.readouterr().err


def test_photos_from_several_folders_are_labelled_once_each_under_their_own_names(
    tmp_path: Path,
) -> None:
    args = [
        "--teacher", str(TEACHER),
        "--photos", str(VOC_TINY / "JPEGImages"), str(DEMO_PHOTOS),
        "--mosaic", "0.5",
        "--dataset", "voc",
        "--data-root", str(VOC_TINY),
        "--backbone", "efficientnet_lite0",
        "--no-pretrained",
        "--epochs", "1",
        "--max-iters", "1",
        "--batch-size", "2",
        "--crop", "64", "64",
        "--num-workers", "0",
        "--teacher-processes", "1",
        "--no-progress",
        "--out-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert train.main(args) == 0
    cached = sorted(
        str(p.relative_to(next((tmp_path / "run" / "teacher").iterdir())))
        for p in (tmp_path / "run" / "teacher").rglob("*.npz")
    )
    demo = sorted(f"demo-photos/{p.stem}.npz" for p in DEMO_PHOTOS.glob("*.jpg"))
    assert len(cached) == 7 + len(demo)
    assert set(demo) <= set(cached)
    assert sum(c.startswith("voc-tiny/JPEGImages/") for c in cached) == 7


def test_distillation_refuses_what_cannot_work(tmp_path: Path) -> None:
    base = ["--dataset", "voc", "--data-root", str(VOC_TINY), "--backbone", "efficientnet_lite0",
            "--no-pretrained", "--out-dir", str(tmp_path)]  # fmt: skip
    assert train.main([*base, "--teacher", str(TEACHER)]) == 2  # no --photos
    assert (
        train.main([*base, "--teacher", str(tmp_path / "none.tflite"), "--photos", str(tmp_path)])
        == 2
    )


def test_fcn_eval_scores_a_teacher_with_our_metrics(tmp_path: Path) -> None:
    from fcn_core import evaluate

    out = tmp_path / "teacher.json"
    args = ["--teacher", str(TEACHER), "--dataset", "voc", "--data-root", str(VOC_TINY)]
    assert evaluate.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 7 and result["class_names"][15] == "person"
    # ESPNetv2 reaches 0.78-0.99 IU on these photos' main objects; the small DeepLab is close.
    assert result["mean_iu_present"] > 0.5


def test_repeat_factors_draw_rare_classes_more_often() -> None:
    from fcn_core.distill import repeat_factors

    # 100 photos: class 1 in 50, class 2 in 4, class 3 in none; background (0) everywhere.
    presence = np.zeros((100, 4), dtype=bool)
    presence[:, 0] = True
    presence[:50, 1] = True
    presence[50:54, 2] = True
    factors = repeat_factors(presence, threshold=0.16)
    assert factors[:50] == pytest.approx(1.0)  # common: f = 0.5 >= threshold
    assert factors[50:54] == pytest.approx(2.0)  # sqrt(0.16 / 0.04)
    assert factors[54:] == pytest.approx(1.0)  # background only: never below 1
    presence[0, 2] = True  # a photo with a common and a rare class takes the larger factor
    assert repeat_factors(presence, threshold=0.16)[0] == pytest.approx((0.16 / 0.05) ** 0.5)
