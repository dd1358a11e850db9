"""The paper's four metrics (section 5) against hand-computed cases and their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fcn_core.metrics import confusion_matrix, scores


def t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values)


def test_hand_computed_three_classes_with_an_ignored_pixel() -> None:
    # gt:   0 0 1 1 2 255      -> the void pixel's prediction (2) must not count
    # pred: 0 1 1 1 0 2
    hist = confusion_matrix(t([0, 1, 1, 1, 0, 2]), t([0, 0, 1, 1, 2, 255]), 3)
    assert hist.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = scores(hist)
    assert s["pixel_acc"] == pytest.approx(3 / 5)  # sum n_ii / sum t_i
    assert s["mean_acc"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)
    # IU_i = n_ii / (t_i + sum_j n_ji - n_ii)
    assert s["iu"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s["mean_iu"] == pytest.approx(1 / 3)
    # fw IU = (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
    assert s["fw_iu"] == pytest.approx((2 * (1 / 3) + 2 * (2 / 3) + 1 * 0.0) / 5)


def test_absent_classes_are_nan_and_left_out_of_the_means() -> None:
    # Class 2 is predicted but never in the ground truth: accuracy undefined, IU 0.
    # Class 3 appears only as a prediction on a void pixel: absent, IU NaN.
    hist = confusion_matrix(t([0, 2, 1, 1, 3]), t([0, 0, 1, 1, 255]), 4)
    assert hist.tolist() == [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    s = scores(hist)
    assert s["pixel_acc"] == pytest.approx(3 / 4)
    assert s["mean_acc"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["iu"][:3] == pytest.approx([1 / 2, 1.0, 0.0])
    assert math.isnan(s["iu"][3])
    assert s["mean_iu"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # Over the classes the ground truth shows, the predicted-only class 2 does not count.
    assert s["mean_iu_present"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["fw_iu"] == pytest.approx((2 * 0.5 + 2 * 1.0) / 4)


def test_custom_ignore_index_and_out_of_range_targets_are_not_counted() -> None:
    hist = confusion_matrix(t([0, 1, 1, 0]), t([0, 1, 9, -1]), 2, ignore_index=9)
    assert hist.tolist() == [[1, 0], [0, 1]]
    hist = confusion_matrix(t([0, 1, 1]), t([0, 1, 255]), 2, ignore_index=0)
    assert hist.tolist() == [[0, 0], [0, 1]]


def test_empty_confusion_gives_nan_not_an_exception() -> None:
    s = scores(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(s[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"))


def test_confusion_is_int64_on_the_inputs_device_for_any_integer_dtype() -> None:
    target = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)
    for dtype in (torch.uint8, torch.int32, torch.int64):
        pred = torch.tensor([[0, 2], [2, 1]], dtype=dtype)
        hist = confusion_matrix(pred, target, 3)
        assert hist.dtype == torch.int64 and hist.device == pred.device
        assert hist.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert scores(hist.numpy())["pixel_acc"] == pytest.approx(2 / 3)  # numpy input too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_confusion_runs_on_cuda() -> None:
    pred, target = torch.randint(0, 4, (2, 9, 9)), torch.randint(0, 4, (2, 9, 9))
    hist = confusion_matrix(pred.cuda(), target.cuda(), 4)
    assert hist.is_cuda
    assert torch.equal(hist.cpu(), confusion_matrix(pred, target, 4))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"pred \(2, 3\) and target \(3, 2\) differ in shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)


@pytest.mark.parametrize("bad", [4, -1])
def test_out_of_range_predictions_raise_instead_of_being_clamped(bad: int) -> None:
    target = torch.tensor([0, 1, 2, 255])
    with pytest.raises(ValueError, match=r"predictions must lie in 0\.\.3"):
        confusion_matrix(torch.tensor([0, bad, 2, 0]), target, 4)
    # a wild prediction on a void pixel is not counted, so it is no error
    assert confusion_matrix(torch.tensor([0, 1, 2, bad]), target, 4).trace() == 3


def test_batches_sum_to_the_confusion_of_the_whole() -> None:
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 5, (2, 7, 11), generator=gen) for _ in range(3)]
    targets = [torch.randint(0, 6, (2, 7, 11), generator=gen) for _ in range(3)]
    targets = [torch.where(x == 5, 255, x) for x in targets]
    whole = confusion_matrix(torch.cat(preds), torch.cat(targets), 5)
    summed = sum(confusion_matrix(p, g, 5) for p, g in zip(preds, targets, strict=True))
    assert torch.equal(whole, summed)
    assert whole.sum() == sum(int((g != 255).sum()) for g in targets)


# --- properties --------------------------------------------------------------------------------

NUM_CLASSES = st.integers(min_value=2, max_value=6)


@st.composite
def labelled(draw) -> tuple[np.ndarray, np.ndarray, int]:
    """(pred, target, num_classes): target may hold void pixels, and has at least one real."""
    n = draw(NUM_CLASSES)
    size = draw(st.integers(min_value=1, max_value=60))
    target = draw(arrays(np.int64, size, elements=st.sampled_from([*range(n), 255])))
    pred = draw(arrays(np.int64, size, elements=st.integers(0, n - 1)))
    target[draw(st.integers(0, size - 1))] = draw(st.integers(0, n - 1))
    return pred, target, n


@given(labelled())
@settings(max_examples=60, deadline=None)
def test_perfect_prediction_scores_one(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    _, target, n = case
    pred = np.where(target == 255, 0, target)
    s = scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n))
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert s[key] == pytest.approx(1.0), key
    present = set(target[target != 255].tolist())
    assert [not math.isnan(v) for v in s["iu"]] == [c in present for c in range(n)]


@given(labelled())
@settings(max_examples=100, deadline=None)
def test_metrics_lie_in_unit_interval_and_pixel_acc_is_trace_over_total(
    case: tuple[np.ndarray, np.ndarray, int],
) -> None:
    pred, target, n = case
    hist = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n)
    assert hist.sum() == (target != 255).sum()
    s = scores(hist)
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["pixel_acc"] == pytest.approx(float(hist.trace()) / float(hist.sum()))
    valid = [v for v in s["iu"] if not math.isnan(v)]
    assert s["mean_iu"] == pytest.approx(sum(valid) / len(valid))


@given(labelled(), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_relabelling_classes_leaves_the_scores_unchanged(
    case: tuple[np.ndarray, np.ndarray, int], rnd
) -> None:
    pred, target, n = case
    perm = list(range(n))
    rnd.shuffle(perm)
    lut = np.array([*perm, *[0] * (255 - n), 255])  # void stays void
    before = scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n))
    after = scores(confusion_matrix(torch.from_numpy(lut[pred]), torch.from_numpy(lut[target]), n))
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert after[key] == pytest.approx(before[key]), key
    for c in range(n):  # per-class IU moves with its class
        b, a = before["iu"][c], after["iu"][perm[c]]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)
