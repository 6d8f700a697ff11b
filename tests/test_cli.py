"""The `flowcore` console script, driven in subprocesses against a real SQLite store: runs
list/show/logs/delete, cache clear, `flowcore run`, live progress on a terminal, and
one-line errors with exit code 2."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _pool_pipelines import contended

from flowcore import Client, Stack
from flowcore._runview import format_duration, waited_noticeably
from flowcore.cli._output import _step_time

FLOWS = textwrap.dedent('''
    import logging
    import time

    from flowcore import StepRetryConfig, get_step_context, pipeline, step

    log = logging.getLogger("cli_flows")


    @step
    def load(n: int = 3) -> list[int]:
        print(f"loading {n} items")
        log.warning("load saw n=%d", n)
        return list(range(n))


    @step(enable_cache=False, retry=StepRetryConfig(max_retries=2, delay=0.6))
    def flaky(data: list[int]) -> int:
        if get_step_context().step_run.attempt < 2:
            raise ConnectionError("service unavailable")
        print("flaky made it")
        return max(data)


    @step(enable_cache=False)
    def total(data: list[int]) -> int:
        time.sleep(0.1)
        return sum(data)


    @step(enable_cache=False)
    def boom(value: int) -> None:
        raise ValueError(f"bad total {value}")


    @pipeline
    def demo(n: int = 3, fail: bool = True) -> None:
        data = load(n)
        flaky(data)
        value = total(data)
        if fail:
            boom(value)


    @step(enable_cache=False)
    def typed(i: int, f: float, b: bool, s: str) -> str:
        return f"{i!r} {f!r} {b!r} {s!r}"


    @pipeline
    def params(i: int, f: float, b: bool, s: str) -> None:
        typed(i, f, b, s)


    @pipeline
    def other() -> None:
        load(1, step_name="only")


    @step(enable_cache=False)
    def sleepy() -> None:
        time.sleep(3)


    @pipeline
    def long() -> None:
        sleepy()


    not_a_pipeline = 42
''')

BROKEN = "import flowcore\nraise RuntimeError('this module is broken')\n"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Store:
    """A directory with the flows module and a FLOWCORE_HOME store next to it."""

    cwd: Path
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLOWCORE_", "PYTEST_", "COV_"))}
        env.update(FLOWCORE_HOME=str(self.home), PYTHONUNBUFFERED="1", **extra)
        env.pop("NO_COLOR", None)
        env.pop("FORCE_COLOR", None)
        return env

    def cli(self, *args: str, timeout: float = 120) -> Result:
        proc = subprocess.run([sys.executable, "-m", "flowcore.cli", *args], cwd=self.cwd,
                              env=self.env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        return Result(proc.returncode, proc.stdout, proc.stderr)


def make_store(root: Path) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cli_flows.py").write_text(FLOWS)
    (root / "broken_flows.py").write_text(BROKEN)
    return Store(cwd=root, home=root / "home")


@dataclass
class Populated:
    store: Store
    failed: Result
    completed: Result
    other: Result

    @property
    def failed_name(self) -> str:
        return last_line(self.failed.out).split()[1]

    @property
    def completed_name(self) -> str:
        return str(self.completed.json()["name"])

    @property
    def other_name(self) -> str:
        return last_line(self.other.out).split()[1]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """A store with three runs: demo failed, demo completed (load cached), other completed."""
    store = make_store(tmp_path_factory.mktemp("cli"))
    failed = store.cli("run", "cli_flows:demo")
    completed = store.cli("run", "cli_flows:demo", "--param", "fail=false", "--json")
    other = store.cli("run", "cli_flows:other")
    return Populated(store, failed, completed, other)


def last_line(text: str) -> str:
    """The last line of an output (what steps printed comes before it)."""
    return text.strip().splitlines()[-1]


def one_line_error(result: Result, *needles: str) -> None:
    """Exit code 2, nothing on stdout, one line on stderr naming what is wrong."""
    assert result.code == 2, result
    assert "Traceback" not in result.err, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("flowcore: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def rows(text: str) -> dict[str, list[str]]:
    """A plain-text table's rows by their first cell."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


# -- the console script ------------------------------------------------------------------


def test_console_script_is_installed_and_runs(tmp_path: Path) -> None:
    """`pip install -e .` installs a `flowcore` console script that prints its version."""
    script = shutil.which("flowcore", path=str(Path(sys.executable).parent)) or shutil.which(
        "flowcore")
    assert script is not None, "no `flowcore` script: run `pip install -e .`"
    store = make_store(tmp_path)
    proc = subprocess.run([script, "--version"], capture_output=True, text=True,
                          env=store.env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "flowcore 0.1.0", proc
    proc = subprocess.run([script, "runs", "list"], capture_output=True, text=True,
                          env=store.env(), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "No runs.", proc


def test_help_and_missing_command(tmp_path: Path) -> None:
    """`--help` exits 0 listing the commands; no command prints usage and exits 2."""
    store = make_store(tmp_path)
    helped = store.cli("--help")
    assert helped.code == 0 and all(c in helped.out for c in ("runs", "cache", "run"))
    bare = store.cli()
    assert bare.code == 2 and "usage: flowcore" in bare.err
    missing = store.cli("runs", "show")
    one_line_error(missing, "RUN")


# -- flowcore run ------------------------------------------------------------------------


def test_run_of_a_failing_pipeline_exits_1_and_names_the_failed_step(populated: Populated
                                                                     ) -> None:
    """A failed run prints its name and status, names the failed step, and exits 1."""
    r = populated.failed
    assert r.code == 1, r
    assert r.out.splitlines()[0] == "loading 3 items"  # the step's own print
    line = last_line(r.out).split()
    assert line[0] == "run" and line[1].startswith("demo-") and line[2] == "failed", r.out
    assert "step 'boom' failed: ValueError: bad total 3" in r.err
    assert "Traceback" not in r.err


def test_run_with_params_completes_and_reuses_the_cache(populated: Populated) -> None:
    """`--param fail=false` gives a completed run (exit 0) whose `load` step was cached."""
    r = populated.completed
    assert r.code == 0, r
    data = r.json()
    assert data["status"] == "completed" and data["parameters"] == {"fail": False}
    steps = {s["name"]: s for s in data["steps"]}
    assert set(steps) == {"load", "flaky", "total"}
    assert steps["load"]["status"] == "cached" and steps["load"]["cached"] is True
    assert steps["flaky"]["attempts"] == 2
    assert "loading" not in r.out  # --json keeps stdout for the JSON alone


def test_run_shows_plain_progress_lines_when_not_on_a_terminal(populated: Populated) -> None:
    """Off a terminal the progress is plain lines: starts, retries, cached, failures."""
    err = populated.failed.err
    assert "\x1b[" not in err and "\x1b[" not in populated.failed.out
    assert f"run {populated.failed_name} started: pipeline demo, 4 steps" in err
    assert "flaky: attempt 1 failed (ConnectionError('service unavailable')), retrying in" in err
    assert "flaky: completed in" in err and "after 2 attempts" in err
    assert "boom: failed after 1 attempt: ValueError: bad total 3" in err
    assert f"run {populated.failed_name} failed in" in err
    assert "load: cached" in populated.completed.err


def test_param_values_are_parsed_as_yaml_scalars(tmp_path: Path) -> None:
    """`--param` values become ints, floats, bools and strings (the typed step accepts them)."""
    store = make_store(tmp_path)
    r = store.cli("run", "cli_flows:params", "--param", "i=3", "--param", "f=0.5",
                  "--param", "b=true", "--param", "s=hello world", "--json", "--quiet")
    assert r.code == 0, r
    assert r.json()["parameters"] == {"i": 3, "f": 0.5, "b": True, "s": "hello world"}
    assert r.err == ""  # --quiet: no progress


def test_run_applies_a_yaml_config_and_a_run_name(tmp_path: Path) -> None:
    """`--config` applies a run configuration file; `--run-name` names the run."""
    store = make_store(tmp_path)
    (tmp_path / "run.yaml").write_text("parameters: {n: 2, fail: false}\nenable_cache: false\n")
    r = store.cli("run", "cli_flows:demo", "--config", "run.yaml", "--run-name", "nightly_{date}",
                  "--json")
    assert r.code == 0, r
    data = r.json()
    assert data["name"].startswith("nightly_") and data["parameters"] == {"n": 2, "fail": False}
    assert {s["name"]: s["status"] for s in data["steps"]}["load"] == "completed"
    one_line_error(store.cli("run", "cli_flows:demo", "--config", "missing.yaml"),
                   "no config file 'missing.yaml'")


def test_a_file_path_target_works(tmp_path: Path) -> None:
    """`flowcore run path/to/flows.py:pipeline` imports the file by its path."""
    store = make_store(tmp_path / "project")
    r = Store(cwd=tmp_path, home=store.home).cli("run", "project/cli_flows.py:other", "-q")
    assert r.code == 0, r
    assert last_line(r.out).startswith("run other-") and last_line(r.out).endswith(" completed")


@pytest.mark.parametrize(("target", "needle"), [
    ("no_such_module:demo", "no module named 'no_such_module'"),
    ("cli_flows:nothere", "module 'cli_flows' has no attribute 'nothere' (pipelines there: "),
    ("cli_flows:not_a_pipeline", "is an int, not a pipeline"),
    ("cli_flows", "is not module:pipeline"),
    ("broken_flows:demo", "importing 'broken_flows' failed: RuntimeError: this module is broken"),
    ("missing_dir/flows.py:demo", "no file 'missing_dir/flows.py'"),
])
def test_bad_module_paths_are_one_line_and_exit_2(tmp_path: Path, target: str,
                                                  needle: str) -> None:
    """A bad `module:pipeline` is one clear error line, exit code 2, and no run recorded."""
    store = make_store(tmp_path)
    one_line_error(store.cli("run", target), needle)
    assert store.cli("runs", "list", "--json").json() == []


@pytest.mark.parametrize(("param", "needle"), [
    ("n", "bad parameter 'n': expected key=value"),
    ("=3", "bad parameter '=3'"),
    ("zz=1", "pipeline 'demo' has no parameter 'zz' (parameters: n, fail)"),
    ("n=[1,", "bad parameter 'n=[1,': the value is not valid YAML"),
])
def test_bad_params_are_one_line_and_exit_2(tmp_path: Path, param: str, needle: str) -> None:
    """A malformed or unknown `--param` is one clear error line, exit code 2, and no run."""
    store = make_store(tmp_path)
    one_line_error(store.cli("run", "cli_flows:demo", "--param", param), needle)
    assert store.cli("runs", "list", "--json").json() == []


def test_ctrl_c_stops_the_run_and_exits_130(tmp_path: Path) -> None:
    """SIGINT during `flowcore run` records the run as STOPPED, says so, and exits 130."""
    store = make_store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "flowcore.cli", "run", "cli_flows:long"],
                            cwd=store.cwd, env=store.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "sleepy: running" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "sleepy: stopped" in err and err.rstrip().endswith("flowcore: interrupted")
    assert "Traceback" not in err
    runs = store.cli("runs", "list", "--json").json()
    assert [(r["status"], r["step_counts"]) for r in runs] == [("stopped", {"stopped": 1})]


# -- runs list / show / logs -------------------------------------------------------------


def test_runs_list_is_a_plain_table_newest_first(populated: Populated) -> None:
    """`runs list` off a terminal is a plain table of every run, newest first."""
    r = populated.store.cli("runs", "list")
    assert r.code == 0 and "\x1b[" not in r.out, r
    lines = r.out.splitlines()
    assert lines[0].split() == ["RUN", "PIPELINE", "STATUS", "STARTED", "DURATION", "STEPS"]
    assert [line.split()[0] for line in lines[1:]] == [
        populated.other_name, populated.completed_name, populated.failed_name]
    table = rows(r.out)
    assert table[populated.failed_name][1:3] == ["demo", "failed"]
    assert " ".join(table[populated.completed_name]).endswith("2 completed, 1 cached")


def test_runs_list_filters_and_json(populated: Populated) -> None:
    """`--pipeline`, `--status` and `--limit` filter the listing; `--json` is for scripts."""
    cli = populated.store.cli
    names = [r["name"] for r in cli("runs", "list", "--json").json()]
    assert names == [populated.other_name, populated.completed_name, populated.failed_name]
    assert [r["name"] for r in cli("runs", "list", "-p", "other", "--json").json()] == [
        populated.other_name]
    failed = cli("runs", "list", "--status", "failed", "--json").json()
    assert [r["name"] for r in failed] == [populated.failed_name]
    assert failed[0]["step_counts"] == {"completed": 3, "failed": 1}
    assert failed[0]["duration"] > 0.6  # it waited for flaky's retry
    assert len(cli("runs", "list", "--limit", "1", "--json").json()) == 1
    assert cli("runs", "list", "--pipeline", "nope").out.strip() == "No runs of pipeline 'nope'."
    bad = cli("runs", "list", "--status", "sleeping")
    one_line_error(bad, "invalid choice: 'sleeping'")


def test_runs_show_lists_every_step_with_attempts_cache_and_error(populated: Populated) -> None:
    """`runs show` prints the run's facts and one row per step: status, attempts, duration,
    cached, error summary."""
    r = populated.store.cli("runs", "show", populated.failed_name)
    assert r.code == 0, r
    head, _, table = r.out.partition("\n\n")
    facts = dict(line.split(None, 1) for line in head.splitlines())
    assert facts["run"] == populated.failed_name and facts["status"] == "failed"
    assert facts["pipeline"] == "demo" and facts["steps"] == "3 completed, 1 failed"
    lines = table.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "ATTEMPTS", "DURATION", "CACHED", "ERROR"]
    assert lines[1].split()[0] == "load"  # graph order: the root first
    steps = rows(table)
    assert steps["flaky"][1:3] == ["completed", "2"] and steps["flaky"][4] == "no"
    assert steps["boom"][1:3] == ["failed", "1"]
    assert " ".join(steps["boom"][5:]) == "ValueError: bad total 3"
    cached = rows(populated.store.cli("runs", "show", populated.completed_name).out)
    assert cached["load"][1] == "cached" and cached["load"][4] == "yes"


def test_runs_show_json_and_lookup_by_id(populated: Populated) -> None:
    """`runs show --json` has every step with timings, error and upstream IDs; runs are found
    by id too."""
    data = populated.store.cli("runs", "show", populated.failed_name, "--json").json()
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["boom"]["error"] == {"type": "ValueError", "message": "bad total 3"}
    assert steps["boom"]["upstream"] == ["total"]
    assert sorted(steps["flaky"]["upstream"]) == ["load"]
    assert steps["total"]["duration"] >= 0.1
    by_id = populated.store.cli("runs", "show", data["id"], "--json").json()
    assert by_id["name"] == populated.failed_name


def test_runs_show_json_has_the_time_each_step_waited_for_a_pool_slot(tmp_path: Path) -> None:
    """`runs show --json` gives each step's seconds spent waiting for a pool slot (0 for a
    step that never waited), and a step's table duration names its wait."""
    store = make_store(tmp_path)
    run = contended.with_options(stack=Stack.local(store.home).with_pools(gpu=1))()
    shown = store.cli("runs", "show", run.name, "--json")
    assert shown.code == 0, shown
    steps = {s["name"]: s for s in shown.json()["steps"]}
    assert {name: round(s["waited"], 6) for name, s in steps.items()} == {
        name: round(s.waited, 6) for name, s in run.steps.items()}
    assert sorted(s["waited"] for s in steps.values())[-1] > 0.2
    stored = Client(Stack.local(store.home)).get_pipeline_run(run.name)
    for s in stored.steps.values():
        cell = _step_time(s)
        assert cell.startswith(format_duration(s.duration))
        assert cell.endswith(f" (waited {format_duration(s.waited)})") == waited_noticeably(s.waited)


def test_runs_logs_prints_what_a_step_printed_and_logged(populated: Populated) -> None:
    """`runs logs RUN STEP` prints that step's captured prints and log records only."""
    cli = populated.store.cli
    load = cli("runs", "logs", populated.failed_name, "load")
    assert load.code == 0
    assert load.out.splitlines() == ["loading 3 items", "WARNING cli_flows: load saw n=3"]
    flaky = cli("runs", "logs", populated.failed_name, "flaky", "--json").json()
    assert flaky == {"run": populated.failed_name, "step": "flaky", "logs": "flaky made it\n"}
    quiet = cli("runs", "logs", populated.failed_name, "total")
    assert quiet.code == 0 and quiet.out == "" and "printed and logged nothing" in quiet.err
    one_line_error(cli("runs", "logs", populated.failed_name, "nope"),
                   "has no step 'nope' (steps: ")


@pytest.mark.parametrize("command", [
    ["runs", "show", "no-such-run"],
    ["runs", "show", "no-such-run", "--json"],
    ["runs", "logs", "no-such-run", "load"],
    ["runs", "delete", "no-such-run", "--yes"],
    ["runs", "report", "no-such-run"],
])
def test_unknown_run_is_one_line_and_exit_2(populated: Populated, command: list[str]) -> None:
    """Every command given an unknown run name says so in one line and exits 2."""
    r = populated.store.cli(*command)
    one_line_error(r, "no run named 'no-such-run'")
    assert r.out == ""


# -- delete and cache clear --------------------------------------------------------------


def test_delete_and_cache_clear(tmp_path: Path) -> None:
    """`runs delete` removes a run; `cache clear` (all, or one pipeline) makes the next run
    execute its cacheable steps again."""
    store = make_store(tmp_path)
    first = store.cli("run", "cli_flows:demo", "--param", "fail=false", "--json", "-q").json()
    second = store.cli("run", "cli_flows:demo", "--param", "fail=false", "--json", "-q").json()
    assert {s["name"]: s["status"] for s in second["steps"]}["load"] == "cached"

    assert store.cli("cache", "clear", "--pipeline", "other", "--json").json() == {
        "cleared": 0, "pipeline": "other"}
    cleared = store.cli("cache", "clear", "--pipeline", "demo")
    assert cleared.code == 0 and cleared.out == "cleared 1 cache entry of pipeline 'demo'\n"
    third = store.cli("run", "cli_flows:demo", "--param", "fail=false", "--json", "-q").json()
    assert {s["name"]: s["status"] for s in third["steps"]}["load"] == "completed"
    assert store.cli("cache", "clear").out == "cleared 1 cache entry\n"

    deleted = store.cli("runs", "delete", first["name"], "--yes")
    assert deleted.code == 0 and deleted.out == f"deleted run {first['name']}\n"
    assert [r["name"] for r in store.cli("runs", "list", "--json").json()] == [
        third["name"], second["name"]]
    one_line_error(store.cli("runs", "show", first["name"]), "no run named")


# -- terminals ---------------------------------------------------------------------------


def in_pty(store: Store, argv: list[str], *, block_rich: bool = False,
           timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (120x40) as its stdin, stdout and stderr."""
    prelude = "import sys; sys.modules['rich'] = None; " if block_rich else "import sys; "
    code = prelude + f"from flowcore.cli import main; sys.exit(main({argv!r}))"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = store.env(TERM="xterm-256color")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=store.cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{argv} did not finish in {timeout}s")
    finally:
        os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_run_on_a_terminal_shows_a_live_table_with_a_retry_countdown(tmp_path: Path) -> None:
    """On a terminal `flowcore run` redraws a live table (cursor control, colours), shows the
    retry countdown, and ends with every step's final status."""
    store = make_store(tmp_path)
    code, screen = in_pty(store, ["run", "cli_flows:demo"])
    assert code == 1, screen
    assert "\x1b[?25l" in screen and "\x1b[2K" in screen  # cursor hidden, lines redrawn
    assert "retry in 0." in screen
    final = screen[max(screen.rindex("\x1b[?25h") - 2000, 0):]  # around the last frame
    for name, status in [("load", "completed"), ("flaky", "completed"), ("boom", "failed")]:
        assert name in final and status in final, final
    assert "ValueError: bad total 3" in final
    assert "Traceback" not in screen


def test_listing_on_a_terminal_uses_colour(populated: Populated) -> None:
    """On a terminal `runs list` is a rich table with coloured statuses."""
    code, screen = in_pty(populated.store, ["runs", "list"])
    assert code == 0 and populated.failed_name in screen
    assert "\x1b[" in screen and "failed" in screen


def test_without_rich_the_cli_falls_back_to_plain_text_on_a_terminal(populated: Populated,
                                                                     tmp_path: Path) -> None:
    """With rich not importable, listings and `flowcore run` still work as plain text."""
    code, screen = in_pty(populated.store, ["runs", "show", populated.failed_name],
                          block_rich=True)
    assert code == 0 and "\x1b[" not in screen, screen
    assert "ValueError: bad total 3" in screen
    code, screen = in_pty(make_store(tmp_path), ["run", "cli_flows:other"], block_rich=True)
    assert code == 0 and "\x1b[" not in screen, screen
    assert "only: running" in screen and "only: completed in" in screen
    assert "run other-" in screen
