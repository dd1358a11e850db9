"""A data set of (image path, mask path) pairs with the checks every layout shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fcn_core.data.transforms import VOID, JointTransform


def read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


class SegmentationDataset(Dataset):
    """Pairs of files; masks hold class indices with ``VOID`` (255) for pixels to ignore.

    ``void_values`` lists other mask values that mean void in this layout (CamVid's 11).
    Every sample is checked: image and mask sizes must agree, and no mask value may
    exceed the class count, since a silent out-of-range label corrupts the loss.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        name: str,
        void_values: Sequence[int] = (),
        transform: JointTransform | None = None,
    ) -> None:
        if not pairs:
            raise ValueError(f"{name}: the split is empty")
        self.pairs = list(pairs)
        self.class_names = list(class_names)
        self.palette = [list(c) for c in palette]
        self.name = name
        self.transform = transform
        self.lut = np.arange(256, dtype=np.uint8)
        for v in void_values:
            self.lut[v] = VOID

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, index: int) -> np.ndarray:
        path = self.pairs[index][1]
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"{path}: mask mode {im.mode} is not an index image (L or P)")
            arr = np.array(im)
        if arr.max(initial=0) > 255:
            raise ValueError(f"{path}: mask values up to {arr.max()} exceed 255")
        arr = self.lut[arr.astype(np.uint8)]
        bad = np.unique(arr[(arr >= self.num_classes) & (arr != VOID)])
        if bad.size:
            raise ValueError(
                f"{path}: mask values {bad.tolist()[:5]} exceed the {self.num_classes} classes "
                f"(valid: 0..{self.num_classes - 1} and {VOID} = void)"
            )
        return arr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path = self.pairs[index][0]
        image = read_image(image_path)
        mask = torch.from_numpy(self.read_mask(index).astype(np.int64))
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(
                f"{image_path}: image is {image.shape[2]}x{image.shape[1]} but its mask "
                f"{self.pairs[index][1].name} is {mask.shape[1]}x{mask.shape[0]}"
            )
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def validate(self) -> None:
        """Check every pair up front (sizes from headers, every mask's values), so bad data
        fails before training starts rather than hours into it."""
        for index, (image_path, mask_path) in enumerate(self.pairs):
            if not image_path.is_file():
                raise FileNotFoundError(f"image not found: {image_path}")
            if not mask_path.is_file():
                raise FileNotFoundError(f"mask not found: {mask_path}")
            with Image.open(image_path) as im:
                size = im.size
            mask = self.read_mask(index)
            if size != (mask.shape[1], mask.shape[0]):
                raise ValueError(
                    f"{image_path}: image is {size[0]}x{size[1]} but its mask {mask_path.name} "
                    f"is {mask.shape[1]}x{mask.shape[0]}"
                )
