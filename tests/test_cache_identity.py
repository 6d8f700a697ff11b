"""What a cache key covers (API.md section 6), tried as a user hits it: closures, instances,
lambdas, input types, helpers edited between processes, uncacheable values, CachePolicy,
and miss reasons that say what changed; on the in-memory and the SQLite stack."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import flowcore
from flowcore import (
    CachePolicy,
    Client,
    ConfigError,
    Pipeline,
    PipelineRun,
    Stack,
    Step,
    StepRun,
    StepStatus,
    pipeline,
    step,
)

REPO = Path(__file__).resolve().parents[1]
CACHED = StepStatus.CACHED
COMPLETED = StepStatus.COMPLETED


def one_step_pipeline(name: str, the_step: Step, **params: Any) -> Pipeline:
    """A pipeline of one invocation ('s') of `the_step` with these parameters."""

    @pipeline(name=name)
    def p() -> None:
        the_step.with_options()(step_name="s", **params)

    return p


async def run_one(name: str, the_step: Step, **params: Any) -> StepRun:
    """Run `the_step` alone in pipeline `name`; its step run."""
    run: PipelineRun = await one_step_pipeline(name, the_step, **params).run()
    return run.steps["s"]


def miss(sr: StepRun, *fragments: str) -> None:
    """The body ran and the miss reason contains every fragment."""
    assert sr.status is COMPLETED, sr
    assert sr.cache_miss_reason, sr
    for fragment in fragments:
        assert fragment in sr.cache_miss_reason, sr.cache_miss_reason


# -- code identity ------------------------------------------------------------------------


def make_adder(n: int) -> Step:
    @step
    def add(x: int) -> int:
        return x + n

    return add


async def test_factory_made_closures_never_share_an_entry(stack: Stack) -> None:
    """`make_adder(10)` after `make_adder(1)` computes 15, not a cached 6, and says why."""
    add1, add10 = make_adder(1), make_adder(10)
    assert await add1.run(5) == 6
    assert await add10.run(5) == 15
    first = await run_one("adders", add1, x=5)
    miss(first, "no earlier step run with this cache key")
    second = await run_one("adders", add10, x=5)
    miss(second, "closure value 'n' changed")
    assert second.output.load() == 15
    again = await run_one("adders", make_adder(10), x=5)
    assert again.status is CACHED and again.output.load() == 15


class Calc:
    def __init__(self, k: int) -> None:
        self.k = k

    def times(self, x: int) -> int:
        return x * self.k


async def test_bound_methods_of_two_instances_differ(stack: Stack) -> None:
    """`Calc(3).times` and `Calc(2).times` are two entries: the instance's state is in the key."""
    first = await run_one("calc", step(Calc(3).times), x=5)
    assert first.output.load() == 15
    second = await run_one("calc", step(Calc(2).times), x=5)
    miss(second, "state of the instance")
    assert second.output.load() == 10
    assert (await run_one("calc", step(Calc(2).times), x=5)).status is CACHED


async def test_two_lambdas_on_one_line_differ(stack: Stack) -> None:
    """Two lambdas written on one line have one source line but two keys."""
    inc, dbl = step(lambda x: x + 1, name="f"), step(lambda x: x * 2, name="f")
    assert (await run_one("lambdas", inc, x=5)).output.load() == 6
    second = await run_one("lambdas", dbl, x=5)
    miss(second, "code of step 's' changed")
    assert second.output.load() == 10


@dataclass
class Celsius:
    degrees: float


@dataclass
class Fahrenheit:
    degrees: float


class OrderM(BaseModel):
    id: int


class UserM(BaseModel):
    id: int


@step
def make_celsius() -> Celsius:
    return Celsius(10)


@step
def make_fahrenheit() -> Fahrenheit:
    return Fahrenheit(10)


@step
def to_kelvin(t: Any) -> float:
    celsius = t.degrees if isinstance(t, Celsius) else (t.degrees - 32) * 5 / 9
    return round(celsius + 273.15, 2)


@step
def make_order() -> OrderM:
    return OrderM(id=1)


@step
def make_user() -> UserM:
    return UserM(id=1)


@step
def describe(m: Any) -> str:
    return type(m).__name__


@pipeline
def temperatures(kind: str) -> None:
    to_kelvin(make_celsius() if kind == "c" else make_fahrenheit())
    describe(make_order() if kind == "c" else make_user())


async def test_equal_content_of_another_type_is_another_input(stack: Stack) -> None:
    """`to_kelvin(Fahrenheit(10))` is not the cached answer for `Celsius(10)` (dataclasses and
    pydantic models with equal fields), and the reason names the input."""
    first = await temperatures.run(kind="c")
    assert first.steps["to_kelvin"].output.load() == 283.15
    assert first.steps["describe"].output.load() == "OrderM"
    second = await temperatures.run(kind="f")
    miss(second.steps["to_kelvin"], "input 't' changed")
    assert second.steps["to_kelvin"].output.load() == 260.93
    miss(second.steps["describe"], "input 'm' changed")
    assert second.steps["describe"].output.load() == "UserM"


async def test_miss_reasons_name_the_parameter_and_the_settings(stack: Stack) -> None:
    """A changed parameter or settings block is named in the reason; unchanged steps hit."""

    @step
    def train(lr: float) -> float:
        return lr * 2

    first = await run_one("reasons", train, lr=0.1)
    miss(first, "no earlier step run with this cache key")
    assert (await run_one("reasons", train, lr=0.1)).status is CACHED
    miss(await run_one("reasons", train, lr=0.2), "parameter 'lr' changed")
    changed = await run_one("reasons", train.with_options(settings={"model": {"depth": 2}}), lr=0.2)
    miss(changed, "settings changed")
    stored = Client().get_pipeline_run(changed.pipeline_run_id).steps["s"]
    assert stored.cache_components == changed.cache_components
    assert stored.cache_components is not None and "parameter:lr" in stored.cache_components
    Client().clear_cache()
    cleared = await run_one("reasons", train.with_options(settings={"model": {"depth": 2}}), lr=0.2)
    miss(cleared, "no longer in the cache")


# -- helpers edited between processes -------------------------------------------------------

FLOW = '''
import json, sys
import flowcore
from flowcore import Stack, pipeline, step
import helpers
from shared import scale

@step
def compute(x: int) -> int:
    return scale(helpers.normalize(x)) + helpers.RATE

@pipeline
def edited():
    compute(5)

flowcore.set_active_stack(Stack.local(sys.argv[1]))
sr = edited().steps["compute"]
print(json.dumps({"status": sr.status.value, "output": sr.output.load(),
                  "reason": sr.cache_miss_reason, "key": sr.cache_key}))
'''


def run_flow(tmp_path: Path, seed: str) -> dict[str, Any]:
    """Run flow.py in a new process (its own hash seed, no stale bytecode)."""
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "flow.py"), str(tmp_path / "stack")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_edited_helper_constant_and_imported_function_miss_in_a_new_process(tmp_path: Path) -> None:
    """Editing a helper function, a module constant or an imported function of the user's own
    modules is a miss in the next process, with a reason naming it; unchanged code hits with
    the same key under another hash seed."""
    (tmp_path / "flow.py").write_text(FLOW)
    helpers = tmp_path / "helpers.py"
    helpers.write_text("RATE = 100\n\ndef normalize(x):\n    return x * 2\n")
    shared = tmp_path / "shared.py"
    shared.write_text("def scale(x):\n    return x + 1\n")

    first = run_flow(tmp_path, "1")
    assert (first["status"], first["output"]) == ("completed", 111)
    assert first["reason"] == "no earlier step run with this cache key"
    again = run_flow(tmp_path, "2")
    assert (again["status"], again["key"]) == ("cached", first["key"])

    helpers.write_text("RATE = 100\n\ndef normalize(x):\n    return x * 3\n")
    edited = run_flow(tmp_path, "3")
    assert (edited["status"], edited["output"]) == ("completed", 116)
    assert "code of helper `normalize` changed" in edited["reason"]

    helpers.write_text("RATE = 200\n\ndef normalize(x):\n    return x * 3\n")
    constant = run_flow(tmp_path, "4")
    assert (constant["status"], constant["output"]) == ("completed", 216)
    assert "module-level value `RATE` changed" in constant["reason"]

    shared.write_text("def scale(x):\n    return x + 2\n")
    imported = run_flow(tmp_path, "5")
    assert (imported["status"], imported["output"]) == ("completed", 217)
    assert "code of helper `scale` changed" in imported["reason"]
    assert run_flow(tmp_path, "6")["status"] == "cached"


# -- values that cannot be reduced to content -----------------------------------------------


async def test_closure_over_a_socket_is_uncached_with_a_reason(stack: Stack) -> None:
    """A step whose closure holds an open socket runs every time and says why."""
    with socket.socket() as sock:

        @step
        def ping() -> bool:
            return sock.fileno() >= 0

        for _ in range(2):
            sr = await run_one("sockets", ping)
            miss(sr, "uncacheable", "closure value 'sock'", "step 's'", "socket")
            assert sr.cache_key is None


# -- CachePolicy ----------------------------------------------------------------------------


async def test_expires_after_makes_old_entries_misses(stack: Stack) -> None:
    """An entry older than `expires_after` is a miss saying it expired; a fresh one hits."""
    calls: list[int] = []

    @step(cache_policy=CachePolicy(expires_after=timedelta(seconds=0.5)))
    def fetch() -> int:
        calls.append(1)  # only appended to: not a value the output depends on
        return 42

    assert (await run_one("expiry", fetch)).status is COMPLETED
    assert (await run_one("expiry", fetch)).status is CACHED
    await asyncio.sleep(1.0)
    late = await run_one("expiry", fetch)
    miss(late, "cached entry expired")
    assert len(calls) == 2


async def test_depends_on_a_data_file(stack: Stack, tmp_path: Path) -> None:
    """A step depending on a data file misses when the file's content changes (same size
    too), hits when it does not, and is uncached while the file is missing."""
    data = tmp_path / "rates.csv"

    @step(cache_policy=CachePolicy(depends_on=(data,)))
    def read_rates() -> str:
        return data.read_text() if data.exists() else "none"

    missing = await run_one("data_file", read_rates)
    miss(missing, "uncacheable", "does not exist")
    data.write_text("a,1\n")
    assert (await run_one("data_file", read_rates)).output.load() == "a,1\n"
    assert (await run_one("data_file", read_rates)).status is CACHED
    data.write_text("a,2\n")
    changed = await run_one("data_file", read_rates)
    miss(changed, "dependency", "rates.csv")
    assert changed.output.load() == "a,2\n"


async def test_ignored_parameter_is_left_out_of_the_key(stack: Stack) -> None:
    """A parameter named in `ignore` does not change the key; another one does."""

    @step(cache_policy=CachePolicy(ignore=("verbose",)))
    def total(n: int, verbose: bool = False) -> int:
        return n * 2

    assert (await run_one("ignored", total, n=1, verbose=False)).status is COMPLETED
    assert (await run_one("ignored", total, n=1, verbose=True)).status is CACHED
    miss(await run_one("ignored", total, n=2, verbose=True), "parameter 'n' changed")


def test_bad_cache_policies_are_config_errors_naming_step_and_key() -> None:
    """Unknown ignore names and bad values are ConfigErrors before any run, at every entry."""

    def f(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match=r"step 'f'.*cache_policy.*'nope'"):
        step(cache_policy=CachePolicy(ignore=("nope",)))(f)
    with pytest.raises(ConfigError, match=r"step 'f'.*cache_policy.*expires_after"):
        step(cache_policy={"expires_after": -1})(f)
    with pytest.raises(ConfigError, match=r"step 'f'.*cache_policy"):
        step(f).with_options(cache_policy=42)
    with pytest.raises(ConfigError, match="depends_on"):
        CachePolicy(depends_on=(42,))

    @pipeline(cache_policy=CachePolicy(ignore=("nope",)))
    def p() -> None:
        step(f)(1)

    with pytest.raises(ConfigError, match=r"pipeline 'p'.*'nope'"):
        p.compile()


async def test_pipeline_level_policy_applies_to_its_steps(stack: Stack) -> None:
    """A pipeline's `cache_policy` (set with with_options) ignores a parameter of its step."""

    @step
    def total(n: int, seed: int) -> int:
        return n

    @pipeline(name="pl_policy")
    def p(seed: int) -> None:
        total(1, seed=seed, step_name="s")

    ignoring = p.with_options(cache_policy=CachePolicy(ignore=("seed",)))
    assert (await ignoring.run(seed=1)).steps["s"].status is COMPLETED
    assert (await ignoring.run(seed=2)).steps["s"].status is CACHED
    assert (await p.run(seed=3)).steps["s"].status is COMPLETED


# -- property: a hit is what running the body returns ---------------------------------------

TEMPLATE = '''
RATE = {rate!r}

def helper(x):
    return x * {k} + RATE

def make(c):
    def body(p):
        return {expr}
    return body
'''
EXPRESSIONS = ["helper(p) + c", "p * c", "helper(c) - p", "RATE + p", "c", "helper(p)",
               "[c, p, RATE]", "str(c) + str(helper(p))"]


def build_body(rate: int, k: int, expr: str, c: Any) -> Any:
    """A step body from the vocabulary, compiled into the same module name every time (so
    only its code and values can tell two of them apart)."""
    module = types.ModuleType("hypo_flow")
    exec(compile(TEMPLATE.format(rate=rate, k=k, expr=expr), "<hypo_flow>", "exec"),
         module.__dict__)
    sys.modules["hypo_flow"] = module
    return module.make(c)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_cached_outputs_equal_uncached_outputs(kind: str) -> None:
    """For random bodies (closures over random values, helpers with random constants,
    parameters), every run's output, hit or not, equals calling the body directly."""
    with tempfile.TemporaryDirectory() as tmp:
        flowcore.set_active_stack(Stack.in_memory() if kind == "memory" else Stack.local(tmp))

        @settings(max_examples=60 if kind == "memory" else 25, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(rate=st.integers(0, 3), k=st.integers(1, 3), expr=st.sampled_from(EXPRESSIONS),
               c=st.integers(0, 3), p=st.integers(0, 3))
        def check(rate: int, k: int, expr: str, c: int, p: int) -> None:
            body = build_body(rate, k, expr, c)
            expected = body(p)
            for attempt in range(2):
                sr = one_step_pipeline("hypo", step(body, name="body"), p=p)().steps["s"]
                assert sr.output.load() == expected, (rate, k, expr, c, p, sr)
                assert attempt == 0 or sr.status is CACHED, sr

        try:
            check()
        finally:
            sys.modules.pop("hypo_flow", None)
            flowcore.set_active_stack(None)


async def test_keys_of_unchanged_steps_do_not_change_and_hits_stay_cheap(stack: Stack) -> None:
    """Run to run, an unchanged step keeps its key; its code is analysed once per process."""
    from flowcore import _code_identity

    first = await run_one("stable", make_adder(3), x=1)
    facts = dict(_code_identity._facts)
    second = await run_one("stable", make_adder(3), x=1)
    assert second.status is CACHED and second.cache_key == first.cache_key
    assert dict(_code_identity._facts).keys() == facts.keys()
    assert first.cache_components == second.cache_components
