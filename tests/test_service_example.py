"""The example service (examples/service.py) driven over real HTTP on 127.0.0.1: uvicorn in a
subprocess with its own flowcore home, an httpx client, SIGTERM and SIGKILL of the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowcore import Client, RunStatus, Stack, StepStatus

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "examples" / "service.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One `python examples/service.py --port P --home DIR` process and a client for it."""

    def __init__(self, home: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCORE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.log = log
        for _ in range(3):  # another process may take the free port before uvicorn binds it
            port = _free_port()
            with log.open("a") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, str(SERVICE), "--port", str(port), "--home", str(home)],
                    env=env, stdout=out, stderr=subprocess.STDOUT,
                )
            self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            if self._answers():
                return
            self.stop(signal.SIGKILL)
        raise AssertionError(f"the service never answered:\n{log.read_text()}")

    def _answers(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                return self.http.get("/runs/no-such-run").status_code == 404
            except httpx.TransportError:
                time.sleep(0.1)
        return False

    def start(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/runs", json=body)
        assert response.status_code == (200 if body.get("wait") else 202), response.text
        result: dict[str, Any] = response.json()
        return result

    def get(self, name: str) -> dict[str, Any]:
        response = self.http.get(f"/runs/{name}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def wait_for(self, name: str, ready: Callable[[dict[str, Any]], bool],
                 timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(name)
            if ready(run):
                return run
            assert time.monotonic() < deadline, f"run {name} stayed {run}"
            time.sleep(0.05)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The run's server-sent events, read line by line until the server ends the stream."""
        out = []
        with self.http.stream("GET", f"/runs/{name}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line.removeprefix("data: ")))
                else:
                    assert line == "", line
        return out

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The flowcore home every server of one test shares."""
    return tmp_path / "home"


@pytest.fixture
def servers(tmp_path: Path, home: Path) -> Iterator[Callable[[], Server]]:
    """Starts servers on `home`; any still running at the end is killed."""
    started: list[Server] = []

    def start() -> Server:
        started.append(Server(home, tmp_path / "server.log"))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def publishing(run: dict[str, Any]) -> bool:
    """The slow last step is running: every step before it has finished and been recorded."""
    return run["steps"].get("publish") == "running"


def test_waited_run_answers_with_the_finished_run(servers: Callable[[], Server]) -> None:
    """`wait: true` answers 200 with the completed run, fanned out over n, as the store has it."""
    server = servers()
    run = server.start(n=3, wait=True, sleep=0.05)
    assert run["status"] == "completed"
    assert {f"square[{i}]" for i in range(3)} | {"numbers", "total", "publish"} <= set(run["steps"])
    assert set(run["steps"].values()) == {"completed"}
    assert server.get(run["name"]) == run


def test_background_run_is_accepted_then_read_back(servers: Callable[[], Server]) -> None:
    """A background run answers 202 with its name at once and completes; unknown runs are 404s
    and bad input a 400."""
    server = servers()
    accepted = server.start(n=2, sleep=0.3)
    assert accepted["status"] in ("running", "completed")
    run = server.wait_for(accepted["name"], lambda r: r["status"] != "running")
    assert run["status"] == "completed" and set(run["steps"].values()) == {"completed"}
    assert server.http.get("/runs/no-such-run").status_code == 404
    assert server.http.post("/runs", json={"n": "many"}).status_code == 400


def test_events_stream_from_run_started_to_run_finished(servers: Callable[[], Server]) -> None:
    """A live run's events arrive as SSE: RunStarted first, every step's StepFinished, RunFinished
    last; a run the process no longer holds streams its stored record the same way."""
    server = servers()
    name = server.start(n=2, sleep=0.5)["name"]
    events = server.events(name)
    assert events[0]["type"] == "RunStarted" and events[0]["run_name"] == name
    assert events[-1] == {**events[-1], "type": "RunFinished", "status": "completed"}
    finished = {e["step"] for e in events if e["type"] == "StepFinished"}
    assert finished == set(server.get(name)["steps"])
    assert [e["type"] for e in events].count("StepStarted") >= 5

    waited = server.start(n=1, wait=True, sleep=0)["name"]  # no handle: read from the store
    stored = server.events(waited)
    assert (stored[0]["type"], stored[-1]["type"]) == ("RunStarted", "RunFinished")
    assert {e["step"] for e in stored if e["type"] == "StepFinished"} == set(server.get(waited)["steps"])
    assert server.http.get("/runs/no-such-run/events").status_code == 404


def test_cancel_stops_a_long_background_run(servers: Callable[[], Server]) -> None:
    """Cancelling a running background run ends it STOPPED within seconds, its slow step STOPPED."""
    server = servers()
    name = server.start(n=2, sleep=60)["name"]
    server.wait_for(name, publishing)
    began = time.monotonic()
    response = server.http.post(f"/runs/{name}/cancel", json={})
    assert response.status_code == 200, response.text
    assert time.monotonic() - began < 5
    run = response.json()  # cancel_run returns once the run's record is final
    assert run["status"] == "stopped" and run["steps"]["publish"] == "stopped"
    assert run["steps"]["total"] == "completed"
    assert server.http.post(f"/runs/{name}/cancel", json={}).json() == run  # finished: unchanged


def test_cancel_with_drain_lets_running_steps_finish(servers: Callable[[], Server]) -> None:
    """`drain: true` lets the running step finish and starts nothing new; the run ends STOPPED."""
    server = servers()
    name = server.start(n=2, sleep=1.0)["name"]
    server.wait_for(name, publishing)
    response = server.http.post(f"/runs/{name}/cancel", json={"drain": True})
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "stopped" and run["steps"]["publish"] == "completed"


def test_cancel_reaches_a_run_of_another_server(servers: Callable[[], Server]) -> None:
    """A second server on the same home cancels a run the first one is running (through the
    store); the first stops it within seconds and records it STOPPED."""
    first, second = servers(), servers()
    name = first.start(n=2, sleep=60)["name"]
    first.wait_for(name, publishing)
    began = time.monotonic()
    response = second.http.post(f"/runs/{name}/cancel", json={})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stopped" and time.monotonic() - began < 5
    assert first.get(name)["steps"]["publish"] == "stopped"


def test_shutdown_stops_live_runs_and_records_them(servers: Callable[[], Server], home: Path) -> None:
    """SIGTERM shuts the server down promptly; the lifespan's stack close records its live run
    STOPPED."""
    server = servers()
    name = server.start(n=2, sleep=60)["name"]
    server.wait_for(name, publishing)
    began = time.monotonic()
    # uvicorn shuts down gracefully, then re-raises the signal, as a process killed by it would.
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
    assert time.monotonic() - began < 10
    run = Client(Stack.local(home)).get_pipeline_run(name)
    assert run.status is RunStatus.STOPPED
    assert run.steps["publish"].status is StepStatus.STOPPED


def test_killed_server_runs_read_crashed_and_resume(servers: Callable[[], Server]) -> None:
    """After SIGKILL of the server, a new one on the same home reads the run CRASHED and resumes
    it: the steps that had finished are CACHED, only the interrupted one runs."""
    server = servers()
    name = server.start(n=3, sleep=60)["name"]
    crashed_id = server.wait_for(name, publishing)["id"]
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    server = servers()
    assert server.get(name)["status"] == "crashed"
    response = server.http.post(f"/runs/{name}/resume", json={"sleep": 0})
    assert response.status_code == 202, response.text
    resumed = server.wait_for(response.json()["name"], lambda r: r["status"] != "running")
    assert resumed["status"] == "completed" and resumed["resumed_from"] == crashed_id
    assert resumed["steps"].pop("publish") == "completed"
    assert set(resumed["steps"]) >= {"numbers", "square", "total"}
    assert set(resumed["steps"].values()) == {"cached"}


def test_resuming_a_live_run_is_a_conflict(servers: Callable[[], Server]) -> None:
    """Resuming a run that is still running in the server answers 409 (RunStateError)."""
    server = servers()
    name = server.start(n=1, sleep=60)["name"]
    response = server.http.post(f"/runs/{name}/resume", json={})
    assert response.status_code == 409 and response.json()["error"] == "RunStateError"
