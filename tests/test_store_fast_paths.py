"""The SQLite store's fast paths give exactly what the slow ones gave: step writes applied
together in one group commit, timestamps as text, a step's config as JSON."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flowcore._models import (
    ArtifactVersion,
    ErrorInfo,
    PipelineRun,
    StepRun,
    StepRunConfig,
    StepStatus,
)
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._sqlite import SqliteMetadataStore
from flowcore.stores._sqlite_schema import _json_default, _safe, encode_config, to_iso

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- to_iso ------------------------------------------------------------------------------------


def _iso_reference(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.one_of(st.none(), st.just(UTC),
                                        st.builds(lambda m: timezone(timedelta(minutes=m)),
                                                  st.integers(-900, 900)))))
@settings(max_examples=300, deadline=None)
def test_to_iso_is_the_fixed_width_utc_text(value: datetime) -> None:
    assert to_iso(value) == _iso_reference(value)


def test_to_iso_keeps_a_zero_microsecond_and_sorts_as_time() -> None:
    whole = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    later = whole + timedelta(microseconds=1)
    assert to_iso(whole) == "2026-01-02T03:04:05.000000+00:00"
    assert to_iso(whole) < to_iso(later)
    assert to_iso(None) is None


# -- encode_config -----------------------------------------------------------------------------


def _config_reference(config: StepRunConfig) -> str:
    return json.dumps({"parameters": _safe(config.parameters),
                       "enable_cache": config.enable_cache,
                       "step_operator": config.step_operator,
                       "experiment_tracker": config.experiment_tracker,
                       "settings": _safe(config.settings)}, default=_json_default)


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                  st.text(max_size=5), st.builds(_Opaque))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers(), st.tuples(st.integers())),
                    inner, max_size=3)), max_leaves=8)
_mapping = st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), _value, max_size=4)


@given(_mapping, _mapping, st.booleans(), st.one_of(st.none(), st.text(max_size=4)))
@settings(max_examples=300, deadline=None)
def test_encode_config_equals_the_checked_encoding(parameters: dict[Any, Any],
                                                   settings_: dict[Any, Any], cache: bool,
                                                   operator: str | None) -> None:
    config = StepRunConfig(parameters=parameters, enable_cache=cache, step_operator=operator,
                           settings=settings_)
    assert encode_config(config) == _config_reference(config)


def test_encode_config_of_a_cycle_stores_its_repr() -> None:
    loop: list[Any] = []
    loop.append(loop)
    config = StepRunConfig(parameters={"a": loop, "b": 1})
    assert json.loads(encode_config(config))["parameters"] == {"a": "[[...]]", "b": 1}


# -- step writes applied together -----------------------------------------------------------


def _step(run: PipelineRun, name: str, status: StepStatus, value: bytes | None = None) -> StepRun:
    sr = StepRun(id=f"{run.id}-{name}", name=name, step_name="s", pipeline_run_id=run.id,
                 config=StepRunConfig(parameters={"k": name}), status=status)
    if status is not StepStatus.PENDING:
        sr.start_time = T0
    if status.is_finished:
        sr.end_time = T0 + timedelta(seconds=1)
        sr.attempts = 1
    if value is not None:
        art = ArtifactVersion(id=uuid.uuid4().hex, name="output", uri=f"inline:{name}/data.json",
                              materializer="m", data_type="builtins.int", content_hash=name,
                              size=len(value), producer_step_run_id=sr.id, value=value)
        sr.outputs["output"] = art
    return sr


async def test_one_batch_of_step_writes_stores_what_each_write_alone_would(
    tmp_path: Path,
) -> None:
    """Updates of recorded steps and rows of steps the run did not have at its start (fan-out
    elements), queued together: every row holds its newest state, the new rows come after the
    others in the order they were written, outputs and the cache entry are there."""
    store = SqliteMetadataStore(tmp_path / "flowcore.db", LocalArtifactStore(tmp_path))
    await store.open()
    try:
        run = PipelineRun(id=uuid.uuid4().hex, name="r", pipeline_name="p", start_time=T0)
        for name in ("a", "b"):
            run.steps[name] = _step(run, name, StepStatus.PENDING)
        await store.create_run(run)
        before = store.commits

        a = _step(run, "a", StepStatus.COMPLETED, b"1")
        a.cache_key = "key-a"
        element1 = _step(run, "e1", StepStatus.RUNNING)
        b = _step(run, "b", StepStatus.FAILED)
        b.error = ErrorInfo(type="ValueError", message="no", traceback="tb")
        element2 = _step(run, "e2", StepStatus.COMPLETED, b"2")
        for sr in (a, element1, b, element2):
            run.steps[sr.name] = sr
            store.record_step_run(run, sr)
        element1.status, element1.end_time = StepStatus.COMPLETED, T0 + timedelta(seconds=2)
        await store.update_step_run(run, element1)  # replaces its queued write: newest state
        await store.flush()
        assert store.commits == before + 1  # one group commit for all of them
    finally:
        await store.close()

    with sqlite3.connect(tmp_path / "flowcore.db") as raw:
        rows = raw.execute("SELECT name, status, position, error_message, config FROM step_runs "
                           "WHERE run_id = ? ORDER BY position", (run.id,)).fetchall()
        outputs = raw.execute("SELECT s.name, a.content FROM step_outputs o JOIN step_runs s "
                              "ON s.id = o.step_run_id JOIN artifacts a ON a.id = o.artifact_id "
                              "ORDER BY s.name").fetchall()
        cache = raw.execute("SELECT cache_key, step_run_id FROM cache_entries").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("a", "completed", 0), ("b", "failed", 1), ("e1", "completed", 2), ("e2", "completed", 3)]
    assert rows[1][3] == "no"
    assert json.loads(rows[2][4])["parameters"] == {"k": "e1"}
    assert outputs == [("a", b"1"), ("e2", b"2")]
    assert cache == [("key-a", a.id)]
