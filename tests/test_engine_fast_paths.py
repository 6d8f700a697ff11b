"""The engine's fast paths give exactly what the slow paths they stand in for give.

Each fast path (a cached JSON encoder, scalars written directly, a cache key's static part
found by its content, a step's code facts found by id) is checked against the plain
computation it replaces, on values chosen to tell them apart (1, 1.0, True, -0.0, NaN,
surrogates, nesting), so a shortcut that drifted would fail here before a cache hit could
be wrong (API.md section 6).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import gc
import hashlib
import json
import os
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcore import ExecutionMode, RunFailedError, Stack, StepStatus, _cache, pipeline, step
from flowcore._canonical import canonical
from flowcore._code_identity import code_components, code_facts, digest_of
from flowcore._engine import _scheduler
from flowcore.materializers._builtin import BuiltInContainerMaterializer, BuiltInMaterializer
from flowcore.materializers._content import directory_digest, files_digest
from flowcore.materializers._json import dumps_pieces, dumps_text


class Colour(enum.IntEnum):
    RED = 1


class Tag(str):
    pass


scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.just(-0.0)
           | st.text() | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
           | st.just(Colour.RED) | st.builds(Tag, st.text(max_size=5)))
json_forms = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_forms)
def test_json_text_is_json_dumps(form: Any) -> None:
    assert _cache.json_text(form) == json.dumps(form, sort_keys=True, separators=(",", ":"))


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


@settings(max_examples=300, deadline=None)
@given(st.recursive(scalars | st.builds(Opaque),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=20))
def test_digest_of_is_the_sha256_of_json_dumps(form: Any) -> None:
    text = json.dumps(form, sort_keys=True, separators=(",", ":"), default=repr)
    assert digest_of(form) == hashlib.sha256(text.encode()).hexdigest()


# -- the static part of a cache key -----------------------------------------------------------


@step
def keyed(k: Any) -> int:
    return 1


@pipeline(enable_cache=True)
def keyed_pipeline(k: Any) -> None:
    keyed(k=k)


def reference_static(node: Any) -> tuple[dict[str, str], str]:
    """The static components and digest as computed before the fast paths (json.dumps with
    keywords per parameter, the sha256 of the sorted items' repr every time)."""
    sig = node.step.signature
    components = {
        "version": _cache.CACHE_KEY_VERSION,
        "source": digest_of([sig.source, list(sig.output_names)]),
        "settings": _cache._EMPTY,
        "materializers": _cache._EMPTY,
    }
    for name, value in node.config.parameters.items():
        text = json.dumps(canonical(value, name), sort_keys=True, separators=(",", ":"))
        components[f"parameter:{name}"] = (
            text if len(text) <= 64 else hashlib.sha256(text.encode()).hexdigest())
    digest = hashlib.sha256(repr(sorted(components.items())).encode()).hexdigest()
    return components, digest


def static_of(value: Any) -> tuple[dict[str, str], str]:
    node = keyed_pipeline.compile(k=value).nodes[0]
    components = _cache._static_components(node, {})
    assert node.static_digest is not None
    return components, node.static_digest


param_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.just(-0.0)
    | st.text(max_size=80) | st.just(Colour.RED),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(param_values, min_size=1, max_size=6))
def test_static_components_match_the_plain_computation(values: list[Any]) -> None:
    # In sequence, so entries found by content from earlier values are exercised too.
    for value in values:
        assert static_of(value) == reference_static(keyed_pipeline.compile(k=value).nodes[0])


def test_values_equal_in_python_but_not_in_content_get_their_own_static_digest() -> None:
    values = (1, 1.0, True, "1", 0.0, -0.0, 0, False, None, [1], (1,), {"a": 1}, {1: 1})
    for _ in range(2):  # the second time through, every digest is found by content
        digests = [static_of(value)[1] for value in values]
        assert len(set(digests)) == len(values)


# -- a step's code facts, found by the id of its code ---------------------------------------


def test_code_components_of_new_code_objects_are_their_own() -> None:
    """Functions made and dropped one after another (their code objects' ids are free to be
    reused) each get the facts of their own code."""
    digests = []
    for n in range(30):
        namespace: dict[str, Any] = {}
        exec(f"def f(x):\n    return x + {n}\n", namespace)  # a fresh code object
        fn = namespace.pop("f")
        got = code_components(fn, "f")
        assert got == {"code": code_facts(fn.__code__).digest}
        digests.append(got["code"])
        del fn, namespace
        gc.collect()
    assert len(set(digests)) == 30


def test_a_global_defined_after_the_first_lookup_enters_the_key() -> None:
    namespace: dict[str, Any] = {}
    exec("def f(x):\n    return x + LATE\n", namespace)
    fn = namespace["f"]
    assert set(code_components(fn, "f")) == {"code"}
    namespace["LATE"] = 5
    first = code_components(fn, "f")
    namespace["LATE"] = 6
    second = code_components(fn, "f")
    assert any(k.startswith("global:") for k in first)
    assert first != second


# -- materializers' JSON and content hashes ---------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(json_forms, st.booleans(), st.booleans(),
       st.sampled_from([(", ", ": "), (",", ":")]))
def test_dumps_text_and_pieces_are_json_dumps(form: Any, ensure_ascii: bool, sort_keys: bool,
                                              separators: tuple[str, str]) -> None:
    expected = json.dumps(form, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                          separators=separators)
    assert dumps_text(form, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators) == expected
    assert "".join(dumps_pieces(form, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                                separators=separators)) == expected


@settings(max_examples=300, deadline=None)
@given(scalars | st.lists(scalars, max_size=5))
def test_builtin_files_are_those_the_slow_path_writes(value: Any) -> None:
    """The bytes (hence the content hash) of a built-in artifact do not depend on the path."""
    materializer = BuiltInMaterializer if type(value) is not list else BuiltInContainerMaterializer
    try:
        files = materializer.files_for(value)
    except Exception:
        files = None
    if files is None:
        return
    payload = value if materializer is BuiltInMaterializer else {"kind": "list", "value": value}
    try:
        slow = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        slow = json.dumps(payload).encode("ascii")
    assert files == {"data.json": slow}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["data.json", ".flowcore-meta", "a/b.bin", "x", "é"]),
                       st.binary(max_size=64), min_size=1, max_size=3))
def test_files_digest_is_the_digest_of_the_same_directory(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        assert files_digest(files) == directory_digest(tmp)


# -- a chain's next step in the same task --------------------------------------------------


BODY_TASKS: list[str] = []  # the (unique) names of the tasks the bodies ran in
SEEN_VAR: list[Any] = []
CHAIN_VAR: contextvars.ContextVar[int] = contextvars.ContextVar("chain_var", default=-1)


@step(enable_cache=False)
async def link(x: int, k: int) -> int:
    task = asyncio.current_task()
    BODY_TASKS.append(task.get_name() if task is not None else "")
    SEEN_VAR.append(CHAIN_VAR.get())
    CHAIN_VAR.set(k)  # a body's context change is seen downstream either way (a copy)
    if k == FAIL_AT[0]:
        raise RuntimeError(f"link {k} fails")
    return x + k


FAIL_AT = [-1]


@pipeline(enable_cache=False, execution_mode=ExecutionMode.FAIL_FAST)
def chain_of(n: int) -> None:
    x = link(0, k=0)
    for k in range(1, n):
        x = link(x, k=k)


async def run_chain(n: int, fail_at: int = -1) -> tuple[dict[str, Any], int, list[Any]]:
    """(each step's status and output, the tasks the bodies ran in, what each body saw)."""
    BODY_TASKS.clear()
    SEEN_VAR.clear()
    FAIL_AT[0] = fail_at
    try:
        run = await chain_of.with_options(stack=Stack.in_memory()).run(n=n)
    except RunFailedError as exc:
        run = exc.run
    steps = {name: (sr.status, sr.output.load() if sr.outputs else None)
             for name, sr in run.steps.items()}
    return steps, len(set(BODY_TASKS)), list(SEEN_VAR)


@pytest.mark.parametrize("fail_at", [-1, 0, 7, 16, 17, 39])
async def test_a_chain_run_in_few_tasks_ends_as_one_task_per_step_does(
        monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    fast, fast_tasks, fast_seen = await run_chain(40, fail_at)
    monkeypatch.setattr(_scheduler, "_IN_A_ROW", 1)  # every step a task of its own
    slow, slow_tasks, slow_seen = await run_chain(40, fail_at)
    assert fast == slow
    assert fast_seen == slow_seen
    ran = 40 if fail_at < 0 else fail_at + 1
    assert slow_tasks == ran
    assert fast_tasks == -(-ran // 16)  # ceil: a new task after every 16 steps
    if fail_at >= 0:
        assert fast[f"link_{fail_at + 1}" if fail_at else "link"][0] is StepStatus.FAILED
        assert all(status is StepStatus.SKIPPED for status, _ in list(fast.values())[ran:])


async def test_a_chain_of_steps_that_never_wait_still_lets_the_loop_run() -> None:
    """Other tasks get a turn at least every `_IN_A_ROW` steps of a chain."""
    ticks: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(len(BODY_TASKS))
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await run_chain(64)
    finally:
        task.cancel()
    during = sorted({t for t in ticks if 0 < t < 64})
    gaps = [b - a for a, b in zip([0, *during], [*during, 64], strict=True)]
    assert max(gaps) <= 16, gaps


component_names = st.sampled_from(["code", "input:x", "input:y", "element", "closure:n",
                                   "global:m:RATE"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a" * 64, "b" * 64, None]),
                          st.dictionaries(component_names, st.text(max_size=70), max_size=4)),
                min_size=1, max_size=6))
def test_key_of_is_the_digest_of_its_text(lookups: list[tuple[str | None, dict[str, str]]]
                                          ) -> None:
    """Keys found again by their content are the keys computed afresh."""
    node = keyed_pipeline.compile(k=1).nodes[0]
    for _ in range(2):
        for static_digest, dynamic in lookups:
            node.static_digest = static_digest
            text = f"{static_digest}|{sorted(dynamic.items())!r}"
            assert _cache.key_of(node, dynamic) == hashlib.sha256(text.encode()).hexdigest()
