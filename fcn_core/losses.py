"""Per-pixel cross entropy with void ignored, and class weights for unbalanced data."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fcn_core.data.transforms import VOID


def median_frequency_weights(dataset) -> torch.Tensor:
    """Eigen & Fergus / SegNet balancing: w_c = median(freq) / freq_c, where freq_c is the
    pixels of class c over the pixels of the images in which c appears. Classes that never
    appear get weight 0 (they cannot be learnt from this split anyway)."""
    n = dataset.num_classes
    class_pixels = np.zeros(n, dtype=np.float64)
    image_pixels = np.zeros(n, dtype=np.float64)
    for i in range(len(dataset)):
        mask = dataset.read_mask(i)
        labelled = mask[mask != VOID]
        counts = np.bincount(labelled.ravel(), minlength=n)[:n]
        class_pixels += counts
        image_pixels += (counts > 0) * labelled.size
    present = class_pixels > 0
    freq = np.zeros(n)
    freq[present] = class_pixels[present] / image_pixels[present]
    weights = np.zeros(n)
    weights[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(weights, dtype=torch.float32)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = VOID,
) -> torch.Tensor:
    """``sum`` is the paper's unnormalised loss (hence its 1e-10 learning rates); ``mean``
    averages over labelled pixels, which keeps the learning rate independent of image size."""
    return F.cross_entropy(
        logits.float(), target, weight=weight, ignore_index=ignore_index, reduction=reduction
    )
