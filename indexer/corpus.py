"""Walking a corpus: directories (recursive), files, `@list.txt` files and tar shards, to items with a stable key."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# What a directory walk picks up; files named explicitly are always tried (and fail clearly if not images).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
    | {".avif", ".heic", ".heif", ".hif"}
)
TAR_EXTENSIONS = (".tar",)
TAR_SEP = "::"  # key of a tar member: /abs/shard.tar::member/name.jpg


@dataclass(frozen=True)
class Item:
    """One candidate image: `key` is what the store records as its path."""

    key: str
    size: int
    mtime_ns: int
    file: str | None = None  # a plain file to read
    tar: str | None = None  # or a member of this tar shard
    member: str | None = None


@dataclass(frozen=True)
class WalkError:
    key: str
    reason: str
    kind: str = "unreadable"


def _abs(p: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_EXTENSIONS)


def walk(inputs: Iterable[str], *, all_files: bool = False) -> Iterator[Item | WalkError]:
    """Items in a stable order (inputs as given, directories sorted). Problems become WalkError, never exceptions."""
    for raw in inputs:
        if raw.startswith("@"):
            yield from _walk_list(raw[1:], all_files=all_files)
            continue
        path = _abs(raw)
        try:
            st = os.stat(path)
        except OSError as e:
            yield WalkError(
                path, f"cannot stat: {e.strerror or e}", "missing" if isinstance(e, FileNotFoundError) else "unreadable"
            )
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(path, all_files=all_files)
        elif is_tar(path):
            yield from _walk_tar(path, st)
        elif stat.S_ISREG(st.st_mode):
            yield Item(path, st.st_size, st.st_mtime_ns, file=path)
        else:
            yield WalkError(path, "not a regular file, directory or tar shard", "invalid")


def list_entries(list_file: str) -> list[str]:
    """The paths a `@list.txt` names (relative ones against the list's directory); OSError if unreadable."""
    lf = _abs(list_file)
    with open(lf, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    base = os.path.dirname(lf)
    return [
        ln if os.path.isabs(os.path.expanduser(ln)) else os.path.join(base, ln)
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def roots(inputs: Iterable[str]) -> list[str]:
    """The absolute paths the inputs cover (a list file covers what it names): the scope of `--prune`."""
    out: list[str] = []
    for raw in inputs:
        if raw.startswith("@"):
            try:
                out.extend(roots(list_entries(raw[1:])))
            except (OSError, UnicodeDecodeError):
                continue  # an unreadable list covers nothing: prune nothing on its behalf
        else:
            out.append(_abs(raw))
    return out


def _walk_list(list_file: str, *, all_files: bool) -> Iterator[Item | WalkError]:
    try:
        entries = list_entries(list_file)
    except (OSError, UnicodeDecodeError) as e:
        yield WalkError(_abs(list_file), f"cannot read the list file: {e}")
        return
    yield from walk(entries, all_files=all_files)


def _walk_dir(root: str, *, all_files: bool) -> Iterator[Item | WalkError]:
    """os.walk following symlinks, with loop detection by (device, inode) and unreadable directories reported."""
    errors: list[WalkError] = []

    def onerror(e: OSError) -> None:
        errors.append(WalkError(_abs(e.filename or root), f"cannot list directory: {e.strerror or e}"))

    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        yield from errors
        errors.clear()
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            yield WalkError(dirpath, "symlink loop: this directory was already walked", "symlink_loop")
            dirnames[:] = []
            continue
        seen.add(ident)
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            lower = name.lower()
            if is_tar(lower):
                try:
                    yield from _walk_tar(path, os.stat(path))
                except OSError as e:
                    yield WalkError(path, f"cannot stat: {e.strerror or e}")
                continue
            if not all_files and os.path.splitext(lower)[1] not in IMAGE_EXTENSIONS:
                continue
            try:
                fst = os.stat(path)
            except OSError as e:
                yield WalkError(
                    path, f"cannot stat: {e.strerror or e}", "symlink_loop" if e.errno == 40 else "unreadable"
                )
                continue
            if not stat.S_ISREG(fst.st_mode):
                yield WalkError(path, "not a regular file", "invalid")
                continue
            yield Item(path, fst.st_size, fst.st_mtime_ns, file=path)
    yield from errors


def _walk_tar(path: str, st: os.stat_result) -> Iterator[Item | WalkError]:
    """Members of a (webdataset-style) tar shard with an image extension; the shard's mtime stands for theirs."""
    try:
        with tarfile.open(path, "r:*") as tf:
            members = tf.getmembers()
    except (OSError, tarfile.TarError, EOFError) as e:
        yield WalkError(path, f"cannot read tar shard: {e}", "invalid")
        return
    for m in members:
        if not m.isfile():
            continue
        if os.path.splitext(m.name.lower())[1] not in IMAGE_EXTENSIONS:
            continue  # webdataset shards carry .json/.txt/.cls sidecars
        yield Item(f"{path}{TAR_SEP}{m.name}", m.size, st.st_mtime_ns, tar=path, member=m.name)


class TarReader:
    """Reads members of tar shards, keeping the last shard open (items of one shard come in order)."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._tf: tarfile.TarFile | None = None

    def read(self, tar: str, member: str, max_bytes: int) -> bytes:
        if self._path != tar:
            self.close()
            self._tf = tarfile.open(tar, "r:*")
            self._path = tar
        assert self._tf is not None
        info = self._tf.getmember(member)
        if info.size > max_bytes:
            raise ValueError(f"member of {info.size} bytes exceeds the limit of {max_bytes} bytes")
        f = self._tf.extractfile(info)
        if f is None:
            raise ValueError("not a regular member")
        return f.read()

    def close(self) -> None:
        if self._tf is not None:
            self._tf.close()
        self._tf = None
        self._path = None


def read_item(item: Item, max_bytes: int, tars: TarReader) -> bytes:
    """The item's bytes; raises OSError/ValueError/tarfile.TarError with the reason."""
    if item.file is not None:
        if item.size > max_bytes:
            raise ValueError(
                f"file of {item.size} bytes exceeds the limit of {max_bytes} bytes (raise --max-file-bytes)"
            )
        with open(item.file, "rb") as f:
            return f.read(max_bytes + 1)
    if item.tar is None or item.member is None:
        raise ValueError("item has neither a file nor a tar member")
    return tars.read(item.tar, item.member, max_bytes)
