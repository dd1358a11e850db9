"""Labels from an FCN's coarse scores equal the full upsampling's argmax, for both geometries
(Lite0's padded deconvolutions, the reference VGG16's offset crops) and every stride; the CPU
serves the coarse network, and only where the shortcut is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.final_upsampling import FinalUpsampling, served_network
from fcn_core.inference import InferenceConfig, Segmenter
from fcn_core.models import CoarseScores, build_model
from fcn_core.shipped import CAMVID_WEIGHTS_NAME, DEFAULT_WEIGHTS_NAME, default_weights_dir
from fcn_core.weights import load_weights
from tests.conftest import DEMO_PHOTOS

ARCHS = ("fcn32s", "fcn16s", "fcn8s")


def blocky_scores(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Coarse scores with regions (as a photo's): random blocks plus a little noise, so that
    most cells have one label around them and some lie on a boundary."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n, c, (h + 2) // 3, (w + 2) // 3, generator=gen) * 4
    regions = F.interpolate(blocks, scale_factor=3, mode="nearest")[..., :h, :w]
    return regions + 0.3 * torch.randn(n, c, h, w, generator=gen)


def full_upsampling(model: nn.Module, scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The FCN's own last layer and crop, as its forward applies them."""
    o, (h, w) = model.final_offset, size
    with torch.no_grad():
        return model.final_upsampling(scores)[..., o : o + h, o : o + w]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2", "vgg16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_labels_equal_the_full_upsamplings_first_maximum(arch: str, backbone: str) -> None:
    model = build_model(arch, 6, backbone).eval()
    final = FinalUpsampling.of(model)
    assert final is not None and final.stride == model.stride
    scores = blocky_scores(2, 6, 9, 13)
    most = full_upsampling(model, scores, (10_000, 10_000)).shape[-2:]
    for size in [tuple(most), (most[0] - 5, most[1] - 11), (17, 23)]:
        logits = full_upsampling(model, scores, size)
        labels = final.labels(scores, size)
        assert labels.dtype == torch.uint8 and labels.shape == (2, *size)
        assert torch.equal(labels, logits.max(1).indices.to(torch.uint8)), size
        torch.testing.assert_close(final.logits(scores, size), logits, rtol=0, atol=1e-5)


def test_ties_go_to_the_first_class_as_argmax() -> None:
    final = FinalUpsampling.of(build_model("fcn8s", 5, "efficientnet_lite0"))
    assert final is not None
    flat = torch.zeros(1, 5, 4, 6)  # an untrained FCN: every class scores 0 everywhere
    assert torch.equal(final.labels(flat, (32, 48)), torch.zeros(1, 32, 48, dtype=torch.uint8))
    tied = flat.clone()
    tied[:, 1] = tied[:, 3] = 2.0  # classes 1 and 3 lead together: 1 wins, as in argmax
    assert bool((final.labels(tied, (32, 48)) == 1).all())


def test_only_a_frozen_bilinear_final_layer_is_finished_from_coarse_scores() -> None:
    learned = build_model("fcn8s", 4, "efficientnet_lite0", learnable_upsampling=True)
    assert FinalUpsampling.of(learned) is not None  # still the bilinear kernel
    with torch.no_grad():
        learned.upscore8.weight[0, 0, 0, 0] = -0.1  # a learnt kernel with a negative weight
    assert FinalUpsampling.of(learned) is None
    assert not isinstance(served_network(learned, coarse=True)[0], CoarseScores)
    other = nn.Sequential(nn.Conv2d(3, 4, 1))
    assert FinalUpsampling.of(other) is None and served_network(other, coarse=True)[0] is other

    frozen = build_model("fcn8s", 4, "efficientnet_lite0").eval()
    served, _ = served_network(frozen, coarse=True)
    assert isinstance(served, CoarseScores) and served.fcn.upscore2.groups == 4
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(served(x), frozen.coarse_scores(x))


@pytest.mark.parametrize("name", [DEFAULT_WEIGHTS_NAME, CAMVID_WEIGHTS_NAME])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_the_cpu_serves_the_coarse_network_with_the_labels_of_the_full_one(
    backend: str, name: str, tmp_path
) -> None:
    """Both shipped models (the VOC default over MobileNetV2, CamVid over Lite0), as the
    CPU serves them, against their full PyTorch network."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    weights = default_weights_dir() / name
    loaded = load_weights(weights)
    config = InferenceConfig(device="cpu", backend=backend, cache_dir=str(tmp_path))
    segmenter = Segmenter.from_weights(weights, config)
    predictor = segmenter.predictor
    assert predictor.final is not None and isinstance(predictor.model, CoarseScores)

    from PIL import Image

    photos = [
        np.array(Image.open(DEMO_PHOTOS / n).convert("RGB")) for n in ("dog.jpg", "eagle.jpg")
    ]
    photos.append(photos[0][:97, :131].copy())
    model = loaded.model.eval()
    for photo, labels in zip(photos, segmenter.segment(photos), strict=True):
        x = loaded.meta.normalization(torch.from_numpy(photo).permute(2, 0, 1)[None])
        with torch.inference_mode():
            expected = model(x).max(1).indices[0].numpy()
        assert labels.shape == photo.shape[:2]
        assert (labels == expected).mean() >= 0.99999
        scores = segmenter.predict_batch([photo], scores=True)[0]
        assert scores.shape == (loaded.meta.num_classes, *photo.shape[:2])
