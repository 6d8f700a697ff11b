"""What a compile reuses from earlier runs (a step's resolved options, bound hooks) is never
stale: each test changes something between two runs of the same objects and checks that the
second run sees the change."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from flowcore import (
    Materializer,
    PipelineDefinitionError,
    RunFailedError,
    Stack,
    StepStatus,
    pipeline,
    step,
)


def _step_run(run: Any, name: str) -> Any:
    return run.steps[name]


async def test_step_configure_after_a_run_is_seen(memory_stack: Stack) -> None:
    @step
    async def add(x: int) -> int:
        return x + 1

    @pipeline
    def p() -> None:
        add(1)

    first = await p.run()
    assert _step_run(first, "add").status is StepStatus.COMPLETED
    assert (await p.run()).steps["add"].status is StepStatus.CACHED
    add.configure(enable_cache=False, settings={"tag": {"v": 1}})
    third = await p.run()
    assert third.steps["add"].status is StepStatus.COMPLETED
    assert third.steps["add"].config.settings == {"tag": {"v": 1}}
    add.configure(enable_cache=True, settings={"tag": {"v": 2}})
    fourth = await p.run()
    assert fourth.steps["add"].config.settings == {"tag": {"v": 2}}


async def test_step_with_options_copy_and_original_resolve_apart(memory_stack: Stack) -> None:
    @step(enable_cache=False)
    async def one() -> int:
        return 1

    cached_one = one.with_options(enable_cache=True)

    @pipeline
    def p() -> None:
        one(step_name="plain")
        cached_one(step_name="cached")

    await p.run()
    second = await p.run()
    assert second.steps["plain"].status is StepStatus.COMPLETED
    assert second.steps["cached"].status is StepStatus.CACHED


async def test_pipeline_with_options_and_configure_between_runs(memory_stack: Stack) -> None:
    @step
    async def one() -> int:
        return 1

    @pipeline
    def p() -> None:
        one()

    await p.run()
    assert (await p.run()).steps["one"].status is StepStatus.CACHED
    assert (await p.with_options(enable_cache=False).run()).steps["one"].status is (
        StepStatus.COMPLETED)
    assert (await p.run()).steps["one"].status is StepStatus.CACHED
    p.configure(enable_cache=False)
    assert (await p.run()).steps["one"].status is StepStatus.COMPLETED


async def test_settings_changed_in_place_after_a_run_are_seen(memory_stack: Stack) -> None:
    step_settings: dict[str, Any] = {"tag": {"v": 1}}
    pipeline_settings: dict[str, Any] = {"label": "a"}

    @step(enable_cache=False, settings=step_settings)
    async def one() -> int:
        return 1

    @pipeline(settings=pipeline_settings)
    def p() -> None:
        one()

    assert (await p.run()).steps["one"].config.settings == {"label": "a", "tag": {"v": 1}}
    # 1 and True are equal in Python but not to a cache key: the change must be seen.
    step_settings["tag"]["v"] = True
    pipeline_settings["label"] = "b"
    settings = (await p.run()).steps["one"].config.settings
    assert settings == {"label": "b", "tag": {"v": True}}
    assert settings["tag"]["v"] is True


async def test_retry_mapping_changed_in_place_is_seen(memory_stack: Stack) -> None:
    retry: dict[str, Any] = {"max_retries": 0}
    calls: list[int] = []

    @step(enable_cache=False, retry=retry)
    async def flaky() -> int:
        calls.append(1)
        raise ValueError("no")

    @pipeline
    def p() -> None:
        flaky()

    with pytest.raises(RunFailedError) as first:
        await p.run()
    assert first.value.run.steps["flaky"].attempts == 1
    retry["max_retries"] = 2
    with pytest.raises(RunFailedError) as second:
        await p.run()
    assert second.value.run.steps["flaky"].attempts == 3


async def test_a_redefined_step_of_the_same_name_is_used(memory_stack: Stack) -> None:
    @step(enable_cache=False)
    async def val() -> int:
        return 1

    steps = {"val": val}

    @pipeline
    def p() -> None:
        steps["val"]()

    assert (await p.run()).steps["val"].output.load() == 1

    @step(enable_cache=False, settings={"new": 1})  # type: ignore[no-redef]
    async def val() -> int:
        return 2

    steps["val"] = val
    run = await p.run()
    assert run.steps["val"].output.load() == 2
    assert run.steps["val"].config.settings == {"new": 1}


async def test_yaml_changed_between_runs_is_seen(memory_stack: Stack, tmp_path: Path) -> None:
    @step
    async def scale(k: int) -> int:
        return k * 10

    @pipeline
    def p() -> None:
        scale(k=0)

    conf = tmp_path / "run.yaml"
    configured = p.with_options(config_path=str(conf))
    conf.write_text("steps:\n  scale:\n    parameters: {k: 1}\n")
    first = await configured.run()
    assert first.steps["scale"].output.load() == 10
    conf.write_text(textwrap.dedent("""\
        enable_cache: false
        steps:
          scale:
            parameters: {k: 2}
            settings: {tag: 7}
    """))
    second = await configured.run()
    assert second.steps["scale"].output.load() == 20
    assert second.steps["scale"].config.settings == {"tag": 7}
    conf.write_text("steps:\n  scale:\n    parameters: {k: 1}\n")
    third = await configured.run()
    assert third.steps["scale"].status is StepStatus.CACHED
    assert third.steps["scale"].config.settings == {}


class _Point:
    def __init__(self, x: int) -> None:
        self.x = x


async def test_a_materializer_registered_between_runs_is_used(memory_stack: Stack) -> None:
    @step(enable_cache=False)
    async def make() -> _Point:
        return _Point(3)

    @pipeline
    def p() -> None:
        make()

    before = (await p.run()).steps["make"].output
    assert "PointMaterializer" not in before.materializer

    class PointMaterializer(Materializer):
        ASSOCIATED_TYPES = (_Point,)

        def save(self, data: Any, uri: str) -> None:
            (Path(uri) / "x.txt").write_text(str(data.x))

        def load(self, data_type: type, uri: str) -> Any:
            return _Point(int((Path(uri) / "x.txt").read_text()))

    after = (await p.run()).steps["make"].output
    assert "PointMaterializer" in after.materializer
    assert after.load().x == 3


async def test_output_materializer_option_changed_by_configure(memory_stack: Stack) -> None:
    class TextOne(Materializer):
        ASSOCIATED_TYPES = ()

        def save(self, data: Any, uri: str) -> None:
            (Path(uri) / "v").write_text(f"one:{data}")

        def load(self, data_type: type, uri: str) -> Any:
            return (Path(uri) / "v").read_text()

    class TextTwo(TextOne):
        def save(self, data: Any, uri: str) -> None:
            (Path(uri) / "v").write_text(f"two:{data}")

    @step(enable_cache=False, output_materializers=TextOne)
    async def text() -> str:
        return "x"

    @pipeline
    def p() -> None:
        text()

    assert (await p.run()).steps["text"].output.materializer.endswith("TextOne")
    text.configure(output_materializers=TextTwo)
    assert (await p.run()).steps["text"].output.materializer.endswith("TextTwo")


def test_enforce_annotations_flag_toggled_between_compiles(monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    @step
    def loose(x):  # type: ignore[no-untyped-def]
        return x

    @pipeline
    def p() -> None:
        loose(1)

    assert len(p.compile()) == 1
    monkeypatch.setenv("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS", "true")
    with pytest.raises(PipelineDefinitionError, match="FLOWCORE_ENFORCE_TYPE_ANNOTATIONS"):
        p.compile()
    monkeypatch.setenv("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS", "false")
    assert len(p.compile()) == 1


async def test_hook_changed_by_configure_is_called(memory_stack: Stack) -> None:
    seen: list[str] = []

    def first_hook(step_name: str) -> None:
        seen.append(f"first:{step_name}")

    def second_hook(status: Any) -> None:
        seen.append(f"second:{status}")

    @step(enable_cache=False, on_success=first_hook)
    async def one() -> int:
        return 1

    @pipeline
    def p() -> None:
        one()

    await p.run()
    one.configure(on_success=second_hook)
    await p.run()
    assert seen == ["first:one", "second:completed"]


class LateError(Exception):
    """Bound below only once it exists under this name (see the test)."""


async def test_hook_annotation_resolved_later_is_bound_again(memory_stack: Stack) -> None:
    got: list[Any] = []

    def on_failure(err: _LaterError = None) -> None:  # type: ignore[name-defined]  # noqa: F821
        got.append(err)

    @step(enable_cache=False, on_failure=on_failure)
    async def boom() -> None:
        raise LateError("boom")

    @pipeline
    def p() -> None:
        boom()

    # `_LaterError` does not exist yet: the parameter has a default, so the hook asks for
    # nothing and gets called without the exception.
    with pytest.raises(RunFailedError):
        await p.run()
    globals()["_LaterError"] = LateError
    try:
        with pytest.raises(RunFailedError):
            await p.run()
    finally:
        del globals()["_LaterError"]
    assert got[0] is None
    assert isinstance(got[1], LateError)


async def test_the_pipeline_function_runs_on_every_compile(memory_stack: Stack) -> None:
    @step(enable_cache=False)
    async def item(k: int) -> int:
        return k

    calls: list[int] = []

    @pipeline
    def p(n: int) -> None:
        calls.append(n)
        for k in range(n):
            item(k=k)

    assert len((await p.run(n=2)).steps) == 2
    assert len((await p.run(n=3)).steps) == 3
    assert calls == [2, 3]


def test_a_handle_from_another_recording_is_a_definition_error() -> None:
    @step
    def src() -> int:
        return 1

    @step
    def use(x: int) -> int:
        return x

    kept: list[Any] = []

    @pipeline
    def other() -> None:
        kept.append(src(step_name="elsewhere"))

    @pipeline
    def p() -> None:
        use(kept[0])

    other.compile()
    with pytest.raises(PipelineDefinitionError, match="elsewhere"):
        p.compile()
