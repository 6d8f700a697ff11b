"""Two "hosts" sharing only a PostgreSQL database and an S3 bucket (API.md §18): two driver
processes with different home and working directories see each other's cache entries, run
names, crashes and runs to resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

PIPELINES = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    from flowcore import pipeline, step


    @step
    def make(n: int) -> list[int]:
        return list(range(n))


    @step
    def total(values: list[int]) -> int:
        marker = os.environ.get("HANG_MARKER")
        if marker:
            Path(marker).write_text("started")
            time.sleep(120)
        return sum(values)


    @pipeline
    def shared(n: int = 10) -> None:
        total(make(n))
''')

DRIVER = textwrap.dedent('''
    import json
    import sys

    from flowcore import Client, FlowcoreError, Stack
    from shared_pipelines import shared

    spec = json.loads(sys.argv[1])
    stack = Stack.from_urls(metadata=spec["metadata"], artifacts=spec["artifacts"],
                            storage_options=spec["storage_options"])
    options = {"stack": stack, **spec.get("options", {})}
    out = {}
    try:
        if spec["do"] == "run":
            run = shared.with_options(**options)(n=spec.get("n", 10))
        else:
            run = Client(stack).get_pipeline_run(spec["run"])
        out = {"name": run.name, "status": run.status.value,
               "steps": {k: s.status.value for k, s in run.steps.items()},
               "total": run.steps["total"].output.load() if run.steps["total"].outputs else None,
               "resumed_from": run.resumed_from}
    except FlowcoreError as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    print("RESULT " + json.dumps(out))
''')


class Host:
    """One driver machine: its own home and working directory, the shared code and stores."""

    def __init__(self, root: Path, code: Path, stores: Any, heartbeat_timeout: float) -> None:
        self.cwd = root / "work"
        self.cwd.mkdir(parents=True)
        self.env = {**os.environ, "HOME": str(root / "home"), "FLOWCORE_HOME": str(root / "fc"),
                    "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
        self.env.pop("FLOWCORE_STACK", None)
        self.driver = code / "driver.py"
        self.spec = {"metadata": f"{stores.metadata}?heartbeat_timeout={heartbeat_timeout}",
                     "artifacts": stores.artifacts, "storage_options": stores.storage_options}

    def command(self, **spec: Any) -> list[str]:
        return [sys.executable, str(self.driver), json.dumps({**self.spec, **spec})]

    def call(self, extra_env: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
        """Run the driver to the end and return what it printed."""
        done = subprocess.run(self.command(**spec), cwd=self.cwd, env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=120)
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                result: dict[str, Any] = json.loads(line[len("RESULT "):])
                return result
        raise AssertionError(f"driver printed no result:\n{done.stdout}\n{done.stderr}")


@pytest.fixture
def hosts(tmp_path: Path, shared_stores: Any) -> tuple[Host, Host]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "shared_pipelines.py").write_text(PIPELINES)
    (code / "driver.py").write_text(DRIVER)
    return (Host(tmp_path / "a", code, shared_stores, 3.0),
            Host(tmp_path / "b", code, shared_stores, 3.0))


def test_cache_hits_and_run_names_are_shared_across_hosts(hosts: tuple[Host, Host]) -> None:
    """A run on host A is a cache hit for the same run on host B (its outputs load there), and
    a name used on A is a RunNameConflictError on B."""
    a, b = hosts
    first = a.call(do="run", options={"run_name": "first"})
    assert first["status"] == "completed" and first["total"] == 45
    second = b.call(do="run")
    assert second["status"] == "completed"
    assert second["steps"] == {"make": "cached", "total": "cached"}
    assert second["total"] == 45
    clash = b.call(do="run", options={"run_name": "first", "enable_cache": False})
    assert clash["error"] == "RunNameConflictError" and "first" in clash["message"]
    assert b.call(do="get", run="first")["status"] == "completed"


def test_a_crash_on_one_host_is_seen_and_resumed_by_the_other(
    hosts: tuple[Host, Host], tmp_path: Path
) -> None:
    """Host A is SIGKILLed in the middle of a run; host B sees the run CRASHED once A's
    heartbeat lapses (no pid can tell across hosts), then resumes it: the finished step is
    reused, the rest runs on B."""
    a, b = hosts
    marker = tmp_path / "started"
    proc = subprocess.Popen(a.command(do="run", options={"run_name": "crashy"}), cwd=a.cwd,
                            env={**a.env, "HANG_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "host A ended before its step started"
            assert time.monotonic() < deadline, "host A never started its second step"
            time.sleep(0.05)
        assert b.call(do="get", run="crashy")["status"] == "running"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    seen = b.call(do="get", run="crashy")
    while seen["status"] != "crashed":
        assert time.monotonic() < deadline, f"host B never saw the run crash: {seen}"
        time.sleep(0.5)
        seen = b.call(do="get", run="crashy")
    assert seen["steps"]["make"] == "completed"
    assert seen["steps"]["total"] in ("stopped", "crashed")
    resumed = b.call(do="run", options={"resume_from": "crashy", "enable_cache": False})
    assert resumed["status"] == "completed", resumed
    assert resumed["steps"] == {"make": "cached", "total": "completed"}
    assert resumed["total"] == 45
    assert resumed["resumed_from"]
