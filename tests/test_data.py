"""Data sets in the layouts users have, the joint transforms, and the errors bad data raises.

The VOC and CamVid loaders run on the real files beside the repository (skipped with a
reason when absent); everything else writes its own small files into a tmp dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fcn_core.data import (
    SyntheticScenes,
    build_dataset,
    camvid,
    folder,
    pad_collate,
    train_transforms,
    voc,
)
from fcn_core.data.palettes import CAMVID_CLASSES, VOC_CLASSES, VOC_PALETTE
from fcn_core.data.transforms import (
    VOID,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC_TINY = SHARED / "voc-tiny"
CAMVID = SHARED / "camvid"


def need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


def raw_indices(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


# --- VOC ---------------------------------------------------------------------------------------


def test_voc_tiny_loads_seven_images_with_palette_indices() -> None:
    root = need(VOC_TINY)
    ds = voc(root, "val")
    assert len(ds) == 7 and ds.num_classes == 21 and ds.class_names == VOC_CLASSES
    ds.validate()
    seen: set[int] = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
        values = set(mask.unique().tolist())
        assert values <= set(range(21)) | {VOID}, ds.pairs[i][1]
        # P-mode PNGs are read as their palette indices, not converted colours.
        assert np.array_equal(mask.numpy(), raw_indices(ds.pairs[i][1]))
        seen |= values
    assert VOID in seen and len(seen - {0, VOID}) >= 5  # real objects, boundaries as void


def test_voc_accepts_the_devkit_parent_folder(tmp_path: Path) -> None:
    root = need(VOC_TINY)
    (tmp_path / "VOCdevkit").mkdir()
    (tmp_path / "VOCdevkit" / "VOC2012").symlink_to(root, target_is_directory=True)
    assert len(voc(tmp_path, "val")) == 7


def test_voc_missing_split_list_or_layout_is_named(tmp_path: Path) -> None:
    root = need(VOC_TINY)
    with pytest.raises(FileNotFoundError, match=r"split list not found: .*train\.txt"):
        voc(root, "train")
    with pytest.raises(FileNotFoundError, match=f"no VOC layout .* under {tmp_path}"):
        voc(tmp_path, "val")


# --- CamVid ------------------------------------------------------------------------------------


def test_camvid_maps_unlabelled_11_to_void() -> None:
    root = need(CAMVID)
    train, val = camvid(root, "train"), camvid(root, "val")
    assert (len(train), len(val)) == (367, 101)
    assert val.class_names == CAMVID_CLASSES and val.num_classes == 11
    for i in (0, 50):
        image, mask = val[i]
        assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
        raw = raw_indices(val.pairs[i][1])
        assert (raw == 11).any(), "sample chosen to contain unlabelled pixels"
        assert np.array_equal(mask.numpy() == VOID, raw == 11)
        assert np.array_equal(mask.numpy()[raw != 11], raw[raw != 11])
    val.validate()


def test_camvid_missing_root_split_or_masks_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"CamVid data root not found: {tmp_path / 'x'}"):
        camvid(tmp_path / "x", "train")
    with pytest.raises(FileNotFoundError, match="CamVid split 'test' not found"):
        camvid(tmp_path, "test")
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    with pytest.raises(ValueError, match="camvid/val: the split is empty"):
        camvid(tmp_path, "val")
    Image.new("RGB", (8, 6)).save(tmp_path / "val" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"1 masks missing, e\.g\. a\.png"):
        camvid(tmp_path, "val")


# --- folder layout and synthetic scenes --------------------------------------------------------


def test_synthetic_scenes_are_deterministic_per_seed_and_index() -> None:
    a, b, other = SyntheticScenes(4, seed=3), SyntheticScenes(4, seed=3), SyntheticScenes(4, seed=4)
    for i in range(4):
        (ia, ma), (ib, mb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
        assert ia.shape == (3, 96, 128) and ma.shape == (96, 128)
        assert len(ma.unique()) > 1 and int(ma.max()) < a.num_classes
    assert not torch.equal(a[0][1], other[0][1])
    assert not torch.equal(a[0][1], a[1][1])
    train = build_dataset("synthetic", None, "train")
    assert torch.equal(train[2][0], build_dataset("synthetic", None, "train")[2][0])
    with pytest.raises(IndexError):
        a[4]
    with pytest.raises(ValueError, match="at least 2 classes"):
        SyntheticScenes(num_classes=1)


def test_synthetic_split_seeds_are_the_same_in_every_process() -> None:
    code = (
        "from fcn_core.data import build_dataset; "
        "ds = build_dataset('synthetic', None, 'test'); print(ds.seed, int(ds[0][1].sum()))"
    )
    repo = Path(__file__).resolve().parents[1]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=repo,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1, outputs


def test_folder_layout_reads_what_synthetic_wrote(tmp_path: Path) -> None:
    scenes = SyntheticScenes(3, num_classes=5, seed=7)
    scenes.write_folder(tmp_path / "flat")
    scenes.write_folder(tmp_path / "split", "val")
    for ds in (
        folder(tmp_path / "flat", num_classes=5),
        folder(tmp_path / "split", "val", num_classes=5),
    ):
        assert len(ds) == 3 and ds.class_names[0] == "class_0" and ds.palette == VOC_PALETTE[:5]
        ds.validate()
        for i in range(3):
            image, mask = ds[i]
            expected_image, expected_mask = scenes[i]
            assert torch.equal(mask, expected_mask)  # lossless PNG, paired by stem
            with Image.open(ds.pairs[i][0]) as im:
                assert torch.equal(image, torch.from_numpy(np.array(im)).permute(2, 0, 1))
            # JPEG q95 keeps the scene: 8x8 block means agree within a few levels.
            blocks = F.avg_pool2d((image.float() - expected_image.float())[None], 8)
            assert blocks.abs().max() < 6


def test_folder_needs_classes_and_a_mask_per_image(tmp_path: Path) -> None:
    SyntheticScenes(2).write_folder(tmp_path)
    with pytest.raises(ValueError, match="give class_names or num_classes"):
        folder(tmp_path)
    (tmp_path / "masks" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for 00001\.jpg"):
        folder(tmp_path, num_classes=4)
    with pytest.raises(FileNotFoundError, match=f"data root not found: {tmp_path / 'nope'}"):
        folder(tmp_path / "nope", num_classes=4)


def write_pair(root: Path, stem: str, image_hw: tuple[int, int], mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", image_hw[::-1], (10, 20, 30)).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_mask_values_beyond_the_class_count_are_refused(tmp_path: Path) -> None:
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[0, :3] = [2, 7, 255]  # 7 is out of range for 3 classes; 255 is void and fine
    write_pair(tmp_path, "a", (6, 8), mask)
    ds = folder(tmp_path, num_classes=3)
    message = r"a\.png: mask values \[7\] exceed the 3 classes \(valid: 0\.\.2 and 255 = void\)"
    with pytest.raises(ValueError, match=message):
        ds[0]
    with pytest.raises(ValueError, match=message):
        ds.validate()
    assert folder(tmp_path, num_classes=8)[0][1][0, :3].tolist() == [2, 7, 255]


def test_image_and_mask_size_mismatch_is_refused(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", (10, 20), np.zeros((12, 20), dtype=np.uint8))
    ds = folder(tmp_path, num_classes=2)
    message = r"a\.png: image is 20x10 but its mask a\.png is 20x12"
    with pytest.raises(ValueError, match=message):
        ds[0]
    with pytest.raises(ValueError, match=message):
        ds.validate()


def test_colour_masks_are_refused(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", (4, 4), np.zeros((4, 4), dtype=np.uint8))
    Image.new("RGB", (4, 4)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match="mask mode RGB is not an index image"):
        folder(tmp_path, num_classes=2)[0]


def test_empty_split_and_unknown_data_set_are_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="folder/all: the split is empty"):
        folder(tmp_path, num_classes=2)
    with pytest.raises(ValueError, match="unknown data set 'coco'"):
        build_dataset("coco", tmp_path, "train")
    with pytest.raises(ValueError, match="--data-root is required for the camvid data set"):
        build_dataset("camvid", None, "train")


# --- joint transforms --------------------------------------------------------------------------

COLOURS = torch.tensor(VOC_PALETTE[1:17], dtype=torch.uint8)  # 16 distinct colours, none black


def colour_coded(h: int = 48, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4 grid of cells, each its own class painted in that class's colour, so that any
    misalignment between image and mask (a flip, crop or scale applied to one only) shows."""
    rows = torch.arange(h)[:, None] * 4 // h
    cols = torch.arange(w)[None, :] * 4 // w
    mask = rows * 4 + cols
    mask[:5, :7] = VOID  # a void corner, which must travel with the image too
    image = COLOURS[mask.clamp(max=15)].permute(2, 0, 1).contiguous()
    image[:, mask == VOID] = 255
    return image, mask


def decode(image: torch.Tensor) -> torch.Tensor:
    """The class whose colour is nearest each pixel."""
    dist = (image.permute(1, 2, 0)[..., None, :].float() - COLOURS.float()).square().sum(-1)
    return dist.argmin(-1)


def assert_aligned(image: torch.Tensor, mask: torch.Tensor, exact: bool) -> None:
    padded = image.sum(0) == 0  # no class colour is black: only padding is
    assert (mask[padded] == VOID).all()
    labelled = (mask != VOID) & ~padded
    if not exact:  # resampled: class boundaries may blend, cell interiors may not
        m = mask.float()[None, None]
        labelled &= (F.max_pool2d(m, 3, 1, 1) == -F.max_pool2d(-m, 3, 1, 1))[0, 0]
    assert labelled.sum() > 0.5 * (mask != VOID).sum() > 0
    assert torch.equal(decode(image)[labelled], mask[labelled])


def test_flip_moves_image_and_mask_together() -> None:
    image, mask = colour_coded()
    out_image, out_mask = RandomHorizontalFlip(p=1.0)(image, mask)
    assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out_image, image.flip(-1))
    assert_aligned(out_image, out_mask, exact=True)
    assert RandomHorizontalFlip(p=0.0)(image, mask)[1] is mask


def test_crop_cuts_the_same_window_and_pads_with_void() -> None:
    image, mask = colour_coded()
    torch.manual_seed(1)
    lefts = set()
    for _ in range(10):
        out_image, out_mask = RandomCrop(20, 30)(image, mask)
        assert out_mask.shape == (20, 30) and out_image.shape == (3, 20, 30)
        assert_aligned(out_image, out_mask, exact=True)
        lefts.add(tuple(out_mask[10].tolist()))
    assert len(lefts) > 1  # the window really moves
    big_image, big_mask = RandomCrop(60, 80)(image, mask)  # larger than the image: pad
    assert big_mask.shape == (60, 80)
    assert torch.equal(big_mask[48:], torch.full((12, 80), VOID))
    assert torch.equal(big_mask[:, 64:], torch.full((60, 16), VOID))
    assert not big_image[:, 48:].any() and not big_image[:, :, 64:].any()
    assert torch.equal(big_mask[:48, :64], mask) and torch.equal(big_image[:, :48, :64], image)


def test_scale_resizes_masks_by_nearest_and_images_by_bilinear() -> None:
    image, mask = colour_coded()
    out_image, out_mask = RandomScale(2.0, 2.0)(image, mask)
    assert out_image.dtype == torch.uint8 and out_mask.dtype == mask.dtype
    assert torch.equal(out_mask, mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert set(out_mask.unique().tolist()) == set(mask.unique().tolist())  # no new labels
    assert_aligned(out_image, out_mask, exact=False)
    with pytest.raises(ValueError, match="need 0 < min_scale <= max_scale"):
        RandomScale(2.0, 1.0)


@pytest.mark.parametrize("seed", range(12))
def test_training_transforms_keep_image_and_mask_aligned(seed: int) -> None:
    image, mask = colour_coded()
    transform = train_transforms(crop=(40, 56), scale=(0.5, 2.0), flip=True)
    torch.manual_seed(seed)
    out_image, out_mask = transform(image, mask)
    torch.manual_seed(seed)
    again_image, again_mask = transform(image, mask)
    assert torch.equal(out_image, again_image) and torch.equal(out_mask, again_mask)
    assert out_image.shape == (3, 40, 56) and out_mask.shape == (40, 56)
    assert_aligned(out_image, out_mask, exact=False)


def test_pad_collate_pads_images_with_zero_and_masks_with_void() -> None:
    small = (torch.full((3, 5, 7), 9, dtype=torch.uint8), torch.ones(5, 7, dtype=torch.int64))
    large = (torch.full((3, 9, 4), 8, dtype=torch.uint8), torch.full((9, 4), 2))
    images, masks = pad_collate([small, large])
    assert images.shape == (2, 3, 9, 7) and masks.shape == (2, 9, 7)
    assert torch.equal(images[0, :, :5, :7], small[0]) and torch.equal(masks[1, :, :4], large[1])
    assert not images[0, :, 5:].any() and not images[1, :, :, 4:].any()
    assert (masks[0, 5:] == VOID).all() and (masks[1, :, 4:] == VOID).all()
    images, masks = pad_collate([small, large], multiple=32)
    assert images.shape == (2, 3, 32, 32) and (masks[:, 9:] == VOID).all()
    assert int((masks != VOID).sum()) == 5 * 7 + 9 * 4
