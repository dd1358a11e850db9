"""FCN-32s/16s/8s over the reference VGG16 or a light ImageNet backbone."""

from fcn_core.models.backbones import (
    BACKBONES,
    Backbone,
    HeadGeometry,
    build_backbone,
    efficientnet_lite0_imagenet,
)
from fcn_core.models.fcn import (
    ARCHITECTURES,
    FCN,
    CoarseScores,
    FCN8s,
    FCN16s,
    FCN32s,
    build_model,
    grouped_upsampling,
    list_models,
)
from fcn_core.models.init import bilinear_kernel, convolutionalise

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "FCN",
    "Backbone",
    "CoarseScores",
    "FCN8s",
    "FCN16s",
    "FCN32s",
    "HeadGeometry",
    "bilinear_kernel",
    "build_backbone",
    "build_model",
    "convolutionalise",
    "efficientnet_lite0_imagenet",
    "grouped_upsampling",
    "list_models",
]
