"""flowcore's worker-thread pool (sync step bodies, hooks, large-value work): a thread is added
only when none is idle, never beyond the limit, and no lock is shared with the event loop."""

from __future__ import annotations

import threading
import time

from flowcore._threads import _DaemonPool


def test_idle_workers_are_reused_and_the_pool_grows_only_when_all_are_busy() -> None:
    """Work handed over one piece at a time runs on one thread; work that blocks in parallel
    gets a thread each, up to the limit, and the rest waits for a free one."""
    pool = _DaemonPool(limit=4)
    names = set()
    for _ in range(20):
        names.add(pool.submit(lambda: threading.current_thread().name).result(timeout=5))
        time.sleep(0.002)  # the worker is idle again (it left its token)
    assert len(names) == 1

    release = threading.Event()
    running = []

    def block() -> str:
        running.append(1)
        release.wait(5)
        return threading.current_thread().name

    futures = [pool.submit(block) for _ in range(6)]
    deadline = time.monotonic() + 5
    while len(running) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    assert len(running) == 4  # the limit: two pieces wait for a free worker
    release.set()
    done = {f.result(timeout=5) for f in futures}
    assert len(done) <= 4
    assert pool._threads == 4


def test_a_cancelled_piece_never_runs() -> None:
    """Work whose future was cancelled before a worker took it is skipped."""
    pool = _DaemonPool(limit=1)
    release = threading.Event()
    ran = []
    first = pool.submit(lambda: release.wait(5))
    second = pool.submit(lambda: ran.append(1))
    assert second.cancel()
    release.set()
    first.result(timeout=5)
    pool.submit(lambda: None).result(timeout=5)
    assert ran == []
