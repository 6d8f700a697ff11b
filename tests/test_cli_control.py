"""`flowcore runs cancel` and `flowcore runs resume` (API.md §14-15), driven as a user would:
the console entry point in subprocesses, a project directory with a pipeline module, and a
run of another process to cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowcore import Client, RunStatus, Stack, StepStatus

REPO = Path(__file__).resolve().parent.parent

FLOWS = textwrap.dedent('''
    import asyncio
    import os
    from pathlib import Path

    from flowcore import pipeline, step


    @step
    def load(n: int) -> list[int]:
        Path("load.calls").open("a").write("x")
        return list(range(n))


    @step
    def train(data: list[int]) -> int:
        if Path("FAIL").exists():
            raise RuntimeError("not today")
        return sum(data)


    @pipeline
    def training(n: int = 4) -> None:
        train(load(n))


    also_training = training


    @step(enable_cache=False)
    async def slow() -> int:
        Path("slow.started").write_text("yes")
        await asyncio.sleep(60)
        return 1


    @pipeline
    def long_run() -> None:
        slow()
''')


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory holding flows.py; the CLI's store lives under its .flowcore."""
    (tmp_path / "flows.py").write_text(FLOWS)
    return tmp_path


def env_for(project: Path) -> dict[str, str]:
    return {**os.environ, "FLOWCORE_HOME": str(project / ".flowcore"), "PYTHONPATH": str(REPO)}


def cli(project: Path, *args: str) -> Result:
    proc = subprocess.run([sys.executable, "-m", "flowcore.cli", *args], cwd=project,
                          env=env_for(project), capture_output=True, text=True, timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def client(project: Path) -> Client:
    return Client(Stack.local(project / ".flowcore"))


def test_cancel_of_a_finished_run_prints_its_status(project: Path) -> None:
    """`runs cancel` of a finished run prints its status, changes nothing and exits 0."""
    first = cli(project, "run", "flows:training", "--run-name", "done", "-q")
    assert first.code == 0, first.err
    result = cli(project, "runs", "cancel", "done")
    assert result.code == 0, result.err
    assert result.out.startswith("run done completed")
    assert client(project).get_pipeline_run("done").status is RunStatus.COMPLETED


def test_cancel_of_an_unknown_run_is_a_usage_error(project: Path) -> None:
    """`runs cancel` of a run that does not exist exits 2 naming it."""
    result = cli(project, "runs", "cancel", "nope")
    assert result.code == 2
    assert "no run named 'nope'" in result.err


def test_cancel_stops_a_run_of_another_process(project: Path) -> None:
    """`runs cancel RUN` stops a run that another process is running and prints STOPPED."""
    proc = subprocess.Popen([sys.executable, "-m", "flowcore.cli", "run", "flows:long_run",
                             "--run-name", "far", "-q"], cwd=project, env=env_for(project),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (project / "slow.started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        started = time.monotonic()
        result = cli(project, "runs", "cancel", "far")
        assert result.code == 0, result.err
        assert result.out.strip() == "run far stopped"
        assert time.monotonic() - started < 10
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "run far stopped" in out  # `flowcore run`: not completed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_resume_imports_the_recorded_pipeline_and_reuses_what_finished(project: Path) -> None:
    """`runs resume RUN` imports the pipeline from the run's recorded source, starts a new run
    that reuses the finished step (CACHED, body not run) and runs the failed one."""
    (project / "FAIL").write_text("")
    first = cli(project, "run", "flows:training", "--run-name", "broken", "-q")
    assert first.code == 1
    original = client(project).get_pipeline_run("broken")
    assert original.source == "flows:training"
    (project / "FAIL").unlink()

    result = cli(project, "runs", "resume", "broken", "-q", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    resumed = client(project).get_pipeline_run(doc["name"])
    assert resumed.status is RunStatus.COMPLETED
    assert resumed.resumed_from == original.id
    assert resumed.steps["load"].status is StepStatus.CACHED
    assert resumed.steps["train"].status is StepStatus.COMPLETED
    assert (project / "load.calls").read_text() == "x"  # load's body ran once, in the first run


def test_resume_with_an_explicit_pipeline_and_when_the_source_cannot_be_imported(
    project: Path,
) -> None:
    """`--pipeline MODULE:NAME` overrides the recorded source; a run whose pipeline was defined
    in a script run directly exits 2 and points at --pipeline."""
    (project / "FAIL").write_text("")
    assert cli(project, "run", "flows:training", "--run-name", "b2", "-q").code == 1
    (project / "FAIL").unlink()
    result = cli(project, "runs", "resume", "b2", "--pipeline", "flows:also_training", "-q")
    assert result.code == 0, result.err
    assert " completed" in result.out

    script = project / "direct.py"
    script.write_text(FLOWS + textwrap.dedent('''
        if __name__ == "__main__":
            Path("FAIL").write_text("")
            training.with_options(run_name="scripted")()
    '''))
    subprocess.run([sys.executable, str(script)], cwd=project, env=env_for(project),
                   capture_output=True, text=True, timeout=120)
    assert client(project).get_pipeline_run("scripted").source == "__main__:training"
    missing = cli(project, "runs", "resume", "scripted")
    assert missing.code == 2
    assert "--pipeline" in missing.err
    assert cli(project, "runs", "resume", "nope").code == 2
