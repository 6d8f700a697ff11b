"""Alerters (API.md sections 5 and 9): WebhookAlerter against a real HTTP server on 127.0.0.1,
its retries and give-up behaviour, the built-in alerter hooks, the seed's custom hook through
`Client().active_stack.alerter`, and users' own Alerter subclasses."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import flowcore
from flowcore import (
    Client,
    RunFailedError,
    Stack,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)
from flowcore.hooks import alerter_failure_hook, alerter_success_hook
from flowcore.stack import Alerter, WebhookAlerter

# -- a real webhook receiver -----------------------------------------------------------------


@dataclass
class Receiver:
    """What the test HTTP server received, and how it should answer."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Status codes to answer with, in order; when used up, answer `default_status`.
    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def texts(self) -> list[str]:
        """The "text" field of every JSON body received."""
        with self.lock:
            return [r["json"]["text"] for r in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A ThreadingHTTPServer on an ephemeral 127.0.0.1 port that records POSTed JSON."""
    state: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            with state.lock:
                state.requests.append({
                    "path": self.path,
                    "content_type": self.headers.get("Content-Type"),
                    "json": json.loads(raw),
                })
                status = state.statuses.pop(0) if state.statuses else state.default_status
            if state.delay:
                time.sleep(state.delay)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            try:
                self.wfile.write(b"ok")
            except OSError:
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    state = Receiver(url=f"http://{host}:{port}/hooks/alerts")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                              name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nobody"


# -- WebhookAlerter ------------------------------------------------------------------------------


def test_webhook_posts_slack_compatible_json(receiver: Receiver) -> None:
    """post() sends one JSON POST with {"text": message} (plus params) and returns True."""
    alerter = WebhookAlerter(receiver.url)
    assert alerter.post("deployment finished", {"channel": "#ml"}) is True
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request["path"] == "/hooks/alerts"
    assert request["content_type"] == "application/json"
    assert request["json"] == {"text": "deployment finished", "channel": "#ml"}


def test_webhook_retries_after_a_server_error(receiver: Receiver) -> None:
    """A 500 answer is retried; the post succeeds when the server answers 200 the second time."""
    receiver.statuses = [500]
    alerter = WebhookAlerter(receiver.url, retries=2, backoff=0.01)
    assert alerter.post("second time lucky") is True
    assert receiver.texts() == ["second time lucky", "second time lucky"]


def test_webhook_gives_up_after_its_retries_and_logs(
    receiver: Receiver, caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that always answers 500 gets 1 + retries posts; then post() returns False and
    logs an ERROR naming the url, without raising."""
    caplog.set_level(logging.ERROR, logger="flowcore")
    receiver.default_status = 500
    alerter = WebhookAlerter(receiver.url, retries=2, backoff=0.01, timeout=2.0)
    assert alerter.post("never delivered") is False
    assert len(receiver.requests) == 3
    errors = [r for r in caplog.records if r.name == "flowcore" and r.levelno >= logging.ERROR]
    assert errors and receiver.url in errors[-1].getMessage()


def test_webhook_gives_up_quickly_on_a_slow_server(
    receiver: Receiver, caplog: pytest.LogCaptureFixture,
) -> None:
    """With a short timeout, a server slower than the timeout makes post() return False after
    its retries, in about (1 + retries) x timeout."""
    caplog.set_level(logging.ERROR, logger="flowcore")
    receiver.delay = 3.0
    alerter = WebhookAlerter(receiver.url, retries=1, backoff=0.01, timeout=0.3)
    started = time.monotonic()
    assert alerter.post("too slow") is False
    assert time.monotonic() - started < 2.5
    assert len(receiver.requests) == 2
    assert any(r.levelno >= logging.ERROR for r in caplog.records if r.name == "flowcore")


def test_webhook_gives_up_when_nothing_listens() -> None:
    """A refused connection is retried and then reported as False (never raised)."""
    alerter = WebhookAlerter(closed_port_url(), retries=1, backoff=0.01, timeout=1.0)
    assert alerter.post("nobody home") is False


# -- alerter hooks ---------------------------------------------------------------------------


def test_builtin_alerter_hooks_name_pipeline_run_step_and_exception(receiver: Receiver) -> None:
    """alerter_success_hook and alerter_failure_hook post messages naming the pipeline, the run,
    the step and, for the failure, the exception."""
    stack = Stack.in_memory().with_components(alerter=WebhookAlerter(receiver.url))

    @step(enable_cache=False, on_success=alerter_success_hook,
          on_failure=alerter_failure_hook)
    def good_step() -> int:
        return 1

    @step(enable_cache=False, on_success=alerter_success_hook,
          on_failure=alerter_failure_hook)
    def bad_step() -> int:
        raise ValueError("the data looks wrong")

    @pipeline
    def alerting_pipeline() -> None:
        good_step()
        bad_step()

    with pytest.raises(RunFailedError) as info:
        alerting_pipeline.with_options(stack=stack, run_name="alerting_{run_id}")()
    run = info.value.run
    assert run is not None
    by_step = {r["json"].get("step"): r["json"] for r in receiver.requests}
    assert set(by_step) == {"good_step", "bad_step"}
    success = by_step["good_step"]["text"]
    for fragment in ("alerting_pipeline", run.name, "good_step"):
        assert fragment in success
    failure = by_step["bad_step"]["text"]
    for fragment in ("alerting_pipeline", run.name, "bad_step", "ValueError",
                     "the data looks wrong"):
        assert fragment in failure
    assert "bad_step" not in success and "good_step" not in failure


def test_pipeline_level_alerter_hook_posts_once_per_failed_step_after_retries(
    receiver: Receiver,
) -> None:
    """A pipeline-level alerter_failure_hook applies to every step and posts once, after the
    last attempt; a successful step posts nothing."""
    stack = Stack.in_memory().with_components(alerter=WebhookAlerter(receiver.url))

    @step(enable_cache=False)
    def fine() -> int:
        return 1

    @step(enable_cache=False)
    def always_fails() -> int:
        raise RuntimeError(f"attempt {get_step_context().step_run.attempt}")

    @pipeline(on_failure=alerter_failure_hook, retry=flowcore.StepRetryConfig(max_retries=2))
    def retried_alerts() -> None:
        fine()
        always_fails()

    with pytest.raises(RunFailedError):
        retried_alerts.with_options(stack=stack)()
    texts = receiver.texts()
    assert len(texts) == 1
    assert "always_fails" in texts[0] and "attempt 3" in texts[0]


def test_unreachable_alerter_never_fails_the_step() -> None:
    """An alerter whose server is down makes the hook's post return False; the step still
    completes and no hook error is recorded."""
    stack = Stack.in_memory().with_components(
        alerter=WebhookAlerter(closed_port_url(), retries=0, timeout=1.0))

    @step(enable_cache=False, on_success=alerter_success_hook)
    def still_fine() -> int:
        return 1

    @pipeline
    def unreachable_alerts() -> None:
        still_fine()

    run = unreachable_alerts.with_options(stack=stack)()
    assert run.steps["still_fine"].status is StepStatus.COMPLETED
    assert run.steps["still_fine"].hook_errors == []


def test_seed_custom_hook_posts_through_client_active_stack(receiver: Receiver) -> None:
    """The seed's hook `Client().active_stack.alerter.post(f"{step_name} just failed!")` posts
    through the active stack's alerter."""

    def on_failure() -> None:
        step_name = get_step_context().step_run.name
        Client().active_stack.alerter.post(f"{step_name} just failed!")

    @step(enable_cache=False, on_failure=on_failure)
    def my_step() -> None:
        raise RuntimeError("boom")

    @pipeline
    def seed_hook_pipeline() -> None:
        my_step()

    flowcore.set_active_stack(
        Stack.in_memory().with_components(alerter=WebhookAlerter(receiver.url)))
    with pytest.raises(RunFailedError) as info:
        seed_hook_pipeline()
    assert receiver.texts() == ["my_step just failed!"]
    run = info.value.run
    assert run is not None and run.steps["my_step"].hook_errors == []


async def test_async_hook_can_post_from_the_event_loop(receiver: Receiver) -> None:
    """An async hook can post through the step context's stack alerter off the loop
    (asyncio.to_thread) while the run is awaited."""
    import asyncio

    async def on_success(step_name: str) -> None:
        alerter = get_step_context().stack.alerter
        assert alerter is not None
        await asyncio.to_thread(alerter.post, f"{step_name} done")

    @step(enable_cache=False, on_success=on_success)
    async def quick() -> int:
        return 1

    @pipeline
    def async_hook_pipeline() -> None:
        quick()

    stack = Stack.in_memory().with_components(alerter=WebhookAlerter(receiver.url))
    await async_hook_pipeline.with_options(stack=stack).run()
    assert receiver.texts() == ["quick done"]


# -- user alerters ---------------------------------------------------------------------------


class ListAlerter(Alerter):
    """A user alerter that keeps what it is asked to post."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any] | None]] = []

    def post(self, message: str, params: dict[str, Any] | None = None) -> bool:
        self.posts.append((message, params))
        return True


def test_user_alerter_subclass_works_with_builtin_hooks() -> None:
    """An Alerter subclass implementing post(message, params=None) receives the built-in hooks'
    messages (with params naming the step)."""
    alerter = ListAlerter()
    stack = Stack.in_memory().with_components(alerter=alerter)

    @step(enable_cache=False, on_success=alerter_success_hook)
    def fine() -> int:
        return 1

    @step(enable_cache=False, on_failure=alerter_failure_hook)
    def broken() -> int:
        raise KeyError("column")

    @pipeline
    def user_alerts() -> None:
        fine()
        broken()

    with pytest.raises(RunFailedError):
        user_alerts.with_options(stack=stack)()
    messages = {params["step"]: message for message, params in alerter.posts if params}
    assert set(messages) == {"fine", "broken"}
    assert "user_alerts" in messages["fine"]
    assert "KeyError" in messages["broken"] and "column" in messages["broken"]


def test_user_alerter_subclass_works_in_the_seed_hook() -> None:
    """The seed's custom hook works with a user Alerter that only implements post()."""

    class MinimalAlerter(Alerter):
        def __init__(self) -> None:
            self.messages: list[str] = []

        def post(self, message: str, params: dict[str, Any] | None = None) -> bool:
            self.messages.append(message)
            return True

    alerter = MinimalAlerter()
    flowcore.set_active_stack(Stack.in_memory().with_components(alerter=alerter))

    def on_failure() -> None:
        step_name = get_step_context().step_run.name
        Client().active_stack.alerter.post(f"{step_name} just failed!")

    @step(enable_cache=False, on_failure=on_failure)
    def flaky_source() -> None:
        raise OSError("disk")

    @pipeline
    def minimal_alerts() -> None:
        flaky_source(step_name="ingest")

    with pytest.raises(RunFailedError):
        minimal_alerts()
    assert alerter.messages == ["ingest just failed!"]


def test_builtin_hook_without_alerter_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The built-in hooks on a stack without an alerter log a WARNING instead of failing."""
    caplog.set_level(logging.WARNING, logger="flowcore")

    @step(enable_cache=False, on_success=alerter_success_hook)
    def lonely() -> int:
        return 1

    @pipeline
    def no_alerter() -> None:
        lonely()

    run = no_alerter.with_options(stack=Stack.in_memory())()
    assert run.steps["lonely"].status is StepStatus.COMPLETED
    assert run.steps["lonely"].hook_errors == []
    assert any(r.levelno == logging.WARNING and "lonely" in r.getMessage()
               for r in caplog.records if r.name == "flowcore")
