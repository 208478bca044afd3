"""API keys: the key spec parsed, `Bearer KEY` checked in constant time against every key, the rights routes need."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from search.errors import InvalidArgument

#: Every right a key can hold: `read` (queries, images, clusters, stats), `write` (add images, import hash lists),
#: `label` (label images), `read_paths` (see stored file paths), `view_images` (unblurred thumbnails: the pixels).
ALL_RIGHTS: tuple[str, ...] = ("read", "write", "label", "read_paths", "view_images")
#: What a caller without a key may do when reads are open.
ANONYMOUS_RIGHTS: frozenset[str] = frozenset({"read"})


def parse_api_keys(text: str) -> dict[str, frozenset[str]]:
    """`KEY:read+write,KEY2:read` -> {KEY: {read, write}, ...}; a key with no rights part gets every right.

    Raises InvalidArgument naming the unknown rights (and the known ones) or the empty key.
    """
    out: dict[str, frozenset[str]] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, _, rights = part.partition(":")
        key = key.strip()
        if not key:
            raise InvalidArgument(
                "an API key in NSFW_INDEX_API_KEYS is empty: write `KEY:right+right,KEY2:right` (KEY not empty)"
            )
        names = {r.strip() for r in rights.split("+") if r.strip()} if rights else set(ALL_RIGHTS)
        unknown = names - set(ALL_RIGHTS)
        if unknown:
            raise InvalidArgument(
                f"unknown API key right(s) {sorted(unknown)} in NSFW_INDEX_API_KEYS; known: {sorted(ALL_RIGHTS)} "
                "(write `KEY:right+right,KEY2:right`)"
            )
        out[key] = frozenset(names)
    return out


@dataclass(frozen=True)
class Caller:
    """Who is calling: `api-key:<first 6 hex of sha256(key)>` or `anonymous`, and their rights."""

    name: str
    rights: frozenset[str]
    authenticated: bool

    def can(self, right: str) -> bool:
        return right in self.rights


def key_name(key: str) -> str:
    """A stable, non-secret name for a key (recorded as `who` of labels): the key itself is never stored."""
    return "api-key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:6]


class KeyRing:
    """The configured keys, kept as sha256 digests; `lookup` compares against all of them, without early exit."""

    def __init__(self, keys: dict[str, frozenset[str]]) -> None:
        self._entries = [
            (hashlib.sha256(k.encode("utf-8")).digest(), frozenset(r), key_name(k)) for k, r in keys.items()
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Caller | None:
        # Header values arrive latin-1 decoded: their bytes are the raw header bytes. Digests have one length, so
        # compare_digest's time depends on neither the key's length nor how much of it matches, and every entry is
        # compared whichever one matches.
        digest = hashlib.sha256(token.encode("latin-1", "replace")).digest()
        found: Caller | None = None
        for key_digest, rights, name in self._entries:
            if hmac.compare_digest(key_digest, digest):
                found = Caller(name, rights, True)
        return found


_bearer = HTTPBearer(auto_error=False, description="An API key from NSFW_INDEX_API_KEYS, as `Bearer KEY`.")


def _unauthorized(message: str, error: str | None = None) -> ApiError:
    challenge = 'Bearer realm="nsfw-index"' + (f', error="{error}"' if error else "")
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def caller_from(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    """The caller of this request: 401 for a missing key where one is needed, and for any key we do not know."""
    keyring: KeyRing = request.app.state.keyring
    if credentials is None:
        if request.headers.get("authorization"):
            raise _unauthorized("the Authorization header must be `Bearer KEY`", "invalid_request")
        return Caller("anonymous", ANONYMOUS_RIGHTS, False)
    found = keyring.lookup(credentials.credentials)
    if found is None:
        raise _unauthorized("unknown API key", "invalid_token")
    return found


def require(right: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency that lets through callers holding `right` (401 without a key, 403 with a key lacking it).

    `read` is special: open to callers without a key unless the read_requires_key setting closes it.
    """
    if right not in ALL_RIGHTS:
        raise ValueError(f"unknown right {right!r}")

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Caller:
        caller = caller_from(request, credentials)
        if right == "read" and not request.app.state.settings.read_requires_key:
            return caller  # open reads: anyone, with or without a (valid) key
        if not caller.authenticated:
            raise _unauthorized(
                f"this route needs an API key with the {right!r} right: send `Authorization: Bearer KEY`"
            )
        if not caller.can(right):
            raise ApiError(403, "forbidden", f"this API key lacks the {right!r} right")
        return caller

    dependency.__name__ = f"require_{right}"
    return dependency
