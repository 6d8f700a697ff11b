"""Cheap, bounded looks at a value: is it surely small, can it never change?

The stores decide with these whether a value may be encoded, hashed or copied on the event
loop (only when it is surely about 64 KB or less) or must go to a worker thread. Both look at
a bounded number of items, so deciding costs little even for a value of millions of items.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import pathlib
import uuid
from typing import Any

__all__ = ["SCALARS", "SMALL_BYTES", "is_immutable", "roughly_small"]

# What "small" means everywhere in flowcore: a value this size or less may be handled on the
# event loop; anything larger is encoded, hashed and copied in worker threads.
SMALL_BYTES = 64 * 1024

# A walk visits at most this many items; every leaf is counted as at least ~8 bytes, so
# 2,000 leaves stay well under SMALL_BYTES.
_LEAVES = 2_000

# Types whose instances cannot change (enum members are singletons, so they count too).
SCALARS: frozenset[type] = frozenset({
    int, float, complex, str, bytes, bool, type(None), range, decimal.Decimal,
    fractions.Fraction, datetime.date, datetime.datetime, datetime.time, datetime.timedelta,
    datetime.timezone, uuid.UUID, pathlib.PurePosixPath, pathlib.PosixPath, type(Ellipsis),
})


def is_immutable(value: Any, depth: int = 0) -> bool:
    """Whether nothing reachable from `value` can be changed in place (a bounded look:
    deep or long tuples are answered False, which only costs a copy)."""
    kind = type(value)
    if kind in SCALARS or isinstance(value, enum.Enum | type):
        return True
    if depth < 4 and (kind is tuple or kind is frozenset):
        return len(value) <= _LEAVES and all(is_immutable(v, depth + 1) for v in value)
    return False


def roughly_small(value: Any, limit: int = SMALL_BYTES) -> bool:
    """True only if `value` is surely about `limit` bytes or less in any encoding flowcore
    uses. Looks at no more than ~2,000 items; anything it cannot size is not small."""
    budget = _LEAVES
    size = 0
    pending = [value]
    while pending:
        item = pending.pop()
        budget -= 1
        size += 8  # every item costs a few bytes (a number, a separator, a pointer)
        if budget < 0:
            return False
        kind = type(item)
        if kind is str or kind is bytes or kind is bytearray:
            # A str may take up to 6 bytes a character once JSON-escaped.
            size += 6 * len(item)
            if size > limit:
                return False
        elif kind in SCALARS or isinstance(item, enum.Enum):
            continue
        elif kind is list or kind is tuple or kind is set or kind is frozenset:
            if len(item) > budget:
                return False
            pending.extend(item)
        elif kind is dict:
            if 2 * len(item) > budget:
                return False
            pending.extend(item.keys())
            pending.extend(item.values())
        else:
            nbytes = getattr(item, "nbytes", None)  # numpy arrays and scalars
            if isinstance(nbytes, int):
                size += nbytes
                if size > limit or getattr(getattr(item, "dtype", None), "kind", "") == "O":
                    return False
                continue
            fields = getattr(item, "__dict__", None)  # dataclasses, pydantic models, objects
            if type(fields) is not dict or len(fields) > budget:
                return False
            pending.extend(fields.values())
    return True
