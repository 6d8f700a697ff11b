"""Small outputs on the default stack are kept in their metadata row: no file, same content hash,
checked on every load, and a damaged one is a cache miss, never a wrong hit."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from flowcore import AsyncClient, Stack, StepStatus, pipeline, step
from flowcore.exceptions import ArtifactLoadError
from flowcore.materializers import materializer_for
from flowcore.stores._local import LocalArtifactStore

VALUES: list[Any] = [7, -1.5, True, None, "text é", [1, "a"], {"k": [1, 2]}, (1, 2), {3, 1}]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ for v in VALUES])
async def test_small_value_round_trips_inline_with_the_file_stores_hash(
        tmp_path: Path, value: Any) -> None:
    """A small value is stored inline (no artifact directory), loads back equal and of its type
    (also through a new client), and has the hash a file artifact of it would have."""
    @step(enable_cache=False)
    async def make() -> Any:
        return value

    @pipeline(enable_cache=False)
    def p() -> None:
        make()

    async with Stack.local(tmp_path / "s") as stack:
        run = await p.with_options(stack=stack).run()
        art = run.steps["make"].output
        assert art.uri.startswith("inline:")
        stored = (await AsyncClient(stack).get_pipeline_run(run.name)).steps["make"].output
        loaded = await stored.aload()
        assert loaded == value and type(loaded) is type(value)
    files = LocalArtifactStore(tmp_path / "plain")  # no SQLite store: writes a directory
    on_disk = await files.save(value, materializer=materializer_for(type(value)),
                               data_type=type(value), name="output", producer_step_run_id="x",
                               step_label="test")
    assert files.exists(on_disk) and not on_disk.uri.startswith("inline:")
    assert on_disk.content_hash == stored.content_hash
    assert not any((tmp_path / "s" / "artifacts").glob("*/*"))


async def test_large_value_still_goes_to_a_file(tmp_path: Path) -> None:
    """A value over the inline limit is written to the artifact store as before."""
    @step(enable_cache=False)
    async def big() -> list[int]:
        return list(range(3000))

    @pipeline(enable_cache=False)
    def p() -> None:
        big()

    async with Stack.local(tmp_path / "s") as stack:
        art = (await p.with_options(stack=stack).run()).steps["big"].output
        assert not art.uri.startswith("inline:") and stack.artifact_store.exists(art)
        assert art.load() == list(range(3000))


async def test_damaged_inline_content_fails_to_load_and_is_a_cache_miss(tmp_path: Path) -> None:
    """Bytes changed in the row: load raises ArtifactLoadError ('damaged'), and the cached step
    misses with that reason and runs again (never a hit on the wrong value)."""
    calls: list[int] = []

    @step
    async def answer(k: int) -> int:
        calls.append(k)
        return 40 + k

    @pipeline
    def p() -> None:
        answer(k=2)

    home = tmp_path / "s"
    async with Stack.local(home) as stack:
        first = await p.with_options(stack=stack).run()
    with sqlite3.connect(home / "flowcore.db") as db:
        assert db.execute("UPDATE artifacts SET content = CAST('43' AS BLOB)").rowcount == 1
    async with Stack.local(home) as stack:
        stored = (await AsyncClient(stack).get_pipeline_run(first.name)).steps["answer"].output
        with pytest.raises(ArtifactLoadError, match="damaged"):
            await stored.aload()
        second = await p.with_options(stack=stack).run()
    sr = second.steps["answer"]
    assert sr.status is StepStatus.COMPLETED and calls == [2, 2]
    assert sr.cache_miss_reason is not None and "damaged" in sr.cache_miss_reason
    assert sr.output.load() == 42
