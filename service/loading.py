"""Where the served model comes from: the weights file, or a near-free stand-in.

The stand-in (``FCN_TRIVIAL_MODEL=true``) keeps every stage of a request except the network,
so a benchmark against it measures the ceiling that HTTP, decoding, batching and encoding
put on throughput. Any other module can be served with ``create_app(settings, model, meta)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fcn_core.data.palettes import CAMVID_CLASSES, CAMVID_PALETTE
from fcn_core.preprocess import HALF_RGB
from fcn_core.weights import LoadedWeights, WeightsMetadata, load_weights
from service.settings import Settings


class TrivialSegmenter(nn.Module):
    """A fixed 1x1 convolution: per-pixel logits from the colour alone, almost free."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(3, num_classes, 1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(num_classes, 3, 1, 1, generator=generator))
            self.score.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)


def trivial_model() -> LoadedWeights:
    meta = WeightsMetadata(
        arch="trivial",
        backbone="none",
        class_names=list(CAMVID_CLASSES),
        palette=[list(c) for c in CAMVID_PALETTE],
        normalization=HALF_RGB,
        dataset="none: a fixed 1x1 convolution for measuring the service's own overhead",
        sha256="trivial",
    )
    return LoadedWeights(TrivialSegmenter(meta.num_classes).eval(), meta)


def load_served_model(settings: Settings) -> LoadedWeights:
    """The model ``--local`` runs (the default weights file, or the stand-in) on the CPU; the
    runner moves it to its device. Raises ``WeightsError``."""
    if settings.trivial_model:
        return trivial_model()
    return load_model_file(settings.resolved_weights())


def load_model_file(path: Path) -> LoadedWeights:
    """A weights file's model on the CPU. Raises ``WeightsError`` (or ``FileNotFoundError``)
    with what is wrong, so that a failed load can say why."""
    return load_weights(path, device="cpu")
