"""A pipeline whose three steps contend for a pool of one slot (run it on a stack made with
`.with_pools(gpu=1)`): shared by the progress, report and CLI tests of waited time."""

from __future__ import annotations

import time

from flowcore import pipeline, step


@step(enable_cache=False, pool="gpu")
def on_gpu(i: int) -> int:
    time.sleep(0.15)
    return i


@pipeline
def contended() -> None:
    for i in range(3):
        on_gpu(i)
