"""What a step prints and logs is captured per step run and stored with it."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import pytest

from flowcore import AsyncClient, Client, Stack, pipeline, step

user_log = logging.getLogger("user.capture")


@step(enable_cache=False)
def sync_talker(i: int) -> int:
    for k in range(20):
        print(f"sync-{i} line {k}")
    user_log.warning("sync-%d warned", i)
    return i


@step(enable_cache=False)
async def async_talker(i: int) -> int:
    for k in range(20):
        print(f"async-{i} line {k}")
        await asyncio.sleep(0)
    return i


@pipeline
def chatty() -> None:
    for i in range(4):
        sync_talker(i, step_name=f"s{i}")
        async_talker(i, step_name=f"a{i}")


def _own_lines(text: str, prefix: str) -> bool:
    return all(line.startswith(prefix) or line.startswith("WARNING user.capture: " + prefix)
               for line in text.splitlines())


async def test_concurrent_steps_capture_only_their_own_output(stack: Stack) -> None:
    """Concurrent sync (threads) and async steps each capture exactly their own lines."""
    run = await chatty.run()
    for i in range(4):
        s = run.steps[f"s{i}"].logs or ""
        a = run.steps[f"a{i}"].logs or ""
        assert s.count("\n") == 21 and _own_lines(s, f"sync-{i}"), s
        assert f"WARNING user.capture: sync-{i} warned" in s
        assert a.count("\n") == 20 and _own_lines(a, f"async-{i}"), a


async def test_logs_are_stored_and_read_back_through_the_client(stack: Stack) -> None:
    """A stored run's step logs come back through AsyncClient.get_step_logs."""
    run = await chatty.run()
    text = await AsyncClient().get_step_logs(run.name, "s2")
    assert "sync-2 line 19" in text and "async" not in text


def test_sync_client_reads_logs_of_a_finished_run(stack: Stack) -> None:
    """The sync Client reads a step's captured output after the run ended."""
    run = chatty()
    assert "async-3 line 0" in Client().get_step_logs(run.name, "a3")


async def test_output_still_reaches_the_real_stream(memory_stack: Stack,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Capturing tees: the printed lines still reach the process's stdout."""
    await chatty.run()
    assert "sync-1 line 5" in capsys.readouterr().out


async def test_capture_can_be_turned_off_and_streams_are_restored(memory_stack: Stack) -> None:
    """With capture_logs=False nothing is recorded, and after any run sys.stdout is the
    stream it was before."""
    before = sys.stdout
    run = await chatty.with_options(capture_logs=False).run()
    assert run.steps["s0"].logs is None
    await chatty.run()
    assert sys.stdout is before


async def test_prints_outside_steps_are_not_captured(memory_stack: Stack) -> None:
    """A print from another thread while a run is active goes to no step's log."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    @step(enable_cache=False)
    async def waiting() -> None:
        print("inside")
        await done.wait()

    @pipeline
    def p() -> None:
        waiting()

    def outsider() -> None:
        print("outsider")
        loop.call_soon_threadsafe(done.set)

    handle = p.submit()
    await asyncio.sleep(0.05)
    threading.Thread(target=outsider).start()
    run = await handle
    assert run.steps["waiting"].logs == "inside\n"
