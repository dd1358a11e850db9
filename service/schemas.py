"""The JSON shapes of the API: every pydantic model a route answers with.

Their class names are the OpenAPI schema names clients see, so they are part of the API.
``ClassShare`` is also what ``codecs.summary`` returns: one type from the label count to the
wire. This module imports pydantic only (the served model's type is for annotations alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from service.repository import ServedModel


class ClassShare(BaseModel):
    index: int
    name: str
    pixels: int
    fraction: float = Field(description="pixels / (width * height)")


class Segmentation(BaseModel):
    width: int
    height: int
    classes: list[ClassShare] = Field(description="classes present, most pixels first")
    labels_png_base64: str = Field(
        description="palette PNG, width x height, pixel values = class indices"
    )


class BatchSegmentation(BaseModel):
    results: list[Segmentation] = Field(description="one per image, in the order sent")


class NormalizationInfo(BaseModel):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str


# ``WeightsMetadata`` as served, plus where and how it runs. (Comments, not docstrings, on the
# schemas: a class docstring would become its OpenAPI description.) The fields are listed,
# not generated, because this is a public schema: a metadata field shows up here only when
# it is added on purpose; ``at_once`` (a training detail) is left out.
class ModelInfo(BaseModel):
    arch: str
    backbone: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    normalization: NormalizationInfo
    ignore_index: int
    dataset: str
    metrics: dict[str, Any]
    metrics_split: str
    evaluations: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="further splits scored: split -> metric -> value"
    )
    teacher: str = Field("", description="distilled weights: the teacher they learnt from")
    command: str
    created: str
    notes: str
    sha256: str
    format_version: int
    device: str
    precision: str
    backend: str = Field(description="what runs the network: torch, onnxruntime or openvino")
    name: str = Field(description="the name it is served under (`?model=`)")
    version: str = Field(description="the weights' content hash, short (`X-Model-Version`)")
    ready: bool
    memory_bytes: int = Field(
        description="memory it took when loaded: CUDA memory on a GPU, resident memory on a CPU"
    )

    @classmethod
    def of(cls, served: ServedModel) -> ModelInfo:
        # From the metadata's own dict, so no field is copied by hand; keys the schema does
        # not list (at_once, future ones) are ignored rather than served by accident.
        p = served.runner.predictor
        how = {
            "device": str(p.device),
            "precision": p.precision,
            "backend": p.backend,
            "name": served.name,
            "version": served.version,
            "ready": served.ready,
            "memory_bytes": served.memory_bytes,
        }
        return cls.model_validate({**served.meta.to_dict(), **how})


class ModelList(BaseModel):
    default: str = Field(description="the model of requests that name none")
    models: list[ModelInfo]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    detail: str = ""


# Every error answer: what went wrong, and the request id to find it in the logs.
class ErrorBody(BaseModel):
    detail: str
    request_id: str = ""
