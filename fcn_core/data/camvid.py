"""CamVid in SegNet's layout: ``train/ trainannot/ val/ valannot/ test/ testannot/``."""

from __future__ import annotations

from pathlib import Path

from fcn_core.data.base import SegmentationDataset, require_dir
from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE
from fcn_core.data.transforms import JointTransform

CAMVID_VOID = 11


def camvid(
    root: str | Path, split: str = "train", transform: JointTransform | None = None
) -> SegmentationDataset:
    root = require_dir(Path(root), "CamVid data root")
    images = require_dir(root / split, f"CamVid split '{split}'")
    masks = require_dir(root / f"{split}annot", f"CamVid annotations for '{split}'")
    pairs = [(p, masks / p.name) for p in sorted(images.glob("*.png"))]
    missing = [m.name for _, m in pairs if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"CamVid {split}: {len(missing)} masks missing, e.g. {missing[0]}")
    return SegmentationDataset(
        pairs,
        CAMVID_CLASSES,
        CAMVID_PALETTE,
        f"camvid/{split}",
        void_values=(CAMVID_VOID,),
        transform=transform,
    )
