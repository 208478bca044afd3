"""The one error hierarchy of nsfw-index: every failure a user can fix is a noun with a message saying how."""

from __future__ import annotations


class NsfwIndexError(Exception):
    """Base class: the CLI maps these to exit codes and `api/` to HTTP errors; nothing else catches them."""

    #: short machine-readable code used in JSON error bodies
    code = "error"


class InvalidImage(NsfwIndexError):
    """An input that is not an image we accept (corrupt, truncated, too large, unknown format)."""

    code = "invalid_image"

    def __init__(self, name: str, reason: str, *, kind: str = "invalid") -> None:
        self.name = name
        self.reason = reason
        #: one of invalid, too_large, unsupported_format: lets the HTTP layer pick 400/413/415
        self.kind = kind
        super().__init__(f"{name}: {reason}")

    def __reduce__(self) -> tuple[type[InvalidImage], tuple[str, str], dict[str, str]]:
        # crosses process boundaries (decode workers): keep the keyword-only kind
        return (type(self), (self.name, self.reason), {"kind": self.kind})


class ModelNotFound(NsfwIndexError):
    """The weights cannot be found locally (and may not be downloaded)."""

    code = "model_not_found"


class CheckpointMismatch(NsfwIndexError):
    """A checkpoint whose tensors or config do not fit the architecture it names."""

    code = "checkpoint_mismatch"


class ModelMismatch(NsfwIndexError):
    """The store was built with another model (weights or preprocessing) than the one in use."""

    code = "model_mismatch"


class StoreLocked(NsfwIndexError):
    """Another writer holds the store."""

    code = "store_locked"


class StoreNotFound(NsfwIndexError):
    """No store at the given path."""

    code = "store_not_found"


class StoreCorrupt(NsfwIndexError):
    """The store's SQLite file is not one nsfw-index can open."""

    code = "store_corrupt"


class IndexMismatch(NsfwIndexError):
    """A FAISS index file does not describe what its manifest or the store says."""

    code = "index_mismatch"


class NotFound(NsfwIndexError):
    """An image id, path, sha256 or cluster that the store does not hold."""

    code = "not_found"


class InvalidArgument(NsfwIndexError):
    """A setting or argument out of range."""

    code = "invalid_argument"


class IndexWriteFailed(NsfwIndexError):
    """A FAISS index file could not be written (e.g. no space left): the previous one stays in place."""

    code = "index_write_failed"
