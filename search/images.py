"""One stored image in full: its row, verdict, known-unsafe sources, label history and paths (`GET /v1/images/{id}`,
`nsfw-index show`)."""

from __future__ import annotations

from search.answers import ImageDetail
from search.policy import is_nsfw
from search.probes import probes_for_ids
from search.settings import Settings
from search.store import Store


def image_detail(store: Store, image_id: int, settings: Settings) -> ImageDetail:
    """The image `image_id` (NotFound when the store does not hold it), paths included: callers without the right
    to see paths drop them."""
    row = store.image(image_id)
    history = store.label_history(image_id)
    current = history[-1].label if history else None
    paths = store.paths_of([image_id])[image_id]
    return ImageDetail(
        **dict(row),
        is_nsfw=is_nsfw(row.scores.to_json(), settings),
        known_unsafe_sources=store.known_unsafe(settings, [image_id])[image_id],
        label=current if current != "clear" else None,
        labels=history,
        hash_list_override=store.hash_list_overrides(settings, [image_id]).get(image_id),
        path_count=len(paths),
        paths=paths,
        external_id=store.external_ids([image_id]).get(image_id),
        probes=probes_for_ids(store, [image_id])[image_id],
    )
