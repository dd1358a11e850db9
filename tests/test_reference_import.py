"""Importing the reference Caffe FCN weights (converted .pth, Caffe layer names)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcn_core.models import build_model
from fcn_core.preprocess import CAFFE_VGG16_BGR
from fcn_core.weights import WeightsError, import_reference_fcn, load_weights, save_weights


def caffe_named_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model("fcn8s", 21, "vgg16")
    for name, p in model.named_parameters():
        if name.startswith("score"):
            torch.nn.init.normal_(p, std=0.01)
    return {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}


def test_reference_weights_load_with_caffe_preprocessing(tmp_path: Path) -> None:
    source = caffe_named_state_dict()
    assert "conv1_1.weight" in source and "fc6.weight" in source  # Caffe names, no prefix
    torch.save(source, tmp_path / "fcn8s_from_caffe.pth")
    loaded = import_reference_fcn(tmp_path / "fcn8s_from_caffe.pth")
    assert loaded.meta.normalization == CAFFE_VGG16_BGR
    assert torch.equal(loaded.model.backbone.fc6.weight, source["fc6.weight"])
    assert torch.equal(loaded.model.score_pool3.weight, source["score_pool3.weight"])
    # BGR: the red channel of the input lands in the net's third input channel.
    image = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    image[:, 0] = 255
    x = loaded.meta.normalization(image)
    assert x[0, 2].min() == pytest.approx(255 - 122.67891434, abs=1e-3)
    assert x[0, 0].max() == pytest.approx(-104.00698793, abs=1e-3)
    # The served file keeps the Caffe preprocessing.
    save_weights(tmp_path / "ref.safetensors", loaded.model, loaded.meta)
    assert load_weights(tmp_path / "ref.safetensors").meta.normalization == CAFFE_VGG16_BGR


def test_reference_import_names_missing_layers(tmp_path: Path) -> None:
    source = caffe_named_state_dict()
    del source["score_pool4.weight"]
    torch.save(source, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"missing 1 tensors.*score_pool4\.weight"):
        import_reference_fcn(tmp_path / "broken.pth")
