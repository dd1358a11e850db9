"""JPEG decoding on the runner's device: nvJPEG on CUDA, libjpeg-turbo on the CPU.

With ``FCN_DECODE_ON_DEVICE`` the codec pool only checks headers (``codecs.probe_jpeg``) and
a batch's JPEGs are decoded here in one call, straight into device memory: the host never
holds their pixels, and the CPU cores that decoding would take are left to HTTP. On the CPU
device the same code runs torchvision's libjpeg-turbo decoder, which gives Pillow's pixels
byte for byte; that is how the path is tested without a GPU.

A batch that nvJPEG refuses is retried image by image, and an image it still refuses is
decoded by Pillow, so one odd file never fails its batch-mates.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from service.codecs import CodecError, EncodedJpeg, decode

# torchvision >= 0.29 warns on every call that its codecs will move to TorchCodec.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """C x H x W as Pillow's ``exif_transpose`` turns it for EXIF orientation 1-8."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def decode_on_device(
    jpegs: list[EncodedJpeg], device: torch.device
) -> list[torch.Tensor | CodecError]:
    """H x W x 3 uint8 images on ``device`` (oriented), or the error of each one that fails.

    On CUDA, nvJPEG allocates its output on the current stream but writes it from a private
    one without waiting (pytorch/vision#9606): call it with a current stream that has no
    pending work (synchronise it first), and keep compute off that stream.
    """
    raw = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
    try:
        decoded: list[torch.Tensor | None] = list(_decode(raw, device))
    except torch.cuda.OutOfMemoryError:
        raise  # the runner splits the batch
    except RuntimeError:
        decoded = []
        for one in raw:
            try:
                decoded.extend(_decode([one], device))
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:
                decoded.append(None)
    out: list[torch.Tensor | CodecError] = []
    for jpeg, image in zip(jpegs, decoded, strict=True):
        if image is None:
            out.append(_with_pillow(jpeg, device))
        else:
            out.append(orient(image, jpeg.orientation).permute(1, 2, 0))
    return out


def _decode(raw: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type != "cuda":
        return [decode_jpeg(one, mode=ImageReadMode.RGB) for one in raw]
    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        # A failure skips nvJPEG's own final sync: its stream may still be writing into
        # outputs already freed to ours.
        torch.cuda.synchronize(device)
        raise


def _with_pillow(jpeg: EncodedJpeg, device: torch.device) -> torch.Tensor | CodecError:
    try:
        rgb = decode(jpeg.data, jpeg.width * jpeg.height, max(jpeg.width, jpeg.height)).rgb
    except CodecError as exc:
        return exc
    return torch.from_numpy(np.ascontiguousarray(rgb)).to(device)
