"""fcn-train and fcn-eval end to end: exact resume, two-process DDP, the VGG16 FCN-8s smoke run
on real VOC images, and the errors bad data must produce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fcn_core import evaluate, train
from fcn_core.data import SyntheticScenes
from fcn_core.engine import WeightAverage
from fcn_core.models import build_model
from fcn_core.weights import read_metadata

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LITE = [
    "--dataset",
    "synthetic",
    "--backbone",
    "efficientnet_lite0",
    "--no-pretrained",
    "--batch-size",
    "4",
    "--crop",
    "64",
    "64",
    "--num-workers",
    "0",
    "--no-progress",
    "--lr",
    "3e-3",
    "--warmup-iters",
    "2",
    "--seed",
    "3",
]


def run_train(args: list[str]) -> int:
    return train.main(args)


@pytest.mark.parametrize("average", [[], ["--ema-decay", "0.9"]], ids=["weights", "ema"])
def test_resume_after_interrupt_matches_uninterrupted_run(
    tmp_path: Path, average: list[str]
) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert (
        run_train(
            [
                *LITE,
                *average,
                "--epochs",
                "3",
                "--out-dir",
                str(full),
                "--output",
                str(full / "w.safetensors"),
            ]
        )
        == 0
    )
    assert (
        run_train(
            [*LITE, *average, "--epochs", "3", "--out-dir", str(part), "--stop-after-epochs", "1"]
        )
        == 0
    )
    assert not (part / "w.safetensors").exists()
    assert (
        run_train(
            [
                *LITE,
                *average,
                "--epochs",
                "3",
                "--out-dir",
                str(part),
                "--resume",
                str(part / "last.pt"),
                "--output",
                str(part / "w.safetensors"),
            ]
        )
        == 0
    )
    a, b = load_file(full / "w.safetensors"), load_file(part / "w.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert (
        read_metadata(full / "w.safetensors").metrics
        == read_metadata(part / "w.safetensors").metrics
    )


def test_weight_average_follows_the_model() -> None:
    """The average moves towards each step's weights at the warmed-up decay, copies integer
    buffers, and is what the run evaluates: a model that stops changing is caught up with."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    average = WeightAverage(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 7
    average.update()  # warm-up decay min(0.5, 2 / 11)
    expected = start + (1 - 2 / 11)
    assert torch.allclose(average.module[0].weight, expected)
    assert int(average.module[1].num_batches_tracked) == 7
    for _ in range(60):
        average.update()
    assert torch.allclose(average.module[0].weight, model[0].weight, atol=1e-6)
    assert not any(p.requires_grad for p in average.module.parameters())
    with pytest.raises(ValueError, match="ema-decay"):
        WeightAverage(model, decay=1.0)


def test_frozen_backbone_trains_the_score_layers_only(tmp_path: Path) -> None:
    """``--frozen-backbone``: every backbone tensor, batch-norm statistics included, is what
    the run started from (the same seed builds the same net); the score layers learnt."""
    out = tmp_path / "w.safetensors"
    args = [*LITE, "--epochs", "2", "--frozen-backbone", "--out-dir", str(tmp_path)]
    assert run_train([*args, "--output", str(out)]) == 0
    trained = load_file(out)
    torch.manual_seed(3)  # as fcn-train seeds stage 0: seed + stage
    start = build_model("fcn8s", 2, "efficientnet_lite0").state_dict()
    backbone = [k for k in start if k.startswith("backbone.")]
    assert len(backbone) > 100
    for key in backbone:
        assert torch.equal(trained[key], start[key]), key
    assert trained["score_pool3.weight"].abs().sum() > 0  # zero at the start


def test_resuming_with_another_frozen_backbone_setting_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*LITE, "--epochs", "2", "--out-dir", str(tmp_path)]
    assert run_train([*args, "--stop-after-epochs", "1"]) == 0
    resumed = [*args, "--frozen-backbone", "--resume", str(tmp_path / "last.pt")]
    assert run_train(resumed) == 2
    assert "resume with the same --frozen-backbone" in capsys.readouterr().err


def test_training_learns_synthetic_scenes(tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    assert (
        run_train(
            [
                *LITE,
                "--epochs",
                "15",
                "--eval-every",
                "15",
                "--lr",
                "1e-2",
                "--out-dir",
                str(tmp_path),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    meta = read_metadata(out)
    # An untrained net (zero score layers) predicts background everywhere: mean IU ~0.15.
    assert meta.metrics["mean_iu"] > 0.4
    assert meta.command.startswith("fcn-train --dataset synthetic")
    assert meta.metrics_split.startswith("synthetic/val")


def test_two_process_ddp_on_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fcn_core.train",
        *LITE,
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--out-dir",
        str(tmp_path),
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2  # rank 0 alone writes
    # 16 images, 2 processes x batch 4: each epoch is 2 steps per process.
    assert log[-1]["iteration"] == 4
    # The val metrics reduced across both processes' shards equal a single-process evaluation
    # of the same weights over the whole split.
    report = tmp_path / "eval.json"
    assert (
        evaluate.main(
            [
                "--weights",
                str(out),
                "--dataset",
                "synthetic",
                "--split",
                "val",
                "--num-workers",
                "0",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    single = json.loads(report.read_text())
    assert single["mean_iu"] == pytest.approx(log[-1]["mean_iu"], abs=1e-12)
    assert single["pixel_acc"] == pytest.approx(log[-1]["pixel_acc"], abs=1e-12)


def small_voc(src: Path, dst: Path, factor: int = 4) -> Path:
    """voc-tiny at 1/factor size, in the VOC layout (bilinear images, nearest masks)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (dst / sub).mkdir(parents=True)
    ids = (src / "ImageSets/Segmentation/val.txt").read_text().split()
    for i in ids:
        img = Image.open(src / "JPEGImages" / f"{i}.jpg")
        size = (img.width // factor, img.height // factor)
        img.resize(size, Image.BILINEAR).save(dst / "JPEGImages" / f"{i}.jpg", quality=95)
        mask = Image.open(src / "SegmentationClass" / f"{i}.png")
        small = mask.resize(size, Image.NEAREST)
        small.putpalette(mask.getpalette())
        small.save(dst / "SegmentationClass" / f"{i}.png")
    for split in ("train", "val"):
        (dst / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dst


def test_vgg16_fcn8s_smoke_run_on_voc_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented VOC command, a few iterations, from torchvision's VGG16 weights API
    (offline: a state dict placed where torchvision caches its download)."""
    if not (SHARED / "voc-tiny").is_dir():
        pytest.skip(f"{SHARED / 'voc-tiny'} not present")
    import torchvision
    from torchvision.models import VGG16_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().state_dict(), ckpt)
    root = small_voc(SHARED / "voc-tiny", tmp_path / "voc")
    out = tmp_path / "vgg.safetensors"
    assert (
        run_train(
            [
                "--dataset",
                "voc",
                "--data-root",
                str(root),
                "--arch",
                "fcn8s",
                "--backbone",
                "vgg16",
                "--preset",
                "paper",
                "--stages",
                "fcn8s",
                "--epochs",
                "1",
                "--max-iters",
                "2",
                "--num-workers",
                "0",
                "--no-progress",
                "--out-dir",
                str(tmp_path / "run"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    meta = read_metadata(out)
    assert (meta.arch, meta.backbone, meta.num_classes) == ("fcn8s", "vgg16", 21)
    report = tmp_path / "eval.json"
    assert (
        evaluate.main(
            [
                "--weights",
                str(out),
                "--dataset",
                "voc",
                "--data-root",
                str(root),
                "--split",
                "val",
                "--num-workers",
                "0",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    result = json.loads(report.read_text())
    assert {"pixel_acc", "mean_acc", "mean_iu", "fw_iu", "iu", "images_per_second"} <= set(result)
    assert len(result["iu"]) == 21 and result["images"] == 7
    assert 0.0 <= result["pixel_acc"] <= 1.0


def test_paper_preset_stages_32_16_8(tmp_path: Path) -> None:
    args = train.parse_args(["--dataset", "voc", "--preset", "paper"])
    assert args.stages == ["fcn32s", "fcn16s", "fcn8s"]
    assert (args.batch_size, args.momentum, args.loss_reduction, args.bias_lr_mult) == (
        1,
        0.99,
        "sum",
        2.0,
    )
    assert [train.stage_lr(args, a) for a in args.stages] == [1e-10, 1e-12, 1e-14]
    out = tmp_path / "staged.safetensors"
    assert (
        run_train(
            [
                *LITE,
                "--preset",
                "paper",
                "--stages",
                "fcn32s",
                "fcn16s",
                "fcn8s",
                "--lr",
                "1e-3",
                "--epochs",
                "1",
                "--max-iters",
                "1",
                "--out-dir",
                str(tmp_path),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert read_metadata(out).arch == "fcn8s"
    stages = [
        json.loads(line)["arch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert stages == ["fcn32s", "fcn16s", "fcn8s"]


def bad_folder(root: Path, mask_value: int = 1, mask_size: tuple[int, int] = (32, 24)) -> Path:
    SyntheticScenes(length=2, size=(24, 32), num_classes=3).write_folder(root, "train")
    SyntheticScenes(length=2, size=(24, 32), num_classes=3, seed=1).write_folder(root, "val")
    mask = np.full(mask_size[::-1], mask_value, dtype=np.uint8)
    Image.fromarray(mask).save(root / "masks" / "train" / "00000.png")
    return root


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nope", "data root not found"),
        (lambda p: bad_folder(p, mask_value=7), "exceed the 3 classes"),
        (lambda p: bad_folder(p, mask_size=(30, 24)), "but its mask"),
        (
            lambda p: (bad_folder(p), [f.unlink() for f in (p / "images" / "val").iterdir()])[0],
            "the split is empty",
        ),
    ],
    ids=["missing-root", "mask-out-of-range", "size-mismatch", "empty-split"],
)
def test_bad_data_gets_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, message: str
) -> None:
    root = make(tmp_path / "data")
    code = run_train(
        [
            "--dataset",
            "folder",
            "--data-root",
            str(root),
            "--num-classes",
            "3",
            "--backbone",
            "efficientnet_lite0",
            "--no-pretrained",
            "--epochs",
            "1",
            "--num-workers",
            "0",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fcn-train: error:") and message in err, err
