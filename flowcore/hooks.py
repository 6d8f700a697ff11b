"""Built-in hooks that post to the active stack's alerter."""

from __future__ import annotations

import logging

from flowcore.context import get_step_context

__all__ = ["alerter_failure_hook", "alerter_success_hook"]

_log = logging.getLogger("flowcore")


def _post(message: str, params: dict[str, str]) -> None:
    ctx = get_step_context()
    alerter = ctx.stack.alerter
    if alerter is None:
        _log.warning("alerter_missing step=%s message=%s", ctx.step_run.name, message,
                     extra={"flowcore_event": "alerter_missing"})
        return
    alerter.post(message, params)


def alerter_success_hook() -> None:
    """Post "step succeeded" (naming pipeline, run and step) to the stack's alerter."""
    ctx = get_step_context()
    message = (
        f"Pipeline '{ctx.pipeline.name}', run '{ctx.pipeline_run.name}': "
        f"step '{ctx.step_run.name}' succeeded."
    )
    _post(message, {"pipeline": ctx.pipeline.name, "run": ctx.pipeline_run.name,
                    "step": ctx.step_run.name, "status": "completed"})


def alerter_failure_hook(exception: BaseException) -> None:
    """Post "step failed" with the exception (naming pipeline, run and step) to the alerter."""
    ctx = get_step_context()
    message = (
        f"Pipeline '{ctx.pipeline.name}', run '{ctx.pipeline_run.name}': "
        f"step '{ctx.step_run.name}' failed with {type(exception).__name__}: {exception}"
    )
    _post(message, {"pipeline": ctx.pipeline.name, "run": ctx.pipeline_run.name,
                    "step": ctx.step_run.name, "status": "failed",
                    "exception": f"{type(exception).__name__}: {exception}"})
