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
from typing import Any

from flowcore._threads import run_in_worker_thread
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
        return copy.deepcopy(value)
    return await run_in_worker_thread(copy.deepcopy, value)
