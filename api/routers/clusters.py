"""Cluster routes: `GET /v1/clusters` (a page of clusters or groups) and `GET /v1/clusters/{id}` (one, with members)."""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from api import schemas
from api.deps import MAX_ID, Reader, ReadStore, ServiceDep
from api.errors import ApiError
from api.routers.common import errors

router = APIRouter()


def clusters_module() -> ModuleType:
    """search.clusters, or a 503 saying why this build cannot cluster (the schema documents that answer)."""
    try:
        import search.clusters as clusters
    except ImportError as e:
        raise ApiError(503, "unavailable", f"clustering is not available in this build ({e})") from None
    return clusters


@router.get("/v1/clusters", response_model=schemas.ClusterPage, tags=["clusters"], responses=errors(401, 403, 422, 503))
def list_clusters(
    caller: Reader,
    svc: ServiceDep,
    store: ReadStore,
    kind: Annotated[
        Literal["cluster", "group"], Query(description="k-means clusters or near-duplicate groups.")
    ] = "cluster",
    sort: Annotated[Literal["size", "unsafe"], Query()] = "size",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 50,
) -> schemas.ClusterPage:
    """Clusters or near-duplicate groups from the last `nsfw-index cluster` run, largest or most unsafe first."""
    found = clusters_module().list_clusters(store, svc.settings, kind=kind, sort=sort, page=page, per_page=per_page)
    return schemas.ClusterPage.of(found)


@router.get(
    "/v1/clusters/{id}",
    response_model=schemas.ClusterDetail,
    tags=["clusters"],
    responses=errors(401, 403, 404, 422, 503),
)
def get_cluster(
    cluster_id: Annotated[int, PathParam(alias="id", ge=0, le=MAX_ID)],
    caller: Reader,
    svc: ServiceDep,
    store: ReadStore,
    limit: Annotated[int, Query(ge=0, le=100_000, description="Members to list.")] = 1000,
) -> schemas.ClusterDetail:
    """One cluster or group with its members (ids, scores, known-unsafe sources)."""
    detail: schemas.ClusterDetail = clusters_module().get_cluster(store, svc.settings, cluster_id, limit=limit)
    if not caller.can("read_paths"):
        for m in detail.members:
            m.paths = None
    return detail
