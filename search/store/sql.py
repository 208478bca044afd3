"""SQL helpers of the store: the one IN-list chunking helper and its placeholders."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import TypeVar

T = TypeVar("T")

#: SQLite's default limit on bound parameters is 999 (32766 since 3.32); 500 per IN list leaves room for others.
IN_LIST_SIZE = 500


def chunks(seq: Iterable[T], size: int = IN_LIST_SIZE) -> Iterator[list[T]]:
    """`seq` in consecutive lists of at most `size` items (the last may be shorter; none when `seq` is empty)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    items = seq if isinstance(seq, Sequence) else list(seq)
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def marks(items: Sized) -> str:
    """`?,?,?` with one placeholder per item, for `IN (...)`."""
    return ",".join("?" * len(items))
