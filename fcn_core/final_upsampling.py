"""Labels straight from an FCN's coarse scores: the final upsampling only where it can matter.

An FCN's last layer is a frozen bilinear deconvolution (kernel 2f, stride f): every output
pixel is a weighted sum of the 2 x 2 coarse scores around it, with weights that are the same
for every class and all positive. So where those four coarse pixels share their first
maximum, every output pixel between them has that label too: for a class ``c`` ranked below
the shared label ``L``, each of the four has ``s[L] > s[c]`` (or ``>=`` with ``L`` first),
and a positive weighted sum keeps it. On a photo most f x f cells of the output are like that
(85 % on CamVid's street scenes, 65-92 % on the demo photos); only the cells on a class
boundary need their scores upsampled and an argmax taken.

This is what the CPU runs instead of upsampling 11 or 21 score maps to full resolution and
taking the argmax over them (one thread, 480x360 padded to 384, ONNX Runtime, a 2-core EPYC on 2026-12-03: 52 -> 41 ms
an image with the argmax; labels equal on every pixel of the CamVid and demo photos). A cell is taken whole
only if each of its coarse pixels leads by a margin (``REL_TOL`` of the image's largest
score), far above the float rounding of the sums, so the shortcut agrees with the full
computation to the same rounding as the full computation with itself. GPUs keep the full
upsampling: there it is cheap, and this path's data-dependent indexing would wait on the
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.models import FCN, CoarseScores, grouped_upsampling

REL_TOL = 1e-4
"""A coarse pixel decides its cell only when its first maximum leads the runner-up by this
fraction of the image's largest absolute score (float32 rounding of the 4-term sums is
~1e-7 of it)."""


@dataclass(frozen=True, eq=False)
class FinalUpsampling:
    """An FCN's final bilinear deconvolution, applied to its coarse scores.

    ``kernels``: C x 2f x 2f, one per class; ``stride``: f; ``padding``: the deconvolution's;
    ``offset``: where the FCN's output starts in the deconvolution's output.
    """

    kernels: torch.Tensor
    stride: int
    padding: int
    offset: int

    @classmethod
    def of(cls, model: nn.Module) -> FinalUpsampling | None:
        """The final upsampling of an FCN, if the shortcut is exact for it: a diagonal
        deconvolution of kernel 2 x stride whose kernel is one positive one for every class
        (the paper's frozen bilinear layer). None for anything else (a learnt upsampling,
        a module that is not an FCN)."""
        if not isinstance(model, FCN):
            return None
        # Grouped as served (a no-op on a served model): the kernels are then C x 1 x k x k.
        deconv = grouped_upsampling(model).final_upsampling
        f, k = deconv.stride, deconv.kernel_size
        if (
            deconv.groups != deconv.in_channels
            or f[0] != f[1]
            or k != (2 * f[0], 2 * f[0])
            or deconv.padding[0] != deconv.padding[1]
            or deconv.dilation != (1, 1)
            or deconv.output_padding != (0, 0)
        ):
            return None
        kernels = deconv.weight.detach()[:, 0]
        if not bool((kernels > 0).all()) or not bool((kernels == kernels[:1]).all()):
            return None
        return cls(kernels.float().cpu(), f[0], int(deconv.padding[0]), model.final_offset)

    def logits(self, scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """N x C x h x w coarse scores -> N x C x H x W logits: exactly the FCN's last layer
        (grouped, as served) and crop."""
        c = scores.shape[1]
        kernels = self.kernels.to(scores.device, scores.dtype)[:, None]
        up = F.conv_transpose2d(scores, kernels, stride=self.stride, padding=self.padding, groups=c)
        (h, w), o = size, self.offset
        return up[..., o : o + h, o : o + w]

    def labels(self, scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """N x C x h x w coarse scores -> N x H x W uint8 labels, the first maximum on ties
        (as ``logits(...).max(1).indices``)."""
        scores = scores.float()
        n, _, h, w = scores.shape
        f = self.stride
        # Cell (a, b) of the output lies between coarse pixels a-1..a and b-1..b; the
        # deconvolution's padding and the crop put output row y in cell (y + start) // f.
        first = scores.max(1).indices
        top2 = scores.topk(2, dim=1).values if scores.shape[1] > 1 else None
        leads = (
            torch.ones_like(first, dtype=torch.bool)
            if top2 is None
            else top2[:, 0] - top2[:, 1]
            >= REL_TOL * scores.abs().amax(dim=(1, 2, 3))[:, None, None]
        )
        # Past the edges there is no coarse pixel: it neither agrees nor disagrees.
        highest = _pool_max(first.float(), pad=-1.0)
        lowest = -_pool_max(-first.float(), pad=-float(1 << 16))
        decided = -_pool_max(-leads.float(), pad=-1.0) > 0.5
        whole = (highest == lowest) & decided
        cells = highest.to(torch.uint8)[..., None, None].expand(n, h + 1, w + 1, f, f).clone()
        i, a, b = (~whole).nonzero(as_tuple=True)
        if i.numel():
            cells[i, a, b] = self._cell_labels(scores, i, a, b)
        start = self.padding + self.offset
        full = cells.permute(0, 1, 3, 2, 4).reshape(n, (h + 1) * f, (w + 1) * f)
        (oh, ow) = size
        return full[:, start : start + oh, start : start + ow]

    @cached_property
    def _taps(self) -> torch.Tensor:
        """C x 2 x 2 x f x f: corner (u, v) of a cell is coarse pixel (a - 1 + u, b - 1 + v),
        and it reaches the cell through the kernel's half [(1 - u) f, (2 - u) f) in each
        direction (built once: ``labels`` runs per image)."""
        f, k = self.stride, self.kernels
        rows = [
            torch.stack(
                [k[:, (1 - u) * f : (2 - u) * f, (1 - v) * f : (2 - v) * f] for v in (0, 1)], 1
            )
            for u in (0, 1)
        ]
        return torch.stack(rows, 1)

    def _cell_labels(
        self, scores: torch.Tensor, i: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """The f x f labels of cells (i, a, b), from their 2 x 2 coarse pixels: the
        deconvolution's sums written out (zero past the edges, as the deconvolution's)."""
        padded = F.pad(scores, (1, 1, 1, 1))
        corners = padded.unfold(2, 2, 1).unfold(3, 2, 1)[i, :, a, b]  # cells x C x 2 x 2
        taps = self._taps.to(scores.device)
        return torch.einsum("ncuv,cuvyx->ncyx", corners, taps).max(1).indices.to(torch.uint8)


def _pool_max(x: torch.Tensor, pad: float) -> torch.Tensor:
    """N x h x w -> N x (h+1) x (w+1): the max over each 2 x 2 window of ``x`` padded by one
    pixel of ``pad`` all round."""
    return F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=pad)[:, None], 2, 1)[:, 0]


def served_network(model: nn.Module, coarse: bool) -> tuple[nn.Module, FinalUpsampling | None]:
    """What a backend runs for ``model``, and what finishes its output into labels: its frozen
    upsampling grouped (:func:`~fcn_core.models.grouped_upsampling`), and with ``coarse`` and
    an exact :class:`FinalUpsampling`, without its final layer (:class:`CoarseScores`, with
    that ``FinalUpsampling``); else the whole network and None (logits: take the argmax)."""
    grouped = grouped_upsampling(model)
    final = FinalUpsampling.of(grouped) if coarse else None
    if final is None:
        return grouped, None
    return CoarseScores(grouped), final  # type: ignore[arg-type]
