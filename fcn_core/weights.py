"""The served weights file: one ``.safetensors`` whose metadata rebuilds and serves the model.

Everything the server needs (architecture, backbone, classes, palette, normalisation) and
everything a user should know (training data, metrics and split, the exact command) travels
in the file's header under the key ``fcn``, as JSON. Loading never unpickles; a content hash
over the tensors catches corruption.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fcn_core.files import atomic_write
from fcn_core.models import build_model
from fcn_core.preprocess import Normalization

FORMAT_VERSION = 1
METADATA_KEY = "fcn"


class WeightsError(ValueError):
    """A weights file that is missing, corrupt, or does not match the model it describes."""


@dataclass
class WeightsMetadata:
    arch: str
    backbone: str
    class_names: list[str]
    palette: list[list[int]]
    normalization: Normalization
    ignore_index: int = 255
    at_once: bool = False
    dataset: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_split: str = ""
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Further splits the weights were scored on: split -> the same metric names."""
    teacher: str = ""
    """Distilled weights: the teacher (file, content hash, licence) they learnt from."""
    command: str = ""
    created: str = ""
    notes: str = ""
    sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["normalization"] = self.normalization.to_dict()
        d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsMetadata:
        d = dict(d)
        d.pop("num_classes", None)
        d["normalization"] = Normalization.from_dict(d["normalization"])
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise WeightsError(f"unknown metadata fields {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self) -> None:
        if len(self.palette) < len(self.class_names):
            raise WeightsError(
                f"palette has {len(self.palette)} colours for {len(self.class_names)} classes"
            )


@dataclass
class LoadedWeights:
    model: nn.Module
    meta: WeightsMetadata


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_weights(path: str | Path, model: nn.Module, meta: WeightsMetadata) -> WeightsMetadata:
    """Write model + metadata; returns the metadata with its content hash filled in."""
    described = (meta.num_classes, meta.arch, meta.backbone, meta.at_once)
    actual = (
        getattr(model, "num_classes", None),
        getattr(model, "arch", type(model).__name__),
        getattr(model, "backbone_name", None),
        getattr(model, "at_once", None),
    )
    if described != actual:
        raise WeightsError(
            "metadata (classes, arch, backbone, at_once) = "
            f"{described} does not describe the model {actual}"
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta.sha256 = content_hash(tensors)
    header = {METADATA_KEY: json.dumps(meta.to_dict())}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return meta


def read_metadata(path: str | Path) -> WeightsMetadata:
    """The metadata alone, from the header, without reading the tensors."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    return _parse_header(path, header)


def load_weights(
    path: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> LoadedWeights:
    """Rebuild the model the file describes, load its tensors, return it in eval mode."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: tensors unreadable ({exc})") from exc
    if verify and not meta.sha256:
        raise WeightsError(f"{path}: no content hash in the metadata; cannot verify the tensors")
    if verify and content_hash(tensors) != meta.sha256:
        raise WeightsError(f"{path}: content hash mismatch: the file is corrupt or was altered")
    try:
        model = build_model(meta.arch, meta.num_classes, meta.backbone, at_once=meta.at_once)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    load_state_dict_checked(model, tensors, str(path))
    return LoadedWeights(model.to(device).eval(), meta)


def load_state_dict_checked(
    model: nn.Module, tensors: dict[str, torch.Tensor], origin: str
) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"shape mismatch: {'; '.join(wrong[:3])}")
    if problems:
        raise WeightsError(
            f"{origin}: does not match {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(tensors, strict=True)


def import_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A foreign ``.pth`` state dict, read without running pickled code."""
    path = _existing(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or broken pickles
        raise WeightsError(f"{path}: cannot be read as a plain state dict ({exc})") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return obj


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def _parse_header(path: Path, header: dict[str, str]) -> WeightsMetadata:
    if METADATA_KEY not in header:
        raise WeightsError(f"{path}: no '{METADATA_KEY}' metadata; not an fcn_core weights file")
    try:
        raw = json.loads(header[METADATA_KEY])
        if raw.get("format_version", 1) > FORMAT_VERSION:
            raise WeightsError(
                f"format version {raw['format_version']} is newer than this fcn_core reads "
                f"({FORMAT_VERSION}); upgrade the package"
            )
        return WeightsMetadata.from_dict(raw)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path}: metadata is malformed ({exc})") from exc


def import_reference_fcn(path: str | Path, arch: str = "fcn8s") -> LoadedWeights:
    """The reference Caffe FCN-32s/16s/8s VGG16 weights, converted to a PyTorch state dict
    (layer names as in the Caffe prototxt: ``conv1_1``, ``fc6``, ``score_fr``, ``upscore2``...).

    Those nets were trained on BGR images with the ImageNet mean subtracted on the 0..255
    scale, so the metadata carries ``CAFFE_VGG16_BGR``; feeding them torchvision's RGB
    mean/std input costs accuracy silently.
    """
    from fcn_core.data.palettes import VOC_CLASSES, VOC_PALETTE
    from fcn_core.preprocess import CAFFE_VGG16_BGR

    source = import_torch_checkpoint(path)
    renamed = {
        (f"backbone.{k}" if k.startswith(("conv", "fc6", "fc7")) else k): v
        for k, v in source.items()
    }
    num_classes = renamed["score_fr.weight"].shape[0] if "score_fr.weight" in renamed else 21
    model = build_model(arch, num_classes, "vgg16")
    load_state_dict_checked(model, renamed, str(path))
    meta = WeightsMetadata(
        arch=arch,
        backbone="vgg16",
        class_names=VOC_CLASSES[:num_classes],
        palette=VOC_PALETTE[:num_classes],
        normalization=CAFFE_VGG16_BGR,
        dataset="PASCAL VOC 2011 train + SBD (reference Caffe model)",
        notes=f"imported from {Path(path).name}",
    )
    return LoadedWeights(model.eval(), meta)
