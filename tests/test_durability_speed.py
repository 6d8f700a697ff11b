"""What a SIGKILL leaves on the default stack now that dependents start before their upstream
row is committed and small values live inline in their rows: a consistent prefix."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowcore import Client, RunStatus, Stack, StepStatus

REPO = Path(__file__).resolve().parents[1]

SCRIPT = '''
import os, sys, time
from flowcore import Stack, pipeline, step

@step(enable_cache=False)
async def head() -> int:
    return 1000

@step(enable_cache=False)
async def link(x: int, k: int) -> int:
    if k == int(os.environ["STOP_AT"]):
        print("STOPPED-AT", k, flush=True)
        time.sleep(600)  # blocks the loop too: nothing more is committed after this
    return x + k

@step(enable_cache=False)
async def fan(x: int, k: int) -> list[int]:
    return [x, k]

@pipeline(enable_cache=False)
def chained(n: int = 60) -> None:
    x = head()
    for k in range(1, n):
        x = link(x, k=k)
        fan(x, k=k)

if __name__ == "__main__":
    chained.with_options(stack=Stack.local(sys.argv[1]), run_name="doomed")()
'''


def _expected(k: int) -> int:
    return 1000 + k * (k + 1) // 2


@pytest.mark.parametrize("stop_at", [5, 40])
def test_sigkill_leaves_a_consistent_prefix_with_loadable_inline_values(
        tmp_path: Path, stop_at: int) -> None:
    """After SIGKILL mid-run, no committed step row is ahead of its upstream (a started step's
    parents are COMPLETED), every COMPLETED step's inline value loads and is right, and the
    run reads CRASHED with nothing left running."""
    script = tmp_path / "chain.py"
    script.write_text(SCRIPT)
    home = tmp_path / "stack"
    env = {**os.environ, "PYTHONPATH": str(REPO), "STOP_AT": str(stop_at)}
    proc = subprocess.Popen([sys.executable, str(script), str(home)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the body that blocks has started
        assert line.startswith("STOPPED-AT"), proc.stderr.read() if proc.stderr else line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    with sqlite3.connect(home / "flowcore.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {name: (status, json.loads(upstream)) for name, status, upstream in db.execute(
            "SELECT name, status, upstream FROM step_runs")}
    # Ordered writes: a step row that left PENDING has every parent's COMPLETED row committed.
    for name, (status, upstream) in rows.items():
        if status != "pending":
            assert all(rows[p][0] == "completed" for p in upstream), (name, status, upstream)
    assert not any(p.is_dir() for p in (home / "artifacts").glob("*/*"))  # all inline
    run = Client(Stack.local(home)).get_pipeline_run("doomed")
    assert run.status is RunStatus.CRASHED
    assert all(s.status.is_finished for s in run.steps.values())
    links = sorted((sr for sr in run.steps.values() if sr.step_name == "link"),
                   key=lambda sr: sr.config.parameters["k"])
    done = [sr for sr in links if sr.status is StepStatus.COMPLETED]
    assert len(done) <= stop_at - 1
    for sr in done:
        assert sr.output.uri.startswith("inline:")
        assert sr.output.load() == _expected(sr.config.parameters["k"])
    for sr in run.steps.values():
        if sr.step_name == "fan" and sr.status is StepStatus.COMPLETED:
            k = sr.config.parameters["k"]
            assert sr.output.load() == [_expected(k), k]


def test_read_through_a_sync_client_sees_the_upstream_row_while_it_is_queued(
        tmp_path: Path) -> None:
    """A step body calling the sync Client on the loop's own thread (which blocks the loop
    that queued the upstream's row) still reads the upstream COMPLETED with its value."""
    script = tmp_path / "peek.py"
    script.write_text('''
import sys
from flowcore import Client, Stack, get_step_context, pipeline, step

@step(enable_cache=False)
async def first(k: int) -> int:
    return 41 + k

@step(enable_cache=False)
async def peek(x: int) -> int:
    run = Client().get_pipeline_run(get_step_context().pipeline_run.name)
    return run.steps["first"].output.load() + 1

@pipeline(enable_cache=False)
def peeking() -> None:
    peek(first(k=0))

import flowcore
flowcore.set_active_stack(Stack.local(sys.argv[1]))
for _ in range(5):
    print(peeking().steps["peek"].output.load())
''')
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42"] * 5
    assert time.monotonic() - started < 60
