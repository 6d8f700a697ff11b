"""Store edge cases: text that cannot be encoded, rows left unfinished, damaged files, leaks."""

from __future__ import annotations

import os

import pytest

from flowcore import AsyncClient, Client, Stack, pipeline, step
from flowcore._models import PipelineRun, RunStatus, StepStatus
from flowcore.exceptions import RunFailedError

# What os.fsdecode gives for a file name that is not UTF-8: a lone surrogate.
BAD = os.fsdecode(b"\xff")
ESCAPED = "\\udcff"


def _hook_raises() -> None:
    raise ValueError(f"hook {BAD}")


@step(enable_cache=False, on_success=_hook_raises)
def sync_printer() -> str:
    print(f"sync printed {BAD}")
    return f"sync value {BAD}"


@step(enable_cache=False)
async def async_printer(text: str) -> str:
    print(f"async printed {BAD}")
    return text + BAD


@step(enable_cache=False)
def sync_raiser() -> None:
    raise ValueError(f"sync raised {BAD}")


@step(enable_cache=False)
async def async_raiser() -> None:
    raise ValueError(f"async raised {BAD}")


@pipeline
def surrogates() -> None:
    async_printer(sync_printer())
    sync_raiser()
    async_raiser()


def _encodes(text: str) -> str:
    text.encode("utf-8")  # raises if a lone surrogate was stored as it came
    return text


def _check_stored(run: PipelineRun, logs: dict[str, str]) -> None:
    assert run.status is RunStatus.FAILED
    assert {n: s.status for n, s in run.steps.items()} == {
        "sync_printer": StepStatus.COMPLETED, "async_printer": StepStatus.COMPLETED,
        "sync_raiser": StepStatus.FAILED, "async_raiser": StepStatus.FAILED,
    }
    assert f"sync printed {ESCAPED}" in _encodes(logs["sync_printer"])
    assert f"async printed {ESCAPED}" in _encodes(logs["async_printer"])
    for name in ("sync_raiser", "async_raiser"):
        error = run.steps[name].error
        assert error is not None
        assert _encodes(error.message) == f"{name.split('_')[0]} raised {ESCAPED}"
        assert ESCAPED in _encodes(error.traceback)
    (hook_error,) = run.steps["sync_printer"].hook_errors
    assert _encodes(hook_error.error.message) == f"hook {ESCAPED}"


def test_unencodable_text_from_sync_call_is_stored_escaped(stack: Stack) -> None:
    """Lone surrogates printed, raised and raised by hooks are stored escaped by `p()`, and an
    output value holding one loads back exactly, on both stores."""
    with pytest.raises(RunFailedError):
        surrogates()
    client = Client(stack)
    (run,) = client.list_pipeline_runs()
    _check_stored(run, {n: client.get_step_logs(run.name, n) for n in run.steps})
    assert run.steps["sync_printer"].output.load() == f"sync value {BAD}"
    assert run.steps["async_printer"].output.load() == f"sync value {BAD}{BAD}"


async def test_unencodable_text_from_async_run_is_stored_escaped(stack: Stack) -> None:
    """The same holds for `await p.run()`, read back through AsyncClient."""
    with pytest.raises(RunFailedError):
        await surrogates.run()
    client = AsyncClient(stack)
    (run,) = await client.list_pipeline_runs()
    _check_stored(run, {n: await client.get_step_logs(run.name, n) for n in run.steps})
    assert await run.steps["async_printer"].output.aload() == f"sync value {BAD}{BAD}"


def test_unencodable_run_name_is_stored_escaped_and_found_by_its_raw_name(stack: Stack) -> None:
    """A run name with a lone surrogate (from a substitution) is stored, and found again."""
    run = surrogates.with_options(run_name="r-{where}", substitutions={"where": BAD},
                                  enable_cache=False)
    with pytest.raises(RunFailedError) as info:
        run()
    assert info.value.run is not None
    stored = Client(stack).get_pipeline_run(info.value.run.name)
    assert stored.status is RunStatus.FAILED
    assert all(s.status.is_finished for s in stored.steps.values())
