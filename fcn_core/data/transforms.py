"""Joint image/mask transforms on uint8 tensors, and a collate that pads with void.

Images stay uint8 until they reach the device, where the weights' ``Normalization`` runs:
the same code path as the server, and a quarter of the bytes through the data loader.
All randomness comes from torch's generator, so a seeded epoch replays exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor]
JointTransform = Callable[[torch.Tensor, torch.Tensor], Pair]
VOID = 255


class Compose:
    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 3 x H x W -> ``size``, bilinear and antialiased."""
    img = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return img.round().clamp(0, 255).to(torch.uint8)[0]


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> Pair:
    """Bilinear (antialiased) for the image, nearest for the mask, so labels stay labels."""
    img = resize_image(image, size)
    msk = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)
    return img, msk


class RandomScale:
    def __init__(self, min_scale: float, max_scale: float) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = min_scale, max_scale

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        s = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(()).item()
        h, w = mask.shape
        return resize_pair(image, mask, (max(1, round(h * s)), max(1, round(w * s))))


class RandomCrop:
    """Crop to size, padding first with 0 (image) and void (mask) where the image is smaller."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        h, w = mask.shape
        ph, pw = max(0, self.height - h), max(0, self.width - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0)
            mask = F.pad(mask, (0, pw, 0, ph), value=VOID)
            h, w = mask.shape
        top = int(torch.randint(0, h - self.height + 1, ()).item())
        left = int(torch.randint(0, w - self.width + 1, ()).item())
        return (
            image[:, top : top + self.height, left : left + self.width],
            mask[top : top + self.height, left : left + self.width],
        )


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        if torch.rand(()).item() < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask


def train_transforms(
    crop: tuple[int, int] | None, scale: tuple[float, float] = (0.5, 2.0), flip: bool = True
) -> Compose:
    steps: list[JointTransform] = []
    if scale != (1.0, 1.0):
        steps.append(RandomScale(*scale))
    if crop is not None:
        steps.append(RandomCrop(*crop))
    if flip:
        steps.append(RandomHorizontalFlip())
    return Compose(steps)


def pad_collate(batch: Sequence[Pair], multiple: int = 1) -> Pair:
    """Stack images of different sizes: pad to the largest (rounded up to ``multiple``),
    image with 0 and target with void so that padding never counts in the loss or metrics.

    A target is an H x W mask of class indices (padded with ``VOID``) or a float C x H x W
    map such as a teacher's logits (padded with NaN, the float void)."""
    h = max(t.shape[-2] for _, t in batch)
    w = max(t.shape[-1] for _, t in batch)
    h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    first = batch[0][1]
    float_target = first.is_floating_point()
    images = torch.zeros(len(batch), 3, h, w, dtype=torch.uint8)
    targets = torch.full(
        (len(batch), *first.shape[:-2], h, w),
        float("nan") if float_target else VOID,
        dtype=first.dtype if float_target else torch.int64,
    )
    for i, (img, target) in enumerate(batch):
        images[i, :, : img.shape[1], : img.shape[2]] = img
        targets[i, ..., : target.shape[-2], : target.shape[-1]] = target
    return images, targets
