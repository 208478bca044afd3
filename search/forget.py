"""Forgetting an image (`nsfw-index forget`, `DELETE /v1/images/{id}`) and external ids: the rules, the audit record
and the FAISS files kept from serving a forgotten vector."""

from __future__ import annotations

from search.answers import Forgotten
from search.errors import InvalidArgument, NotFound
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles

#: The longest external id accepted (characters).
MAX_EXTERNAL_ID = 256


class ExternalIdConflict(InvalidArgument):
    """An external id that another image holds, or an image that already has another one (HTTP 409)."""

    code = "external_id_conflict"


def check_external_id(value: str) -> str:
    """An external id as given: 1 to MAX_EXTERNAL_ID printable characters, no surrounding whitespace (nothing is
    normalised silently: the id is the caller's own)."""
    if not value:
        raise InvalidArgument("external_id is empty: leave it out, or give the caller's id of this image")
    if len(value) > MAX_EXTERNAL_ID:
        raise InvalidArgument(f"external_id has {len(value)} characters; at most {MAX_EXTERNAL_ID}")
    if not value.isprintable() or value != value.strip():
        raise InvalidArgument("external_id must be printable characters without leading or trailing whitespace")
    return value


def external_id_holder(store: Store, external_id: str, sha256: str | None) -> None:
    """Refuse (ExternalIdConflict) an external id that an image other than the content `sha256` holds; called before
    adding that content, so that a conflict writes nothing."""
    holder = store.image_by_external_id(external_id)
    if holder is None:
        return
    if sha256 is None or store.ids_by_sha([sha256]).get(sha256) != holder:
        raise ExternalIdConflict(f"external id {external_id!r} belongs to image {holder}; one image per external id")


def assign_external_id(store: Store, image_id: int, external_id: str) -> None:
    """Give the image its external id (already so: nothing to do). ExternalIdConflict when another image holds it
    or the image has another one: an external id is never moved or replaced silently."""
    holder = store.set_external_id(image_id, external_id)
    if holder is None:
        return
    if holder != image_id:
        raise ExternalIdConflict(f"external id {external_id!r} belongs to image {holder}; one image per external id")
    current = store.external_ids([image_id]).get(image_id)
    raise ExternalIdConflict(
        f"image {image_id} already has external id {current!r}; forget the image and add it again to change it"
    )


def _gone(what: str, record: dict[str, object] | None, root: object) -> NotFound:
    if record is None:
        return NotFound(f"no image {what} in the store at {root}")
    return NotFound(
        f"image {what} was already forgotten at {record['at']} by {record['who']} (run {record['run_id']}); "
        "nothing to do"
    )


def resolve_for_forget(store: Store, *, ref: str | None = None, external_id: str | None = None) -> int:
    """The image an id, sha256 or stored path (`ref`), or an external id names. NotFound says when it was already
    forgotten (and by whom)."""
    if (ref is None) == (external_id is None):
        raise InvalidArgument("name the image by one of: id, sha256 or path, or its external id")
    if external_id is not None:
        found = store.image_by_external_id(external_id)
        if found is None:
            raise _gone(f"with external id {external_id!r}", store.forgotten("external_id", external_id), store.root)
        return found
    assert ref is not None
    try:
        return store.resolve_image(ref)
    except NotFound:
        text = ref.strip()
        if text.isdigit():
            raise _gone(f"with id {int(text)}", store.forgotten("id", int(text)), store.root) from None
        if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
            raise _gone(f"with sha256 {text.lower()}", store.forgotten("sha256", text.lower()), store.root) from None
        raise


def forget(store: Store, image_id: int, settings: Settings, *, who: str) -> Forgotten:
    """Remove the image `image_id` (the store opened with its writer lock): row, paths, vector, thumbnails, cluster
    memberships and hash-list matches, recorded as a run of kind `forget`; label events stay. The FAISS files are
    rewritten before returning, so that no reader serves the vector from a stale snapshot (a reader that looks
    before that finds the deletion epoch moved and rebuilds from SQLite). NotFound (saying when it was already
    forgotten) for an image the store does not hold."""
    if store.readonly or not store.holds_writer_lock:
        raise InvalidArgument(f"forgetting an image needs Store.writing({str(store.root)!r}, ...)")
    try:
        store.image(image_id)
    except NotFound:
        raise _gone(f"with id {image_id}", store.forgotten("id", image_id), store.root) from None
    record = store.forget_image(image_id, who=who)
    if store.model_identity() is not None:  # the FAISS files, stale by the deletion epoch: rebuilt and written
        files = IndexFiles(store, settings)  # (the path a prune takes: deletions are rare, rebuilding is always right)
        files.open_all(persist=True)
        files.open_unsafe(persist=True)
    return Forgotten.model_validate(record)
