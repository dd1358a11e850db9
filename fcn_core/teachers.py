"""Teachers to distil from: trained segmenters run outside PyTorch, read as logits.

A teacher sees a photo *letterboxed*: scaled so its long side fills the square input, placed at
the top left, the rest grey. It answers stride-``s`` logits over that square, aligned the
DeepLab way (logit ``k`` sits on input pixel ``k * s``, so a 513 input gives 33 x 33). Keeping
those few logits, rather than the teacher's label map, is what lets distillation (``distill``)
label *any* crop, scale and flip of the photo afterwards, exactly where the student looks.

The runtime (``ai-edge-litert`` for TFLite files) is an optional extra: ``pip install
'fcn-serve[distill]'``. Nothing here is needed to serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fcn_core.files import sha256_file
from fcn_core.preprocess import Normalization

LETTERBOX_FILL = 128
"""Grey: zero after the teacher's own ``x / 127.5 - 1`` quantisation."""


@dataclass(frozen=True)
class TeacherLogits:
    """A teacher's logits for one photo: ``C x G x G`` over a ``size x size`` letterbox."""

    logits: np.ndarray
    image_size: tuple[int, int]
    """(height, width) of the photo."""
    input_size: int

    @property
    def placed_size(self) -> tuple[int, int]:
        """(height, width) the photo took inside the letterbox."""
        return letterbox_size(self.image_size, self.input_size)

    def sample(self, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Bilinear logits at photo coordinates (pixel centres at ``i + 0.5``): ``C x h x w``
        for ``h``-long ``ys`` and ``w``-long ``xs``; NaN outside the photo."""
        h, w = self.image_size
        ph, pw = self.placed_size
        # photo -> letterbox pixel centres -> the logit grid, align_corners style
        u = ys * (ph / h) - 0.5
        v = xs * (pw / w) - 0.5
        gy = (u / (self.input_size - 1)) * 2 - 1
        gx = (v / (self.input_size - 1)) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        src = torch.from_numpy(self.logits.astype(np.float32))[None]
        out = F.grid_sample(src, grid.float(), mode="bilinear", align_corners=True)[0]
        outside = (ys < 0) | (ys >= h)
        out[:, outside, :] = float("nan")
        out[:, :, (xs < 0) | (xs >= w)] = float("nan")
        return out

    def full(self) -> torch.Tensor:
        """``C x H x W`` logits at the photo's own pixels."""
        h, w = self.image_size
        return self.sample(torch.arange(h) + 0.5, torch.arange(w) + 0.5)


def letterbox_size(image_size: tuple[int, int], input_size: int) -> tuple[int, int]:
    h, w = image_size
    scale = input_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def letterbox(image: np.ndarray, input_size: int) -> np.ndarray:
    """H x W x 3 uint8 -> ``input_size`` square: scaled to fit, top left, grey elsewhere."""
    ph, pw = letterbox_size(image.shape[:2], input_size)
    placed = np.asarray(Image.fromarray(image).resize((pw, ph), Image.BILINEAR))
    out = np.full((input_size, input_size, 3), LETTERBOX_FILL, dtype=np.uint8)
    out[:ph, :pw] = placed
    return out


class TFLiteTeacher:
    """A DeepLab-style TFLite segmenter (uint8 ``[1, S, S, 3]`` in), read at its logits.

    ``logits_tensor`` names the stride-16 logits (DeepLab: ``logits/semantic/BiasAdd...``);
    they are dequantised to float. The interpreter keeps every tensor, which costs the fast
    XNNPACK path (about 0.1 s rather than 0.03 s for 513 x 513 on one core).
    """

    def __init__(
        self,
        path: str | Path,
        num_threads: int = 1,
        logits_tensor: str = "logits/semantic/BiasAdd",
    ) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise RuntimeError(
                "the TFLite teacher needs ai-edge-litert: pip install 'fcn-serve[distill]'"
            ) from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"teacher model not found: {self.path}")
        self.sha256 = sha256_file(self.path)
        self._interpreter = Interpreter(
            model_path=str(self.path),
            num_threads=num_threads,
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        self._interpreter.allocate_tensors()
        (inp,) = self._interpreter.get_input_details()
        if inp["dtype"] != np.uint8 or len(inp["shape"]) != 4 or inp["shape"][1] != inp["shape"][2]:
            raise ValueError(f"{self.path}: expected a uint8 [1, S, S, 3] input, got {inp}")
        self._input_index = inp["index"]
        self.input_size = int(inp["shape"][1])
        candidates = [
            d
            for d in self._interpreter.get_tensor_details()
            if d["name"].startswith(logits_tensor) and len(d["shape"]) == 4
        ]
        if not candidates:
            raise ValueError(f"{self.path}: no 4-D tensor named {logits_tensor}...")
        self._logits = candidates[0]
        self.num_classes = int(self._logits["shape"][-1])

    def __call__(self, image: np.ndarray) -> TeacherLogits:
        """H x W x 3 uint8 RGB -> the teacher's logits for it."""
        self._interpreter.set_tensor(self._input_index, letterbox(image, self.input_size)[None])
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._logits["index"])[0]
        scale, zero = self._logits["quantization"]
        logits = (raw.astype(np.float32) - zero) * scale if scale else raw.astype(np.float32)
        return TeacherLogits(
            logits.transpose(2, 0, 1).astype(np.float16), image.shape[:2], self.input_size
        )


RAW_PIXELS = Normalization((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
"""The identity on 0..255 pixels: a teacher takes the photo as it is."""


class TeacherModule(nn.Module):
    """A teacher as a segmentation model (0..255 RGB in, logits at the input's size out), so
    ``fcn-eval --teacher`` scores it with the same code and metrics as our own weights."""

    def __init__(self, teacher: TFLiteTeacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([self.teacher(np.ascontiguousarray(im)).full() for im in images])
