"""Stack components: step operators, an alerter with hooks, and per-step settings.

1. A stack built in code: `Stack.in_memory().with_components(...)` adds a
   `ProcessStepOperator` (named "proc") and a `WebhookAlerter` pointed at a small HTTP server
   this example starts on 127.0.0.1 (standing in for a Slack incoming webhook).
2. Steps choose components by name: `@step(step_operator="proc")` runs the body in a worker
   process (another pid; inputs and outputs travel by cloudpickle), and
   `on_success=alerter_success_hook` / `on_failure=alerter_failure_hook` post to the alerter.
   The seed's custom hook `Client().active_stack.alerter.post(...)` works too.
3. Settings are validated by the component's own model: bad step-operator settings are a
   `ConfigError` before anything runs; settings for a component the step does not use are only
   logged as a warning.
4. The same stack loaded from a YAML file (`Stack.from_yaml`), written to a temporary directory
   together with its SQLite store and artifacts.

Step operators start worker processes, so the code that runs pipelines sits under
`if __name__ == "__main__":` (the standard rule for multiprocessing).

Run it with:  python examples/stack_components.py
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import flowcore
from flowcore import Client, ConfigError, RunFailedError, Stack, get_step_context, pipeline, step
from flowcore.hooks import alerter_failure_hook, alerter_success_hook
from flowcore.stack import ProcessStepOperator, WebhookAlerter

# -- a local stand-in for a Slack webhook --------------------------------------------------------


def start_webhook_server() -> tuple[ThreadingHTTPServer, list[str]]:
    """An HTTP server on an ephemeral 127.0.0.1 port that prints and keeps POSTed texts."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(body["text"])
            print(f"  [webhook] {body['text']}")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, received


# -- steps -----------------------------------------------------------------------------------------


@step(enable_cache=False)
def make_features(n: int) -> list[float]:
    return [i / n for i in range(n)]


@step(step_operator="proc", enable_cache=False,
      on_success=alerter_success_hook, on_failure=alerter_failure_hook)
def train(features: list[float], epochs: int = 3) -> dict[str, float]:
    # Runs in a worker process of the "proc" step operator.
    weight = sum(features) / len(features) * epochs
    return {"weight": round(weight, 3), "worker_pid": os.getpid()}


def custom_failure_hook() -> None:
    """The seed's custom hook: post through the active stack's alerter."""
    step_name = get_step_context().step_run.name
    Client().active_stack.alerter.post(f"{step_name} just failed!")


@step(enable_cache=False, on_failure=custom_failure_hook)
def validate(model: dict[str, float], min_weight: float) -> float:
    if model["weight"] < min_weight:
        raise ValueError(f"weight {model['weight']} is below {min_weight}")
    return model["weight"]


@pipeline
def training(n: int = 10, min_weight: float = 0.0) -> None:
    model = train(make_features(n))
    validate(model, min_weight)


@step(step_operator="proc", settings={"step_operator": {"gpus": 1}})
def misconfigured() -> int:
    return 1


@pipeline
def misconfigured_pipeline() -> None:
    misconfigured()


@step(settings={"experiment_tracker.mlflow": {"experiment_name": "unused"}})
def untracked() -> int:
    return 1


@pipeline
def unused_settings_pipeline() -> None:
    untracked()


STACK_YAML = """\
metadata_store: {{path: store/flowcore.db}}
artifact_store: {{path: store/artifacts}}
alerter: {{type: webhook, url: "{url}", retries: 1, timeout: 2}}
step_operators:
  proc: {{type: process, max_workers: 2}}
"""


def main() -> None:
    flowcore.enable_console_logging(logging.WARNING)
    server, received = start_webhook_server()
    url = f"http://127.0.0.1:{server.server_address[1]}/slack"
    try:
        print("1) a stack built in code: process step operator + webhook alerter")
        stack = Stack.in_memory().with_components(
            alerter=WebhookAlerter(url),
            step_operators={"proc": ProcessStepOperator(max_workers=2)},
        )
        flowcore.set_active_stack(stack)
        run = training(n=10)
        model = run.steps["train"].output.load()
        print(f"  train ran in pid {model['worker_pid']} (this process is {os.getpid()}); "
              f"weight={model['weight']}")

        print("\n2) a failing step: the seed's custom hook posts through Client().active_stack")
        try:
            training(n=10, min_weight=100.0)
        except RunFailedError as exc:
            print(f"  run failed as expected: {exc.__cause__}")

        print("\n3) settings are validated by the component's model before anything runs")
        try:
            misconfigured_pipeline()
        except ConfigError as exc:
            print(f"  ConfigError: {exc}")
        run = unused_settings_pipeline()
        print(f"  settings for a component the step does not use: only a warning; "
              f"run {run.status.value.upper()}")

        print("\n4) the same stack from a YAML file")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "stack.yaml"
            path.write_text(STACK_YAML.format(url=url))
            yaml_stack = Stack.from_yaml(path)
            print(f"  loaded {yaml_stack!r}: alerter={yaml_stack.alerter!r}, "
                  f"step_operators={yaml_stack.step_operators}")
            flowcore.set_active_stack(yaml_stack)
            run = training(n=20)
            print(f"  stored in {path.parent / 'store'}: "
                  f"{[r.name for r in Client().list_pipeline_runs()]}")
            flowcore.set_active_stack(None)
        print(f"\nthe webhook received {len(received)} messages")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
