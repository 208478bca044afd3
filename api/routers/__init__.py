"""One APIRouter per resource; `include_routers` puts them on the app in the order the OpenAPI document lists them."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from api.routers import clusters, hash_lists, images, query, review, service

ROUTERS: tuple[APIRouter, ...] = (
    query.router,
    images.router,
    review.router,
    hash_lists.router,
    clusters.router,
    service.router,
)


def include_routers(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)
