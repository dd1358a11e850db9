"""Weight initialisations from the paper: bilinear deconvolutions, convolutionalised
classifiers, and the staged 32s -> 16s -> 8s hand-over."""

from __future__ import annotations

import torch
from torch import nn


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """ConvTranspose2d weight that performs per-channel bilinear interpolation.

    Channel i maps to channel i only (the reference nets' "diagonal" surgery), so a frozen
    deconvolution is exactly a fixed upsampling and adds no mixing between classes.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt_1d = 1 - (og - center).abs() / factor
    filt = (filt_1d[:, None] * filt_1d[None, :]).float()
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    idx = torch.arange(min(in_channels, out_channels))
    weight[idx, idx] = filt
    return weight


def bilinear_deconv(
    channels: int, factor: int, padding: int = 0, learnable: bool = False
) -> nn.ConvTranspose2d:
    """A bias-free 2*factor kernel, stride-factor transposed conv initialised to bilinear."""
    deconv = nn.ConvTranspose2d(
        channels, channels, kernel_size=2 * factor, stride=factor, padding=padding, bias=False
    )
    with torch.no_grad():
        deconv.weight.copy_(bilinear_kernel(channels, channels, 2 * factor))
    deconv.weight.requires_grad_(learnable)
    return deconv


def convolutionalise(linear: nn.Linear, conv: nn.Conv2d) -> None:
    """Copy a fully connected layer into the equivalent convolution (fc6 -> 7x7, fc7 -> 1x1).

    A Linear over a flattened C x k x k map is a k x k convolution with the same numbers
    reshaped; this is what makes the classifier "fully convolutional".
    """
    expected = conv.weight.numel()
    if linear.weight.numel() != expected:
        raise ValueError(
            f"cannot reshape {tuple(linear.weight.shape)} into conv weight {tuple(conv.weight.shape)}"
        )
    with torch.no_grad():
        conv.weight.copy_(linear.weight.view_as(conv.weight))
        conv.bias.copy_(linear.bias)


def zero_(module: nn.Conv2d) -> nn.Conv2d:
    """Zero a score layer: a new skip starts by contributing nothing, so the net it was
    grafted onto predicts exactly as before (the paper's staged training)."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module
