"""The plain layout for your own data: ``images/`` and ``masks/`` with matching file stems
(optionally one sub-folder per split). Masks are index PNGs; 255 is void."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fcn_core.data.base import SegmentationDataset, require_dir
from fcn_core.data.palettes import VOC_PALETTE, voc_palette
from fcn_core.data.transforms import JointTransform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def folder(
    root: str | Path,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    transform: JointTransform | None = None,
) -> SegmentationDataset:
    root = require_dir(Path(root), "data root")
    images = root / "images"
    masks = root / "masks"
    if split and (images / split).is_dir():
        images, masks = images / split, masks / split
    require_dir(images, "images folder")
    require_dir(masks, "masks folder")
    mask_by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == ".png"}
    pairs = []
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if img.stem not in mask_by_stem:
            raise FileNotFoundError(f"no mask for {img.name} in {masks}")
        pairs.append((img, mask_by_stem[img.stem]))
    if class_names is None:
        if num_classes is None:
            raise ValueError("folder data set: give class_names or num_classes")
        class_names = [f"class_{i}" for i in range(num_classes)]
    palette = VOC_PALETTE if len(class_names) <= len(VOC_PALETTE) else voc_palette(len(class_names))
    return SegmentationDataset(
        pairs,
        class_names,
        palette[: len(class_names)],
        f"folder/{split or 'all'}",
        transform=transform,
    )
