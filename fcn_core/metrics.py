"""The four metrics of the paper (section 5): pixel accuracy, mean accuracy, mean IU and
frequency-weighted IU, from one confusion matrix that sums across batches and processes."""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """num_classes x num_classes int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target is ``ignore_index`` or outside 0..num_classes-1 are not counted.
    Runs on whatever device the inputs are on.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred = pred[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in 0..{num_classes - 1}")
    idx = target[keep] * num_classes + pred
    counts = torch.bincount(idx, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(hist: torch.Tensor | np.ndarray) -> dict[str, float | list[float]]:
    """The paper's metrics. Classes absent from both prediction and ground truth give NaN IU
    and are left out of the means; so are classes absent from the ground truth in mean acc.

    ``mean_iu_present`` averages IU over the classes present in the ground truth only: on a
    small validation set that lacks some classes (COCO photos in VOC classes), a class the
    model predicts but the set never shows would otherwise count as an IU of 0."""
    h = torch.as_tensor(hist).double().cpu()
    total = h.sum()
    diag = h.diag()
    gt = h.sum(1)
    predicted = h.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = (diag / gt).numpy()
        iu = (diag / (gt + predicted - diag)).numpy()
    valid = ~np.isnan(iu)
    present = gt.numpy() > 0
    return {
        "pixel_acc": float(diag.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(np.nanmean(acc_cls)) if (~np.isnan(acc_cls)).any() else float("nan"),
        "mean_iu": float(np.nanmean(iu)) if valid.any() else float("nan"),
        "mean_iu_present": float(np.mean(iu[present])) if present.any() else float("nan"),
        # (sum_i t_i IU_i) / sum_i t_i with integer t_i: one division, so never above 1
        "fw_iu": float((gt.numpy()[valid] * iu[valid]).sum() / float(total))
        if valid.any()
        else float("nan"),
        "iu": [float(v) for v in iu],
    }
