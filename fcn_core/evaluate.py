"""fcn-eval: the paper's four metrics and per-class IU of a weights file on a data split."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fcn_core.data import CLASS_NAMES, DATASETS, build_dataset, pad_collate
from fcn_core.metrics import confusion_matrix, scores
from fcn_core.preprocess import Normalization
from fcn_core.weights import LoadedWeights, WeightsError, WeightsMetadata, load_weights


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    normalization: Normalization,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """Class probabilities for uint8 images, averaged over flips and scales when asked."""
    x = normalization(images)
    h, w = x.shape[-2:]
    probs = []
    for s in scales:
        xs = (
            x
            if s == 1.0
            else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        )
        for flipped in (False, True) if flip else (False,):
            inp = xs.flip(-1) if flipped else xs
            out = model(inp).float()
            out = out.flip(-1) if flipped else out
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            probs.append(out.softmax(1))
    return torch.stack(probs).sum(0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    normalization: Normalization,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    num_workers: int = 0,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int, float]:
    """Confusion matrix over the data set (or the given shard of it), images, seconds.

    The matrix is summable: distributed callers all-reduce it, then call ``scores``.
    """
    was_training = model.training
    model.eval()
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(
        subset, batch_size=batch_size, num_workers=num_workers, collate_fn=pad_collate
    )
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    images_seen = 0
    start = time.perf_counter()
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", leave=False)
    for images, masks in iterator:
        images, masks = images.to(device), masks.to(device)
        pred = predict(model, images, normalization, flip, scales).argmax(1)
        hist += confusion_matrix(pred, masks, num_classes)
        images_seen += images.shape[0]
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    model.train(was_training)
    return hist, images_seen, time.perf_counter() - start


def format_table(result: dict, class_names: Sequence[str]) -> str:
    lines = [f"{'metric':<22}{'value':>8}"]
    for key in ("pixel_acc", "mean_acc", "mean_iu", "mean_iu_present", "fw_iu"):
        lines.append(f"{key:<22}{result[key]:>8.4f}")
    lines.append("")
    lines.append(f"{'class':<22}{'IU':>8}")
    for name, iu in zip(class_names, result["iu"], strict=True):
        lines.append(f"{name:<22}{iu:>8.4f}")
    return "\n".join(lines)


def load_model(args: argparse.Namespace) -> LoadedWeights:
    if args.weights:
        loaded = load_weights(args.weights, device=args.device)
        if args.backend == "torch":
            return loaded
        return LoadedWeights(backend_module(args.backend, loaded, args.device), loaded.meta)
    from fcn_core.teachers import RAW_PIXELS, TeacherModule, TFLiteTeacher

    teacher = TFLiteTeacher(args.teacher)
    classes = build_dataset(
        args.dataset,
        args.data_root,
        args.split,
        num_classes=teacher.num_classes,
        class_names=CLASS_NAMES[args.classes] if args.classes else None,
    )
    meta = WeightsMetadata(
        arch="teacher",
        backbone=Path(args.teacher).name,
        class_names=classes.class_names,
        palette=classes.palette,
        normalization=RAW_PIXELS,
        sha256=teacher.sha256,
    )
    args.device, args.batch_size = "cpu", 1  # the teacher runs on the CPU, a photo at a time
    return LoadedWeights(TeacherModule(teacher), meta)


def backend_module(name: str, loaded: LoadedWeights, device: str) -> nn.Module:
    """The weights run by another backend than torch, every core on each pass."""
    from fcn_core.backends import NetworkModule, build_network, choose_backend
    from fcn_core.inference import usable_cores

    where = torch.device(device)
    chosen = choose_backend(name, where, loaded.meta)
    cores = usable_cores()
    network = build_network(chosen, loaded.model, loaded.meta, where, workers=1, cores=cores)
    return NetworkModule(network, cores)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fcn-eval", description=__doc__)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="a .safetensors weights file")
    model.add_argument(
        "--teacher",
        help="a teacher model to score instead (a TFLite file, as fcn-train --teacher takes); "
        "its classes are the data set's",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-root", help="root of the data set (not needed for synthetic)")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--classes", choices=sorted(CLASS_NAMES), help="--teacher on a folder data set: its classes"
    )
    p.add_argument("--json", type=Path, help="write the metrics here as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnxruntime", "openvino", "auto"],
        help="what runs the network (the ONNX ones on the CPU, from the cached export)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--flip", action="store_true", help="test-time augmentation: horizontal flip")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="test-time augmentation: input scales to average, e.g. 0.75 1 1.25",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_model(args)
        meta = loaded.meta
        dataset = build_dataset(
            args.dataset,
            args.data_root,
            args.split,
            num_classes=meta.num_classes,
            class_names=meta.class_names,
        )
        if dataset.num_classes != meta.num_classes:
            raise ValueError(
                f"the weights predict {meta.num_classes} classes but the "
                f"{args.dataset} data set has {dataset.num_classes}"
            )
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        print(f"fcn-eval: error: {exc}", file=sys.stderr)
        return 2
    hist, n, seconds = evaluate(
        loaded.model,
        dataset,
        meta.num_classes,
        meta.normalization,
        args.device,
        args.batch_size,
        args.num_workers,
        args.flip,
        args.scales,
        progress=sys.stderr.isatty(),
    )
    result = scores(hist)
    result.update(
        class_names=meta.class_names,
        images=n,
        seconds=round(seconds, 3),
        images_per_second=round(n / seconds, 3) if seconds > 0 else None,
        weights=str(args.weights or args.teacher),
        weights_sha256=meta.sha256,
        dataset=args.dataset,
        split=args.split,
        device=str(args.device),
        backend=args.backend if args.weights else "teacher",
        flip=args.flip,
        scales=args.scales,
    )
    print(format_table(result, meta.class_names))
    print(
        f"\n{n} images in {seconds:.1f} s ({result['images_per_second']} images/s) on {args.device}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
