"""Data sets in the layouts users have (VOC, CamVid, plain folders) plus synthetic scenes."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

from fcn_core.data.base import SegmentationDataset
from fcn_core.data.camvid import camvid
from fcn_core.data.folder import folder
from fcn_core.data.palettes import CAMVID_CLASSES, VOC_CLASSES
from fcn_core.data.synthetic import SyntheticScenes
from fcn_core.data.transforms import VOID, JointTransform, pad_collate, train_transforms
from fcn_core.data.voc import download_voc, voc, voc_sbd_train

DATASETS = ("voc", "camvid", "folder", "synthetic")
CLASS_NAMES = {"voc": VOC_CLASSES, "camvid": CAMVID_CLASSES}
"""Class lists a folder data set can take by name (``--classes voc``)."""


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    *,
    transform: JointTransform | None = None,
    num_classes: int | None = None,
    sbd_root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
) -> SegmentationDataset | SyntheticScenes:
    """One entry point for the CLIs. ``synthetic`` ignores root; its split seeds it.
    ``class_names`` names a folder data set's classes (the others know their own)."""
    if name == "synthetic":
        seed = {"train": 0, "val": 1}.get(split, zlib.crc32(split.encode()) % 1000)
        return SyntheticScenes(
            length=16 if split == "train" else 8,
            seed=seed,
            num_classes=num_classes or 4,
            transform=transform,
        )
    if root is None:
        raise ValueError(f"--data-root is required for the {name} data set")
    if name == "camvid":
        return camvid(root, split, transform)
    if name == "voc":
        if split == "train" and sbd_root is not None:
            return voc_sbd_train(root, sbd_root, transform)
        return voc(root, split, transform)
    if name == "folder":
        return folder(
            root, split, class_names=class_names, num_classes=num_classes, transform=transform
        )
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "VOID",
    "SegmentationDataset",
    "SyntheticScenes",
    "build_dataset",
    "camvid",
    "download_voc",
    "folder",
    "pad_collate",
    "train_transforms",
    "voc",
    "voc_sbd_train",
]
