"""``GET /v1/model``: what is being served (weights metadata), and where and how it runs."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import PROTECTED, Meta, State
from service.schemas import ModelInfo

router = APIRouter(**PROTECTED)


@router.get("/v1/model", response_model=ModelInfo)
async def model_info(state: State, meta: Meta) -> ModelInfo:
    """The served weights' metadata: architecture, classes, palette, metrics, content hash."""
    return ModelInfo.of(meta, device=state.device, precision=state.precision, backend=state.backend)
