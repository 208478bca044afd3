"""The review page (`GET /review`: static HTML, script and CSS from api/static/) and `GET /v1/images/{id}/thumbnail`."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam

from api.deps import ImageId, Reader, ReadStore, ServiceDep
from api.errors import ApiError
from api.routers.common import errors

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static"
#: The page's files: name -> media type. Nothing else under api/static is served.
ASSETS = {
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: Everything the page loads comes from this server: no CDN, no remote fonts, no inline script or style, no frames.
#: Thumbnails arrive through `fetch` with the reviewer's key and are shown from `blob:` URLs.
REVIEW_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "font-src 'none'; object-src 'none'; media-src 'none'; frame-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": REVIEW_CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
#: Thumbnails are never cached by the browser or a proxy: a revealed image is gone when the reviewer moves on.
IMAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

JPEG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/jpeg": {}}, "description": "The thumbnail (JPEG); `X-Thumbnail` says which variant."}
}


@cache
def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get(
    "/review",
    response_class=Response,
    tags=["review"],
    responses={200: {"content": {"text/html": {}}, "description": "The review page."}},
)
def review_page() -> Response:
    """The review page: groups and clusters by unsafe count, members as (blurred) thumbnails, labels."""
    return Response(_asset("review.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/review/{asset}", response_class=Response, include_in_schema=False)
def review_asset(asset: Annotated[str, PathParam()]) -> Response:
    if asset not in ASSETS:
        raise ApiError(404, "not_found", f"no such file of the review page: {asset!r}")
    return Response(_asset(asset), media_type=ASSETS[asset], headers=PAGE_HEADERS)


@router.get(
    "/v1/images/{id}/thumbnail",
    response_class=Response,
    tags=["images"],
    responses={**JPEG, **errors(401, 403, 404, 422, 503)},
)
def get_thumbnail(
    image_id: ImageId,
    caller: Reader,
    svc: ServiceDep,
    store: ReadStore,
    reveal: Annotated[
        bool, Query(description="The unblurred thumbnail (needs a key with the `view_images` right).")
    ] = False,
) -> Response:
    """An indexed image's thumbnail, from the store (never from its files); only for keys with `view_images`.

    Blurred (a server-side variant in which nothing is recognisable) when the image is known-unsafe (any source)
    or scores at least the blur score; `reveal=true` gives the unblurred one. A store created without
    `--thumbnails` answers 404.
    """
    if not caller.can("view_images"):
        if not caller.authenticated:
            raise ApiError(
                401,
                "unauthorized",
                "thumbnails need an API key with the 'view_images' right: send `Authorization: Bearer KEY`",
                headers={"WWW-Authenticate": 'Bearer realm="nsfw-index"'},
            )
        raise ApiError(403, "forbidden", "this API key lacks the 'view_images' right (needed for thumbnails)")
    if not store.thumbnails_enabled():
        raise ApiError(
            404,
            "not_found",
            f"the store at {svc.store_dir} keeps no thumbnails: create it with "
            f"`nsfw-index index PATH --store DIR --thumbnails`",
        )
    store.image(image_id)  # 404 naming the id when there is no such image
    blurred = not reveal and image_id in store.blurred_by_default(svc.settings, [image_id])
    data = store.thumbnail(image_id, blurred=blurred)
    if data is None:
        raise ApiError(404, "not_found", f"image {image_id} has no thumbnail")
    headers: dict[str, Any] = {**IMAGE_HEADERS, "X-Thumbnail": "blurred" if blurred else "original"}
    return Response(data, media_type="image/jpeg", headers=headers)
