"""PASCAL VOC segmentation (JPEGImages, SegmentationClass palette PNGs, ImageSets lists),
optionally with SBD's extra training masks, as the paper trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fcn_core.data.base import SegmentationDataset, require_dir
from fcn_core.data.palettes import VOC_CLASSES, VOC_PALETTE
from fcn_core.data.transforms import JointTransform

VOC2012_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC2012_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"


def voc_root(root: str | Path) -> Path:
    """Accept the VOC2012 folder itself or any parent holding ``VOCdevkit/VOC2012``."""
    root = Path(root)
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"no VOC layout (JPEGImages/, SegmentationClass/) under {root}")


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def voc(
    root: str | Path, split: str = "train", transform: JointTransform | None = None
) -> SegmentationDataset:
    base = voc_root(root)
    ids = read_ids(base / "ImageSets" / "Segmentation" / f"{split}.txt")
    pairs = [
        (base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids
    ]
    return SegmentationDataset(pairs, VOC_CLASSES, VOC_PALETTE, f"voc/{split}", transform=transform)


def sbd_to_png(sbd_root: str | Path, out_dir: str | Path) -> Path:
    """Convert SBD's ``cls/*.mat`` masks into index PNGs once, so training reads PNGs."""
    from scipy.io import loadmat

    cls_dir = require_dir(Path(sbd_root) / "dataset" / "cls", "SBD cls/ folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for mat in sorted(cls_dir.glob("*.mat")):
        target = out / f"{mat.stem}.png"
        if not target.exists():
            seg = loadmat(str(mat))["GTcls"][0]["Segmentation"][0].astype(np.uint8)
            Image.fromarray(seg).save(target)
    return out


def voc_sbd_train(
    voc_root_dir: str | Path, sbd_root: str | Path, transform: JointTransform | None = None
) -> SegmentationDataset:
    """SBD train + val minus the VOC val images: the paper's training set (no val leakage)."""
    base = voc_root(voc_root_dir)
    sbd = Path(sbd_root) / "dataset"
    ids = set(read_ids(sbd / "train.txt")) | set(read_ids(sbd / "val.txt"))
    ids -= set(read_ids(base / "ImageSets" / "Segmentation" / "val.txt"))
    masks = sbd_to_png(sbd_root, Path(sbd_root) / "cls_png")
    pairs = [(base / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in sorted(ids)]
    return SegmentationDataset(
        pairs, VOC_CLASSES, VOC_PALETTE, "voc+sbd/train", transform=transform
    )


def download_voc(root: str | Path, sbd: bool = False) -> Path:
    """Fetch VOC2012 (and SBD) on a connected machine; a no-op when already extracted."""
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root)
    try:
        base = voc_root(root)
    except FileNotFoundError:
        download_and_extract_archive(VOC2012_URL, str(root), md5=VOC2012_MD5)
        base = voc_root(root)
    if sbd and not (root / "benchmark_RELEASE" / "dataset").is_dir():
        download_and_extract_archive(SBD_URL, str(root), md5=SBD_MD5)
    return base
