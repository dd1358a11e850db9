"""Distillation: train an FCN from a teacher's predictions on unlabelled photos.

``fcn-train --teacher MODEL --photos DIR`` runs the ordinary training loop (optimiser,
schedule, evaluation on a labelled split, checkpoints, export) with two parts swapped:

- the training set is :class:`TeacherLabelledPhotos`: every photo is labelled once by the
  teacher ahead of training (``label_photos``, cached by teacher and photo, resumable), and
  its stride-16 logits are kept, not a label map. Each epoch draws a random scale, crop and
  flip of the photo, and the teacher's logits are resampled onto *that* view, so the teacher
  labels exactly the pixels the student trains on;
- the loss is :class:`DistillationLoss`: cross entropy on the teacher's hard labels where it
  is confident (pixels below ``confidence`` are ignored), plus optionally the
  temperature-scaled KL divergence to its soft predictions (Hinton et al., 2015).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from fcn_core.data.base import read_image
from fcn_core.data.folder import IMAGE_SUFFIXES
from fcn_core.data.transforms import VOID, resize_image
from fcn_core.files import atomic_write, sha256_file
from fcn_core.teachers import TeacherLogits, TFLiteTeacher

log = logging.getLogger(__name__)


def find_photos(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"photos folder not found: {root}")
    photos = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return photos


def cache_path(cache_dir: Path, root: Path, photo: Path) -> Path:
    return cache_dir / photo.relative_to(root).with_suffix(".npz")


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def save_logits(path: Path, labelled: TeacherLogits) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(
                f,
                logits=labelled.logits,
                image_size=np.array(labelled.image_size),
                input_size=np.array(labelled.input_size),
            )

    atomic_write(path, write)


def load_logits(path: Path) -> TeacherLogits:
    with np.load(path) as z:
        return TeacherLogits(
            z["logits"], tuple(int(v) for v in z["image_size"]), int(z["input_size"])
        )


def _label_shard(args: tuple[str, int, list[tuple[Path, Path]]]) -> int:
    teacher_path, threads, jobs = args
    teacher = TFLiteTeacher(teacher_path, num_threads=threads)
    for photo, out in jobs:
        save_logits(out, teacher(read_rgb(photo)))
    return len(jobs)


def teacher_cache_dir(cache_root: Path, teacher_path: Path) -> Path:
    """One folder per teacher file (by content), so a changed teacher never reuses labels."""
    digest = sha256_file(teacher_path)[:16]
    return Path(cache_root) / f"{Path(teacher_path).stem}-{digest}"


def label_photos(
    teacher_path: Path,
    root: Path,
    photos: Sequence[Path],
    cache_dir: Path,
    processes: int = 1,
    progress: Callable[[str], None] = print,
) -> None:
    """Run the teacher over every photo not yet labelled in ``cache_dir`` (resumable: each
    photo's logits are written atomically, so an interrupted run keeps what it finished)."""
    todo = [(p, cache_path(cache_dir, root, p)) for p in photos]
    todo = [(p, out) for p, out in todo if not out.is_file()]
    if not todo:
        return
    progress(f"teacher: labelling {len(todo)} of {len(photos)} photos in {processes} process(es)")
    shards = [todo[i::processes] for i in range(processes)]
    if processes == 1:
        _label_shard((str(teacher_path), 1, todo))
    else:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_label_shard, [(str(teacher_path), 1, s) for s in shards if s]))
    progress(f"teacher: labelled {len(todo)} photos into {cache_dir}")


class TeacherLabelledPhotos(Dataset):
    """Unlabelled photos with their teacher's logits, each sample a random view of a photo.

    A sample is (uint8 3 x h x w image, float C x h x w teacher logits with NaN where the
    view holds no photo). The view: scale by a factor drawn from ``scale``, take a random
    ``crop`` (padding past the photo), flip half the time. The logits are resampled from the
    teacher's stride-16 grid at the view's own pixel centres. A ``mosaic`` fraction of the
    samples are 2 x 2 mosaics of such views at half the scale (``mosaic_view``).
    """

    def __init__(
        self,
        root: str | Path,
        photos: Sequence[Path],
        cache_dir: Path,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        crop: tuple[int, int] | None,
        scale: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        mosaic: float = 0.0,
    ) -> None:
        if not photos:
            raise ValueError("no photos to distil on")
        if not 0 <= mosaic <= 1:
            raise ValueError(f"mosaic is a fraction of the samples, in [0, 1]; got {mosaic}")
        if mosaic and crop is None:
            raise ValueError("mosaics are cut to the crop: give a crop size with --mosaic")
        self.root = Path(root)
        self.photos = list(photos)
        self.cache_dir = Path(cache_dir)
        self.class_names = list(class_names)
        self.palette = [list(c) for c in palette]
        self.crop, self.scale, self.flip, self.mosaic = crop, scale, flip, mosaic
        self.name = f"photos:{self.root.name}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.photos)

    def validate(self) -> None:
        missing = [p for p in self.photos if not cache_path(self.cache_dir, self.root, p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} photos have no teacher logits in {self.cache_dir} "
                f"(first: {missing[0]}); run the teacher first"
            )
        labelled = load_logits(cache_path(self.cache_dir, self.root, self.photos[0]))
        if labelled.logits.shape[0] != self.num_classes:
            raise ValueError(
                f"the teacher predicts {labelled.logits.shape[0]} classes, "
                f"the student {self.num_classes}"
            )

    def class_presence(self, min_fraction: float = 0.02) -> np.ndarray:
        """N x C: which classes the teacher sees on at least ``min_fraction`` of each photo
        (read off its logit grid, inside the photo's part of the letterbox)."""
        presence = np.zeros((len(self), self.num_classes), dtype=bool)
        for i, photo in enumerate(self.photos):
            labelled = load_logits(cache_path(self.cache_dir, self.root, photo))
            grid = labelled.logits.shape[-1] - 1
            stride = (labelled.input_size - 1) / grid
            gh, gw = (math.ceil((n - 1) / stride) + 1 for n in labelled.placed_size)
            labels = labelled.logits[:, :gh, :gw].astype(np.float32).argmax(0)
            share = np.bincount(labels.ravel(), minlength=self.num_classes) / labels.size
            presence[i] = share >= min_fraction
        return presence

    def view(
        self, index: int, size: tuple[int, int] | None, scale: tuple[float, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random view of photo ``index``: scaled by a factor drawn from ``scale``, a random
        ``size`` crop of that (padded past the photo; None: all of it), flipped half the time,
        with the teacher's logits resampled at the view's own pixel centres."""
        photo = self.photos[index]
        image = read_image(photo)
        teacher = load_logits(cache_path(self.cache_dir, self.root, photo))
        h, w = image.shape[1:]
        if teacher.image_size != (h, w):
            raise ValueError(f"{photo}: {w}x{h}, but its teacher logits are for another size")
        lo, hi = scale
        s = lo + (hi - lo) * torch.rand(()).item()
        hs, ws = max(1, round(h * s)), max(1, round(w * s))
        if (hs, ws) != (h, w):
            image = resize_image(image, (hs, ws))
        ch, cw = size or (hs, ws)
        top = int(torch.randint(0, max(hs - ch, 0) + 1, ()).item())
        left = int(torch.randint(0, max(ws - cw, 0) + 1, ()).item())
        view = torch.zeros(3, ch, cw, dtype=torch.uint8)
        part = image[:, top : top + ch, left : left + cw]
        view[:, : part.shape[1], : part.shape[2]] = part
        # The view's pixel centres in the photo's coordinates; past the scaled photo -> NaN.
        ys = (top + torch.arange(ch) + 0.5) * (h / hs)
        xs = (left + torch.arange(cw) + 0.5) * (w / ws)
        ys[top + torch.arange(ch) >= hs] = -1
        xs[left + torch.arange(cw) >= ws] = -1
        logits = teacher.sample(ys, xs)
        if self.flip and torch.rand(()).item() < 0.5:
            view, logits = view.flip(-1), logits.flip(-1)
        return view, logits

    def mosaic_view(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A 2 x 2 mosaic: photo ``index`` and three photos drawn at random, each a view at
        half the scale filling a quarter of the crop. Unlabelled photos are mostly close-ups
        of one object (ImageNet's), while the photos people send are scenes with several
        small ones; the mosaic shows the student small objects among plenty of background,
        still labelled by the teacher exactly where the student looks."""
        ch, cw = self.crop  # type: ignore[misc]  # mosaics need a crop (checked at init)
        th, lw = ch // 2, cw // 2
        half = (self.scale[0] / 2, self.scale[1] / 2)
        others = torch.randint(0, len(self), (3,)).tolist()
        view = torch.zeros(3, ch, cw, dtype=torch.uint8)
        logits = torch.full((self.num_classes, ch, cw), float("nan"))
        cells = [(0, th, 0, lw), (0, th, lw, cw), (th, ch, 0, lw), (th, ch, lw, cw)]
        for i, (y0, y1, x0, x1) in zip([index, *others], cells, strict=True):
            v, lg = self.view(i, (y1 - y0, x1 - x0), half)
            view[:, y0:y1, x0:x1], logits[:, y0:y1, x0:x1] = v, lg
        return view, logits

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mosaic and torch.rand(()).item() < self.mosaic:
            return self.mosaic_view(index)
        return self.view(index, self.crop, self.scale)


def repeat_factors(
    presence: np.ndarray, threshold: float, ignore: Sequence[int] = (0,)
) -> np.ndarray:
    """Repeat-factor sampling (Gupta et al., LVIS, 2019): a class seen in a fraction ``f`` of
    the photos gets ``r = max(1, sqrt(threshold / f))``, a photo the largest ``r`` of its
    classes (``ignore``: background). Unlabelled photos skew hard towards a few classes (a
    fifth of ImageNet's are dogs; 13 of 2,028 show an aeroplane), which a student then never
    learns; this draws the rare ones more often without dropping any."""
    counted = presence.copy()
    counted[:, list(ignore)] = False
    freq = counted.mean(0)
    with np.errstate(divide="ignore"):
        per_class = np.where(freq > 0, np.maximum(1.0, np.sqrt(threshold / freq)), 1.0)
    factors = np.where(counted, per_class[None, :], 1.0).max(1)
    return factors


class DistillationLoss:
    """Cross entropy on the teacher's confident hard labels + ``kd_weight`` x T^2 x KL.

    ``target`` is N x C x H x W teacher logits, NaN where there is no photo. A pixel counts in
    the cross entropy when the teacher's top probability reaches ``confidence``; the KL term
    covers every photo pixel (soft targets carry the uncertainty themselves). The KL is taken
    on ``kd_stride`` x ``kd_stride`` averages of both maps: the teacher's logits are stride 16
    to begin with, so full resolution adds cost (16x at stride 4) and no information, while
    the hard labels keep full resolution for the boundaries.
    """

    def __init__(
        self,
        confidence: float = 0.5,
        kd_weight: float = 0.0,
        temperature: float = 1.0,
        kd_stride: int = 4,
    ) -> None:
        if not 0 <= confidence < 1:
            raise ValueError(f"confidence must be in [0, 1), got {confidence}")
        if kd_weight < 0 or temperature <= 0 or kd_stride < 1:
            raise ValueError("kd_weight must be >= 0, temperature > 0 and kd_stride >= 1")
        self.confidence, self.kd_weight, self.temperature = confidence, kd_weight, temperature
        self.kd_stride = kd_stride

    def hard_labels(self, target: torch.Tensor) -> torch.Tensor:
        """The teacher's labels, ``VOID`` where it is unsure or where there is no photo."""
        valid = ~torch.isnan(target[:, 0])
        probs = torch.nan_to_num(target).float().softmax(1)
        confidence, labels = probs.max(1)
        return labels.masked_fill(~valid | (confidence < self.confidence), VOID)

    def soft_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """T^2 x KL(teacher || student) per pixel, averaged over the photo's pixels."""
        valid = (~torch.isnan(target[:, :1])).float()
        teacher = torch.nan_to_num(target).float()
        if self.kd_stride > 1:
            k = self.kd_stride
            # A pooled cell counts only if all of it is photo (ceil: no pixel is dropped).
            valid = F.avg_pool2d(valid, k, ceil_mode=True) > 0.999
            teacher = F.avg_pool2d(teacher, k, ceil_mode=True)
            logits = F.avg_pool2d(logits, k, ceil_mode=True)
        else:
            valid = valid > 0
        valid = valid[:, 0]
        if not valid.any():
            return logits.sum() * 0.0
        t = self.temperature
        teacher = (teacher / t).log_softmax(1)
        student = (logits / t).log_softmax(1)
        kl = (teacher.exp() * (teacher - student)).sum(1)
        return t * t * kl[valid].mean()

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        labels = self.hard_labels(target)
        if (labels != VOID).any():
            loss = F.cross_entropy(logits, labels, ignore_index=VOID)
        else:
            loss = logits.sum() * 0.0
        if self.kd_weight > 0:
            loss = loss + self.kd_weight * self.soft_loss(logits, target)
        return loss
