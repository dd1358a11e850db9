"""Normalisation: the formula the weights file states, in the layout asked for, inputs intact."""

from __future__ import annotations

import pytest
import torch

from fcn_core.preprocess import Normalization


@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize(
    "layout", [torch.preserve_format, torch.contiguous_format, torch.channels_last]
)
def test_normalisation_is_the_stated_formula_in_the_layout_asked_for(
    order: str, layout: torch.memory_format
) -> None:
    norm = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), order)
    hwc = torch.randint(0, 256, (2, 37, 53, 3), dtype=torch.uint8, generator=torch.Generator())
    images = hwc.permute(0, 3, 1, 2)  # how the inference core hands a batch over: a view
    rgb = images.float().flip(-3) if order == "BGR" else images.float()
    expected = (rgb / 255 - torch.tensor(norm.mean).view(3, 1, 1)) / torch.tensor(norm.std).view(
        3, 1, 1
    )

    got = norm(images, memory_format=layout)

    assert got.dtype == torch.float32 and torch.equal(got, expected)  # bit for bit
    if layout is torch.contiguous_format:
        assert got.is_contiguous()
    else:  # channels-last asked for, or kept from the permuted view
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_normalisation_leaves_a_float_input_as_it_was() -> None:
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.rand(1, 3, 8, 8) * 255
    before = images.clone()
    got = norm(images)
    assert torch.equal(images, before)
    assert torch.allclose(got, (before / 255 - 0.5) / 0.25)
