"""``GET /v1/models``, ``GET /v1/models/{name}``: what is served (each model's weights
metadata, and where and how it runs); ``GET /v1/model``: the default model, as before."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import PROTECTED, State
from service.schemas import ModelInfo, ModelList

router = APIRouter(**PROTECTED)


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    """Every served model: name, version, classes, palette, metrics, readiness, memory."""
    repo = state.repository
    return ModelList(default=repo.default_name, models=[ModelInfo.of(m) for m in repo.models()])


@router.get("/v1/models/{name}", response_model=ModelInfo)
async def model_by_name(state: State, name: str) -> ModelInfo:
    """One model's metadata; 404 with the known names for an unknown one."""
    return ModelInfo.of(state.repository.get(name))


@router.get("/v1/model", response_model=ModelInfo)
async def default_model(state: State) -> ModelInfo:
    """The default model's metadata: architecture, classes, palette, metrics, content hash."""
    return ModelInfo.of(state.repository.get())
