"""Values are isolated: a step that changes an input in place changes nothing anyone else sees.

Each consumer of an upstream value (a step input, a mapped element, a hook's `step_output`)
gets its own deep copy of it, unless the value is immutable (ints, strs, tuples of them, ...),
which stay shared and free. Copy-on-read was chosen over a hash check after the body (a full
hash per consumer, before and after, even when nothing changed, and a mutation found only
after another consumer may have seen it) and over per-consumer loads (a deserialisation per
consumer, and none possible on the in-memory stack); the copy is flowcore's own fast deep copy,
measured in benchmarks/README.md. A copy of a value that is not small runs in a worker
thread, so the event loop never copies more than ~64 KB.
"""

from __future__ import annotations

from typing import Any

from flowcore._threads import run_in_worker_thread
from flowcore.materializers._copying import deep_copy
from flowcore.materializers._estimate import SCALARS, is_immutable, roughly_small

__all__ = ["SHARED", "isolated"]

# Scalar types consumers share without a look: the hot path's one check.
SHARED = SCALARS


async def isolated(value: Any) -> Any:
    """The value itself if it is immutable, else a deep copy (made off the loop if large).

    Raises:
        Exception: whatever `copy.deepcopy` raises for a value that cannot be copied; the
            caller then loads a fresh value from the stored artifact instead.
    """
    if type(value) in SCALARS or is_immutable(value):
        return value
    if roughly_small(value):
        return deep_copy(value, {})
    return await run_in_worker_thread(deep_copy, value, {})
