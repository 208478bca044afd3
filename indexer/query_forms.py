"""The JSON query forms (`image_base64`, `embedding`, `url`) shared by `POST /v1/query` and `deploy/score.py`: parsing,
base64 decoding, the embedding answer, and the URL fetcher (allowlist, no private addresses, capped)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.answers import EmbeddingAnswer, Source
from search.errors import InvalidArgument, InvalidImage
from search.query import Searcher, as_embedding
from search.settings import Settings

#: The three forms; a body holds exactly one of them.
FORMS = ("image_base64", "embedding", "url")
#: Redirects followed per URL query (each hop checked like the first URL).
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = 8192
#: Bytes read per socket read of a fetched image.
_CHUNK = 64 * 1024

Similarity = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]


class QueryForm(BaseModel):
    """A JSON query body: exactly one of `image_base64` (one string or a list), `embedding` (numbers) or `url`, and
    optionally the search options `k`, `source`, `min_similarity`, `threshold` (as the query parameters)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_base64: str | list[str] | None = Field(
        None, description="One image, or a list answered in order: base64 (standard or URL-safe, `data:` URL too)."
    )
    embedding: list[float] | None = Field(
        None, description="A query vector of the store model's embedding_dim numbers (768 for the real model)."
    )
    url: str | None = Field(None, max_length=MAX_URL_LENGTH, description="An http(s) image URL (off by default).")
    k: int | None = Field(None, ge=1, le=1000)
    source: list[Source] | None = None
    min_similarity: Similarity | None = None
    threshold: Similarity | None = None

    @model_validator(mode="after")
    def _one_form(self) -> QueryForm:
        given = [f for f in FORMS if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(FORMS)} (got {', '.join(given) or 'none'})")
        if isinstance(self.image_base64, list) and not self.image_base64:
            raise ValueError("image_base64 is an empty list: give at least one image")
        return self

    @property
    def form(self) -> str:
        return next(f for f in FORMS if getattr(self, f) is not None)

    def options(self) -> dict[str, Any]:
        """The search options given in the body (None: not given), as `query_answer` takes them."""
        return {"k": self.k, "sources": self.source, "min_similarity": self.min_similarity, "threshold": self.threshold}


#: The OpenAPI schema of a JSON query body (written out: `oneOf` says "exactly one form", which pydantic's
#: schema cannot).
QUERY_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "image_base64": {
            "description": QueryForm.model_fields["image_base64"].description,
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        },
        "embedding": {
            "description": QueryForm.model_fields["embedding"].description,
            "type": "array",
            "items": {"type": "number"},
            "minItems": 1,
        },
        "url": {"description": QueryForm.model_fields["url"].description, "type": "string", "maxLength": 8192},
        "k": {"type": "integer", "minimum": 1, "maximum": 1000},
        "source": {"type": "array", "items": {"enum": ["human", "hash_list", "model"]}},
        "min_similarity": {"type": "number", "minimum": -1, "maximum": 1},
        "threshold": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "oneOf": [{"required": [f]} for f in FORMS],
}


# -- base64 ------------------------------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def decode_base64(text: str, name: str) -> bytes | InvalidImage:
    """The bytes of one base64 image (standard or URL-safe alphabet, padding optional, whitespace ignored, a
    `data:...;base64,` prefix allowed), or the InvalidImage (400) that says why not."""
    s = "".join(_DATA_URL.sub("", text, count=1).split())
    if not s:
        return InvalidImage(name, "empty base64 string: send the image's bytes, base64-encoded")
    altchars = b"-_" if ("-" in s or "_" in s) else None
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        return InvalidImage(name, f"not valid base64 ({e}): send the image's bytes, base64-encoded")


def form_images(form: QueryForm, settings: Settings) -> list[tuple[str, bytes] | InvalidImage]:
    """The images of an `image_base64` or `url` form as (name, bytes), a bad one as its InvalidImage (answered in
    place, as a bad multipart upload is). A url that cannot be fetched raises (it is the only image)."""
    if form.url is not None:
        return [(display_url(form.url), fetch_url(form.url, settings))]
    texts = [form.image_base64] if isinstance(form.image_base64, str) else list(form.image_base64 or [])
    limit = settings.max_images_per_request
    if len(texts) > limit:
        why = f"{len(texts)} images in one request; at most {limit} (setting max_images_per_request)"
        raise InvalidImage("image_base64", why, kind="too_large")
    single = isinstance(form.image_base64, str)
    names = ["image_base64"] if single else [f"image_base64[{i}]" for i in range(len(texts))]
    out: list[tuple[str, bytes] | InvalidImage] = []
    for name, text in zip(names, texts, strict=True):
        data = decode_base64(text, name)
        out.append(data if isinstance(data, InvalidImage) else (name, data))
    return out


# -- embeddings --------------------------------------------------------------------------------------------------------
def embedding_answer(
    values: Any,
    searcher: Searcher | None,
    model_dim: int,
    *,
    k: int | None = None,
    sources: Sequence[str] | None = None,
    min_similarity: float | None = None,
    threshold: float | None = None,
) -> EmbeddingAnswer:
    """The answer for a query vector (no model run). With no store model yet (`searcher` None) the vector is still
    checked, against `model_dim` (the loaded model's), and nothing is found."""
    if searcher is None:
        as_embedding(values, model_dim)
        return EmbeddingAnswer(nearest_unsafe=[], near_duplicates=[])
    return searcher.embedding_answer(values, k=k, sources=sources, min_similarity=min_similarity, threshold=threshold)


def load_embeddings(path: str | Path) -> np.ndarray:
    """The query vectors of a `.npy` file (`query --embedding`): one vector, or one per row of a 2-D array; numbers
    only (no pickles). Each is checked against the store's model when it is queried (`as_embedding`)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidArgument(f"{path}: not a readable .npy array ({e}); save one with numpy.save") from None
    if not isinstance(array, np.ndarray) or array.ndim not in (1, 2) or array.size == 0:
        shape = list(getattr(array, "shape", []))
        raise InvalidArgument(f"{path}: expected one vector or a 2-D array of vectors, not an array of shape {shape}")
    return array.reshape(1, -1) if array.ndim == 1 else array


# -- URLs --------------------------------------------------------------------------------------------------------------
class UrlQueriesDisabled(InvalidArgument):
    """A url query on a server that does not take them (setting url_queries)."""

    code = "url_queries_disabled"


class UrlRefused(InvalidArgument):
    """A URL the rules refuse: scheme, host not on the allowlist, private address, redirect elsewhere."""

    code = "url_not_allowed"


class UrlFetchFailed(InvalidArgument):
    """A URL allowed but not fetched: no answer in time, an error status, a failed connection."""

    code = "url_fetch_failed"


#: getaddrinfo-like: (host, port) -> the addresses it resolves to
Resolver = Callable[[str, int], list[str]]


def _getaddrinfo(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def display_url(url: str) -> str:
    """A URL as named in answers and errors: without its query string and fragment (they may carry tokens)."""
    return url.split("?", 1)[0].split("#", 1)[0]


def allowlist(settings: Settings) -> list[str]:
    return [h.strip().lower().rstrip(".") for h in settings.url_allowlist.split(",") if h.strip()]


def host_allowed(host: str, entries: Sequence[str]) -> bool:
    """`host` is an entry, or below a `*.domain` entry (which does not cover `domain` itself)."""
    host = host.lower().rstrip(".")
    return any(host == e or (e.startswith("*.") and host.endswith(e[1:])) for e in entries)


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public unicast one (None: it is)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


def check_url(url: httpx.URL, settings: Settings) -> str:
    """Refuse (UrlRefused) what the rules do not allow before any connection: a scheme other than http(s),
    credentials in the URL, a host not on the allowlist. Returns the host (IDNA-encoded: what DNS is asked)."""
    if url.scheme not in ("http", "https"):
        raise UrlRefused(f"only http and https URLs are fetched, not {url.scheme or 'no scheme'!r}")
    if not url.host:
        raise UrlRefused("the URL names no host")
    if url.userinfo:
        raise UrlRefused("URLs with credentials (user:password@) are not fetched")
    host = url.host.lower().rstrip(".")
    ascii_host = url.raw_host.decode("ascii").lower().rstrip(".")  # IDNA: an entry may be written either way
    entries = allowlist(settings)
    if not (host_allowed(host, entries) or host_allowed(ascii_host, entries)):
        listed = ", ".join(entries) if entries else "empty"
        raise UrlRefused(f"host {host!r} is not on the allowlist (setting url_allowlist: {listed})")
    return ascii_host


def resolve(host: str, port: int, settings: Settings, resolver: Resolver = _getaddrinfo) -> str:
    """The address to connect to: every address the host resolves to must be public unless url_allow_private (one
    private answer refuses the host); the first is returned and connected to, so no second lookup can differ."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
        except OSError as e:
            raise UrlFetchFailed(f"cannot resolve host {host!r}: {getattr(e, 'strerror', None) or e}") from None
    if not addresses:
        raise UrlFetchFailed(f"host {host!r} resolves to no address")
    if not settings.url_allow_private:
        for ip in addresses:
            kind = _address_kind(ip)
            if kind is not None:
                raise UrlRefused(
                    f"host {host!r} resolves to {ip}, a {kind} address: refused (setting url_allow_private)"
                )
    return str(addresses[0])


def fetch_url(url: str, settings: Settings, *, resolver: Resolver = _getaddrinfo) -> bytes:
    """The bytes at an image URL, under the rules of the url_* settings:

    off unless url_queries; http(s) only, the host on url_allowlist; every address it resolves to public unless
    url_allow_private, and the request sent to the address checked (the URL's host in the Host header and TLS
    SNI, the certificate verified for it: a second DNS answer cannot redirect it); no proxy from the environment;
    redirects followed by hand, at most MAX_REDIRECTS, each target checked like the first (allowlist, address; never
    https to http); at most url_max_bytes (a larger Content-Length is refused unread, a body is cut off at the cap:
    413); url_timeout_seconds in all (checked between reads). A compressed answer (Content-Encoding) is refused."""
    if not settings.url_queries:
        raise UrlQueriesDisabled("this server does not fetch URLs (setting url_queries is off): send image_base64")
    shown = display_url(url)
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise UrlRefused(f"not a valid URL ({e})") from None
    deadline = time.monotonic() + settings.url_timeout_seconds
    cap = settings.url_max_bytes
    try:
        with httpx.Client(trust_env=False, follow_redirects=False, verify=True) as client:
            for _ in range(MAX_REDIRECTS + 1):
                host = check_url(current, settings)
                port = current.port or (443 if current.scheme == "https" else 80)
                address = resolve(host, port, settings, resolver)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise httpx.TimeoutException("deadline")
                request = client.build_request(
                    "GET",
                    current.copy_with(host=address),
                    headers={
                        "Host": current.netloc.decode("ascii"),
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                        "User-Agent": "nsfw-index",
                    },
                    extensions={"sni_hostname": current.raw_host.decode("ascii")},
                    timeout=httpx.Timeout(left),
                )
                response = client.send(request, stream=True)
                try:
                    if response.status_code in REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise UrlFetchFailed(f"{shown} answered {response.status_code} without a Location")
                        target = current.join(location)
                        if current.scheme == "https" and target.scheme == "http":
                            raise UrlRefused(f"{shown} redirects from https to http: refused")
                        current = target
                        continue
                    if response.status_code != 200:
                        raise UrlFetchFailed(f"{shown} answered HTTP {response.status_code}, not an image")
                    return _read_capped(response, shown, cap, deadline)
                finally:
                    response.close()
            raise UrlRefused(f"{shown} redirects more than {MAX_REDIRECTS} times: refused")
    except httpx.TimeoutException:
        raise UrlFetchFailed(
            f"{shown} did not answer in full within {settings.url_timeout_seconds:g} s (setting url_timeout_seconds)"
        ) from None
    except httpx.HTTPError as e:
        raise UrlFetchFailed(f"cannot fetch {shown}: {e or type(e).__name__}") from None


def _read_capped(response: httpx.Response, shown: str, cap: int, deadline: float) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UrlFetchFailed(f"{shown} answered with Content-Encoding {encoding!r}; only uncompressed bodies are read")
    too_large = InvalidImage(shown, f"larger than {cap} bytes (setting url_max_bytes)", kind="too_large")
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise too_large  # refused unread
    body = bytearray()
    for chunk in response.iter_raw(_CHUNK):
        body += chunk
        if len(body) > cap:
            raise too_large  # cut off while streaming
        if time.monotonic() > deadline:
            raise httpx.TimeoutException("deadline")
    return bytes(body)
