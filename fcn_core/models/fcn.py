"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer, Darrell, CVPR 2015).

Layer names follow the reference Caffe nets (``score_fr``, ``score_pool4``, ``upscore2``...),
so a trained FCN-32s hands its weights to FCN-16s by name, and FCN-16s to FCN-8s.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.models.backbones import BACKBONES, Backbone, build_backbone
from fcn_core.models.init import bilinear_deconv, zero_

FINAL_UPSCORE = {32: "upscore", 16: "upscore16", 8: "upscore8"}


def crop_like(x: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    h, w = like.shape[-2:]
    return x[..., offset : offset + h, offset : offset + w]


class FCN(nn.Module):
    """The skip head over a backbone; subclasses fix the output stride (32, 16 or 8).

    ``learnable_upsampling`` unfreezes the bilinear deconvolutions (frozen in the paper);
    ``at_once`` is the FCN-8s-at-once variant, which scales pool4 by 0.01 and pool3 by 1e-4
    so that all skips can be trained together from the start.
    """

    stride: ClassVar[int]

    @property
    def arch(self) -> str:
        """The architecture's name as the weights file and ``build_model`` know it."""
        return f"fcn{self.stride}s"

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "vgg16",
        *,
        pretrained: bool = False,
        learnable_upsampling: bool = False,
        at_once: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.at_once = at_once
        self.backbone: Backbone = build_backbone(backbone, pretrained)  # type: ignore[assignment]
        geo = self.backbone.geometry
        self.geometry = geo
        c3, c4, c_top = self.backbone.channels

        def up(factor: int) -> nn.ConvTranspose2d:
            pad = factor // 2 if geo.deconv_padding else 0
            return bilinear_deconv(num_classes, factor, pad, learnable_upsampling)

        self.score_fr = zero_(nn.Conv2d(c_top, num_classes, 1))
        if self.stride <= 16:
            self.upscore2 = up(2)
            self.score_pool4 = zero_(nn.Conv2d(c4, num_classes, 1))
        if self.stride == 8:
            self.upscore_pool4 = up(2)
            self.score_pool3 = zero_(nn.Conv2d(c3, num_classes, 1))
        self.add_module(FINAL_UPSCORE[self.stride], up(self.stride))

    @property
    def final_upsampling(self) -> nn.ConvTranspose2d:
        """The last layer: the stride-``stride`` scores up to the input's resolution."""
        return getattr(self, FINAL_UPSCORE[self.stride])

    @property
    def final_offset(self) -> int:
        """Where the output's first row and column sit in the final upsampling's output."""
        return self.geometry.final_offset[self.stride]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        score = self.final_upsampling(self.coarse_scores(x))
        offset = self.final_offset
        return score[..., offset : offset + h, offset : offset + w]

    def coarse_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The fused class scores at the output stride, before the final upsampling."""
        h, w = x.shape[-2:]
        geo = self.geometry
        if geo.pad_to > 1:
            x = F.pad(x, (0, -w % geo.pad_to, 0, -h % geo.pad_to))
        pool3, pool4, top = self.backbone(x)
        score = self.score_fr(top)
        if self.stride <= 16:
            score = self.upscore2(score)
            if self.at_once:
                pool4 = pool4 * 0.01
            score = score + crop_like(self.score_pool4(pool4), geo.pool4_offset, score)
        if self.stride == 8:
            score = self.upscore_pool4(score)
            if self.at_once:
                pool3 = pool3 * 0.0001
            score = score + crop_like(self.score_pool3(pool3), geo.pool3_offset, score)
        return score

    @classmethod
    def from_coarser(cls, coarser: FCN, **kwargs) -> FCN:
        """Staged initialisation: copy every layer shared with a trained coarser net
        (FCN-32s -> 16s, 16s -> 8s); the new skip's score layer stays zero, so the new net
        starts out predicting exactly what the coarser one did."""
        if coarser.stride <= cls.stride:
            raise ValueError(
                f"initialise FCN-{cls.stride}s from a coarser net, not FCN-{coarser.stride}s"
            )
        kwargs.setdefault("at_once", coarser.at_once)
        model = cls(coarser.num_classes, coarser.backbone_name, **kwargs)
        own = model.state_dict()
        shared = {
            k: v for k, v in coarser.state_dict().items() if k in own and own[k].shape == v.shape
        }
        model.load_state_dict(shared, strict=False)
        return model


class FCN32s(FCN):
    stride = 32


class FCN16s(FCN):
    stride = 16

    @classmethod
    def from_fcn32s(cls, fcn32s: FCN32s, **kwargs) -> FCN16s:
        return cls.from_coarser(fcn32s, **kwargs)


class FCN8s(FCN):
    stride = 8

    @classmethod
    def from_fcn16s(cls, fcn16s: FCN16s, **kwargs) -> FCN8s:
        return cls.from_coarser(fcn16s, **kwargs)


ARCHITECTURES: dict[str, type[FCN]] = {"fcn32s": FCN32s, "fcn16s": FCN16s, "fcn8s": FCN8s}


def build_model(
    arch: str = "fcn8s", num_classes: int = 21, backbone: str = "vgg16", **kwargs
) -> FCN:
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}"
        ) from None
    return cls(num_classes, backbone, **kwargs)


def list_models() -> list[str]:
    """Every architecture x backbone ``build_model`` makes, as ``arch/backbone`` names."""
    return [f"{arch}/{backbone}" for arch in ARCHITECTURES for backbone in BACKBONES]


class CoarseScores(nn.Module):
    """An FCN without its final upsampling: a normalised batch -> :meth:`FCN.coarse_scores`.
    What the CPU serves (``fcn_core.final_upsampling`` finishes the labels); shares the FCN's
    parameters."""

    def __init__(self, fcn: FCN) -> None:
        super().__init__()
        self.fcn = fcn
        self.train(fcn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fcn.coarse_scores(x)


def grouped_upsampling(model: nn.Module) -> nn.Module:
    """The model to serve: an FCN whose frozen bilinear deconvolutions run one filter per class.

    The paper's upsampling layers map class i to class i alone (``bilinear_kernel``), so as
    C -> C transposed convolutions they spend C times their arithmetic on zero weights. This
    returns a copy of the top module whose deconvolutions with exactly diagonal weights are
    the grouped (``groups=C``) transposed convolutions of the same kernels: the same sums with
    the zero terms left out, for ~25 % less time per image on ONNX Runtime and PyTorch on the
    CPU (11 classes, 480x360). The terms are added in another order, so scores agree to float
    rounding and a near-tie can flip (1 pixel of 157,696 on a demo photo with the untrained
    test model; none of 691,200 on real photos with the shipped weights). Everything else,
    the backbone included, is shared with ``model``, which is left as it is: training and the
    weights file keep the dense layers the reference nets have. Learned (non-diagonal)
    deconvolutions and models that are not FCNs come back as they are.
    """
    if not isinstance(model, FCN):
        return model
    grouped = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ConvTranspose2d):
            kernels = _diagonal_kernels(child)
            if kernels is not None:
                grouped[name] = _grouped(child, kernels)
    if not grouped:
        return model
    served = copy.copy(model)  # shares every parameter; only the children's table is new
    served._modules = {**model._modules, **grouped}
    return served


def _diagonal_kernels(deconv: nn.ConvTranspose2d) -> torch.Tensor | None:
    """The C x 1 x k x k kernels of a C -> C deconvolution that maps each channel to itself
    alone (every non-zero weight on the diagonal), else None."""
    w = deconv.weight.detach()
    if deconv.groups != 1 or w.shape[0] != w.shape[1] or deconv.bias is not None:
        return None
    idx = torch.arange(w.shape[0], device=w.device)
    diagonal = w[idx, idx]
    if torch.count_nonzero(w) != torch.count_nonzero(diagonal):
        return None
    return diagonal.unsqueeze(1)


def _grouped(deconv: nn.ConvTranspose2d, kernels: torch.Tensor) -> nn.ConvTranspose2d:
    c = deconv.in_channels
    grouped = nn.ConvTranspose2d(
        c,
        c,
        deconv.kernel_size,  # type: ignore[arg-type]
        stride=deconv.stride,  # type: ignore[arg-type]
        padding=deconv.padding,  # type: ignore[arg-type]
        output_padding=deconv.output_padding,  # type: ignore[arg-type]
        groups=c,
        bias=False,
        dilation=deconv.dilation,  # type: ignore[arg-type]
        device=kernels.device,
        dtype=kernels.dtype,
    )
    with torch.no_grad():
        grouped.weight.copy_(kernels)
    return grouped.requires_grad_(False).train(deconv.training)
