"""``fcn-train``'s command line and the typed configuration it becomes (presets applied)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fcn_core.data import CLASS_NAMES, DATASETS
from fcn_core.models import ARCHITECTURES, BACKBONES

TRAIN_DESCRIPTION = """Train FCN-32s/16s/8s and write the served weights file.

Presets: ``paper`` (batch 1, summed loss, SGD momentum 0.99, lr 1e-10/1e-12/1e-14, staged
32s -> 16s -> 8s) and ``modern`` (mean loss, AdamW, warm-up + cosine, random crops, bf16 on
CUDA). With ``--teacher`` and ``--photos`` the labels come from a teacher (distillation).
Runs as one process or under torchrun (DDP); every epoch ends with an exact checkpoint."""
PAPER_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14}

PRESETS: dict[str, dict] = {
    "paper": dict(
        optimizer="sgd",
        momentum=0.99,
        weight_decay=5e-4,
        batch_size=1,
        loss_reduction="sum",
        schedule="constant",
        warmup_iters=0,
        stages=["fcn32s", "fcn16s", "fcn8s"],
        crop=None,
        scale=[1.0, 1.0],
        flip=False,
        bias_lr_mult=2.0,
        amp=False,
    ),
    "modern": dict(
        optimizer="adamw",
        momentum=0.9,
        weight_decay=1e-4,
        batch_size=8,
        loss_reduction="mean",
        schedule="cosine",
        warmup_iters=100,
        lr=1e-3,
        stages=None,
        crop=[320, 320],
        scale=[0.5, 2.0],
        flip=True,
        bias_lr_mult=1.0,
        amp=True,
    ),
}


@dataclass
class TrainConfig:
    """One run, typed: what ``parse_args`` makes of the command line (presets applied)."""

    dataset: str
    data_root: str | None = None
    sbd_root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None
    class_names: list[str] | None = None
    arch: str = "fcn8s"
    backbone: str = "vgg16"
    pretrained: bool = True
    init_from: Path | None = None
    init_from_deeplab: Path | None = None
    frozen_backbone: bool = False
    learnable_upsampling: bool = False
    at_once: bool = False
    preset: str = "modern"
    stages: list[str] = field(default_factory=lambda: ["fcn8s"])
    epochs: int = 50
    batch_size: int = 8
    lr: float | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_iters: int = 0
    loss_reduction: str = "mean"
    bias_lr_mult: float = 1.0
    class_weights: str = "none"
    crop: tuple[int, int] | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    amp: bool = False
    eval_every: int = 1
    eval_batch_size: int = 1
    num_workers: int = 2
    device: str = "cpu"
    seed: int = 0
    out_dir: Path = Path("runs/train")
    output: Path | None = None
    resume: Path | None = None
    max_iters: int | None = None
    stop_after_epochs: int | None = None
    ema_decay: float | None = None
    tensorboard: bool = False
    no_progress: bool = False
    teacher: Path | None = None
    photos: list[Path] = field(default_factory=list)
    mosaic: float = 0.0
    teacher_cache: Path | None = None
    teacher_processes: int = 2
    confidence: float = 0.5
    kd_weight: float = 0.0
    temperature: float = 1.0
    kd_stride: int = 4
    repeat_threshold: float | None = None
    teacher_note: str = ""
    also_eval: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    """The command line, kept in the weights' metadata."""


def parse_args(argv: Sequence[str] | None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="fcn-train",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-root", help="data set root (VOC2012 folder or a parent, CamVid, folder)")
    p.add_argument(
        "--sbd-root", help="VOC only: SBD's benchmark_RELEASE, for the paper's train set"
    )
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--num-classes", type=int, help="folder / synthetic data sets only")
    p.add_argument("--arch", default="fcn8s", choices=list(ARCHITECTURES))
    p.add_argument("--backbone", default="vgg16", choices=BACKBONES)
    p.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="start from random weights instead of the ImageNet ones",
    )
    p.add_argument("--init-from", type=Path, help="weights file of a coarser trained net (staged)")
    p.add_argument(
        "--init-from-deeplab",
        type=Path,
        metavar="TFLITE",
        help="start from the weights of a trained DeepLabV3-MobileNetV2 (depth 1.0) TFLite file, "
        "such as the teacher's, instead of ImageNet's: needs --backbone mobilenet_v2 and the "
        "'distill' extra; its classifier is copied where it has as many classes, the skips "
        "start at zero",
    )
    p.add_argument(
        "--frozen-backbone",
        action="store_true",
        help="train only score_fr and the skips' score layers: the backbone (for mobilenet_v2, "
        "its DeepLab head too) keeps its weights and batch-norm statistics and runs in "
        "evaluation mode; use with --init-from or --init-from-deeplab",
    )
    p.add_argument("--learnable-upsampling", action="store_true")
    p.add_argument("--at-once", action="store_true", help="FCN-8s-at-once (scaled skips)")
    p.add_argument("--preset", default="modern", choices=list(PRESETS))
    p.add_argument(
        "--stages",
        nargs="+",
        choices=list(ARCHITECTURES),
        help="train these archs in turn, each from the last (paper: 32s 16s 8s)",
    )
    p.add_argument("--epochs", type=int, default=50, help="per stage")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["constant", "poly", "cosine"])
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--loss-reduction", choices=["mean", "sum"])
    p.add_argument("--class-weights", choices=["none", "median-freq"], default="none")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--no-crop", action="store_true", help="train on whole images")
    p.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/train"),
        help="checkpoints (last.pt, best.pt) and metrics.jsonl",
    )
    p.add_argument("--output", type=Path, help="the final weights file (.safetensors)")
    p.add_argument("--resume", type=Path, help="a last.pt checkpoint to continue exactly")
    p.add_argument("--max-iters", type=int, help="stop each stage after this many iterations")
    p.add_argument(
        "--stop-after-epochs",
        type=int,
        help="end this run after N epochs, leaving last.pt to --resume (time-boxed jobs)",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        help="evaluate and export an exponential moving average of the weights (e.g. 0.998)",
    )
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    distil = p.add_argument_group(
        "distillation", "train on unlabelled photos labelled by a teacher (fcn_core.distill)"
    )
    distil.add_argument("--teacher", type=Path, help="the teacher model (a TFLite file)")
    distil.add_argument(
        "--photos",
        type=Path,
        nargs="+",
        default=[],
        help="folders of unlabelled photos (recursive)",
    )
    distil.add_argument(
        "--mosaic",
        type=float,
        default=0.0,
        help="the fraction of samples that are 2 x 2 mosaics of four photos at half scale",
    )
    distil.add_argument(
        "--teacher-cache", type=Path, help="where the teacher's logits are kept (OUT_DIR/teacher)"
    )
    distil.add_argument("--teacher-processes", type=int, default=2)
    distil.add_argument(
        "--confidence",
        type=float,
        default=0.5,
        help="ignore pixels whose teacher probability is below this in the hard-label loss",
    )
    distil.add_argument(
        "--kd-weight", type=float, default=0.0, help="weight of the soft (KL) loss; 0: hard only"
    )
    distil.add_argument("--temperature", type=float, default=1.0, help="of the soft loss")
    distil.add_argument(
        "--kd-stride",
        type=int,
        default=4,
        help="the soft loss compares k x k averages of both maps (the teacher's are stride 16)",
    )
    distil.add_argument(
        "--repeat-threshold",
        type=float,
        help="repeat-factor sampling: photos of classes the teacher sees in fewer than this "
        "fraction of the photos are drawn up to sqrt(threshold / fraction) times as often",
    )
    distil.add_argument(
        "--teacher-note", default="", help="said of the teacher in the metadata (its licence)"
    )
    p.add_argument(
        "--also-eval",
        nargs="+",
        default=[],
        metavar="DATASET[/SPLIT]=ROOT",
        help="score the exported weights on these splits too (kept in the metadata)",
    )
    p.add_argument(
        "--classes",
        choices=sorted(CLASS_NAMES),
        help="class names for folder data sets (else class_0, class_1, ...)",
    )
    ns = p.parse_args(argv)
    if ns.init_from_deeplab is not None:
        if ns.backbone != "mobilenet_v2":
            p.error("--init-from-deeplab needs --backbone mobilenet_v2 (its layers are that net's)")
        if ns.init_from is not None:
            p.error("--init-from and --init-from-deeplab both start the net: give one")
    preset = PRESETS[ns.preset]
    values = vars(ns)
    for key, value in preset.items():
        if key in ("crop", "scale", "flip", "amp", "stages"):
            continue
        if values.get(key) is None:
            values[key] = value
    no_crop, no_flip, no_amp = values.pop("no_crop"), values.pop("no_flip"), values.pop("no_amp")
    classes = values.pop("classes")
    return TrainConfig(
        **{
            **values,
            "stages": ns.stages or preset["stages"] or [ns.arch],
            "crop": None if no_crop else tuple(ns.crop or preset["crop"] or ()) or None,
            "scale": tuple(ns.scale or preset["scale"]),
            "flip": preset["flip"] and not no_flip,
            "amp": preset["amp"] and not no_amp,
            "class_names": CLASS_NAMES[classes] if classes else None,
            "argv": list(sys.argv[1:] if argv is None else argv),
        }
    )
