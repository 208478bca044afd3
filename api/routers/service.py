"""Store and service routes: `GET /v1/stats`, `GET /healthz` (liveness) and `GET /readyz` (readiness)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import schemas
from api.deps import Reader, ReadStore, ServiceDep
from api.errors import ApiError
from api.routers.common import errors
from search.stats import store_stats

router = APIRouter()


@router.get("/v1/stats", response_model=schemas.StatsResponse, tags=["store"], responses=errors(401, 403, 422, 503))
def stats(
    caller: Reader,
    svc: ServiceDep,
    store: ReadStore,
    recall_sample: Annotated[
        int,
        Query(
            ge=0,
            le=10_000,
            description=("Queries used to measure recall@10 of an approximate index (0: skip; it reads the index)."),
        ),
    ] = 0,
) -> schemas.StatsResponse:
    """Counts, levels, known-unsafe, labels, hash lists, index freshness and the store's model identity."""
    return schemas.StatsResponse.of(store_stats(store, svc.settings, recall_sample=recall_sample))


@router.get("/healthz", response_model=schemas.HealthResponse, tags=["service"])
async def healthz() -> schemas.HealthResponse:
    """Liveness: answers at once, touching nothing that inference or search hold."""
    return schemas.HealthResponse(status="ok")


@router.get("/readyz", response_model=schemas.ReadyResponse, tags=["service"], responses=errors(503))
async def readyz(svc: ServiceDep) -> schemas.ReadyResponse:
    """Readiness: 503 while the model or the index is not loaded, or the index does not match the store."""
    if svc.not_ready is not None:
        raise ApiError(503, "model_mismatch" if svc.mismatch else "not_ready", svc.not_ready)
    return schemas.ReadyResponse(ready=True, model=svc.model_info, index=svc.index_summary())
