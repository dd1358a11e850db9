"""Synthetic scenes: random shapes whose class decides their colour, for tests and smoke runs.

Deterministic per (seed, index). Learnable in a few hundred steps, so a smoke run can show a
real drop in loss and a real rise in mean IU without any downloaded data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fcn_core.data.palettes import VOC_PALETTE, voc_palette
from fcn_core.data.transforms import JointTransform


class SyntheticScenes(Dataset):
    def __init__(
        self,
        length: int = 16,
        size: tuple[int, int] = (96, 128),
        num_classes: int = 4,
        seed: int = 0,
        transform: JointTransform | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError("synthetic scenes need at least 2 classes")
        self.length, self.size, self.seed = length, size, seed
        self.class_names = ["background", *[f"shape_{i}" for i in range(1, num_classes)]]
        pal = VOC_PALETTE if num_classes <= len(VOC_PALETTE) else voc_palette(num_classes)
        self.palette = [list(c) for c in pal[:num_classes]]
        self.transform = transform
        self.name = f"synthetic/{seed}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        h, w = self.size
        mask = np.zeros((h, w), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        for _ in range(int(rng.integers(2, 6))):
            cls = int(rng.integers(1, self.num_classes))
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(h / 10, h / 3), rng.uniform(w / 10, w / 3)
            if rng.random() < 0.5:
                region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                region = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            mask[region] = cls
        colours = np.array(self.palette, dtype=np.float32)
        image = colours[mask] * 0.7 + 40 + rng.normal(0, 12, (h, w, 3))
        return np.clip(image, 0, 255).astype(np.uint8), mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, mask = self.sample(index)
        img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        msk = torch.from_numpy(mask.astype(np.int64))
        if self.transform is not None:
            img, msk = self.transform(img, msk)
        return img, msk

    def read_mask(self, index: int) -> np.ndarray:
        return self.sample(index)[1]

    def validate(self) -> None:
        """Generated scenes are valid by construction."""

    def write_folder(self, root: str | Path, split: str | None = None) -> Path:
        """Write the scenes as the plain ``images/ masks/`` layout (JPEG + index PNG)."""
        root = Path(root)
        images, masks = root / "images", root / "masks"
        if split:
            images, masks = images / split, masks / split
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i in range(self.length):
            image, mask = self.sample(i)
            Image.fromarray(image).save(images / f"{i:05d}.jpg", quality=95)
            Image.fromarray(mask).save(masks / f"{i:05d}.png")
        return root
