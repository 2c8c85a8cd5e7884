"""Installed models: manifest summaries (task, modalities, licence, provenance, weights checksums)."""

from __future__ import annotations

from fastapi import APIRouter

from dicom_ai_node.api.deps import CtxDep, Viewer
from dicom_ai_node.api.schemas import ModelPublic

router = APIRouter(prefix="/api/models", tags=["models"])


@router.get("")
def list_models(ctx: CtxDep, _: Viewer) -> list[ModelPublic]:
    return [ModelPublic.model_validate(m) for m in ctx.models()]
