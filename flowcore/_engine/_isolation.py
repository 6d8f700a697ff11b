"""Values are isolated: a step that changes an input in place changes nothing anyone else sees.

Each consumer of an upstream value (a step input, a mapped element, a hook's `step_output`)
gets its own deep copy of it, unless the value is immutable (ints, strs, tuples of them, ...),
which stay shared and free. Copy-on-read was chosen by measurement over a hash check after the
body (which costs a full hash per consumer even when nothing changed, and finds a mutation
only after it happened) and over per-consumer loads (a deserialisation per consumer, and none
possible on the in-memory stack): see benchmarks/README.md. A copy of a value that is not
small runs in a worker thread, so the event loop never copies more than ~64 KB.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import enum
import fractions
import pathlib
import uuid
from typing import Any

from flowcore._threads import run_in_worker_thread

__all__ = ["SHARED", "is_immutable", "isolated", "roughly_small"]

# Types whose instances cannot change (for enums: members are singletons).
_SCALARS: frozenset[type] = frozenset({
    int, float, complex, str, bytes, bool, type(None), range, decimal.Decimal,
    fractions.Fraction, datetime.date, datetime.datetime, datetime.time, datetime.timedelta,
    datetime.timezone, uuid.UUID, pathlib.PurePosixPath, pathlib.PosixPath, type(Ellipsis),
})

# Scalar types consumers share without a look: the hot path's one check.
SHARED = _SCALARS

# Below this many leaves (and string/bytes lengths) a value is well under 64 KB.
_SMALL_LEAVES = 2_000
_SMALL_BYTES = 64 * 1024


def is_immutable(value: Any, depth: int = 0) -> bool:
    """Whether nothing reachable from `value` can be changed in place (bounded look)."""
    t = type(value)
    if t in _SCALARS or isinstance(value, enum.Enum | type):
        return True
    if depth < 4 and (t is tuple or t is frozenset):
        return len(value) <= _SMALL_LEAVES and all(is_immutable(v, depth + 1) for v in value)
    return False


def roughly_small(value: Any) -> bool:
    """A cheap upper-bound estimate: True only if `value` is surely small (about 64 KB or
    less). Looks at no more than ~2,000 items, so deciding costs little on the loop."""
    budget = _SMALL_LEAVES
    stack = [value]
    while stack:
        v = stack.pop()
        budget -= 1
        if budget < 0:
            return False
        t = type(v)
        if t in (str, bytes, bytearray):
            if len(v) > _SMALL_BYTES:
                return False
        elif t in _SCALARS:
            continue
        elif t in (list, tuple, set, frozenset):
            if len(v) > budget:
                return False
            stack.extend(v)
        elif t is dict:
            if 2 * len(v) > budget:
                return False
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            nbytes = getattr(v, "nbytes", None)  # numpy arrays and friends
            if isinstance(nbytes, int):
                if nbytes > _SMALL_BYTES:
                    return False
                continue
            state = getattr(v, "__dict__", None)
            if state is None:
                return False  # an object we cannot size: treat as large
            stack.extend(state.values())
    return True


async def isolated(value: Any) -> Any:
    """The value itself if it is immutable, else a deep copy (made off the loop if large).

    Raises:
        Exception: whatever `copy.deepcopy` raises for a value that cannot be copied; the
            caller then loads a fresh value from the stored artifact instead.
    """
    if type(value) in _SCALARS or is_immutable(value):
        return value
    if roughly_small(value):
        return copy.deepcopy(value)
    return await run_in_worker_thread(copy.deepcopy, value)
