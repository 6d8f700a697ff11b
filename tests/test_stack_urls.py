"""Stores named by URL (API.md section 18): `Stack.from_urls(...)` and `url:` keys in a stack
YAML file, with `sqlite:///...` and plain paths still working and bad URLs a ConfigError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowcore import Client, ConfigError, RunStatus, Stack, pipeline, step


@step(enable_cache=False)
def answer() -> int:
    return 42


@step(enable_cache=False)
def blob() -> str:
    return "b" * 5000  # over the inline limit: a file in the artifact store (small ones are
    # kept in their metadata row)


@pipeline
def answer_pipeline() -> None:
    answer()
    blob()


def write(path: Path, text: str) -> Path:
    """Write `text` to `path` (creating parents) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def runs_and_reloads(stack: Stack, again: Stack) -> None:
    """A run on `stack` completes and a second stack on the same stores loads its output."""
    run = answer_pipeline.with_options(stack=stack)()
    assert run.status is RunStatus.COMPLETED
    seen = Client(again).get_pipeline_run(run.name)
    assert seen.id == run.id
    assert seen.steps["answer"].output.load() == 42


def test_sqlite_url_with_an_absolute_path(tmp_path: Path) -> None:
    """`sqlite:////abs/x.db` keeps the database at that file and artifacts beside it."""
    url = f"sqlite:///{tmp_path / 'meta' / 'x.db'}"
    assert url.startswith("sqlite:////")
    stack = Stack.from_urls(metadata=url)
    runs_and_reloads(stack, Stack.from_urls(metadata=url))
    assert (tmp_path / "meta" / "x.db").is_file()
    assert (tmp_path / "meta" / "artifacts").is_dir()


def test_sqlite_url_with_a_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///rel/x.db` (three slashes) is relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    stack = Stack.from_urls(metadata="sqlite:///rel/x.db")
    runs_and_reloads(stack, Stack.from_urls(metadata=str(tmp_path / "rel" / "x.db")))
    assert (tmp_path / "rel" / "x.db").is_file()


def test_plain_paths_for_both_stores(tmp_path: Path) -> None:
    """A directory for metadata holds flowcore.db; a plain artifacts path is a local store."""
    stack = Stack.from_urls(metadata=str(tmp_path / "db"), artifacts=str(tmp_path / "blobs"))
    run = answer_pipeline.with_options(stack=stack)()
    assert (tmp_path / "db" / "flowcore.db").is_file()
    uri = Path(run.steps["blob"].output.uri).resolve()
    assert uri.is_relative_to((tmp_path / "blobs").resolve())
    runs_and_reloads(stack, Stack.from_urls(metadata=str(tmp_path / "db"),
                                            artifacts=f"file://{tmp_path / 'blobs'}"))


def test_memory_urls_keep_everything_in_the_process(tmp_path: Path) -> None:
    """`memory` for both stores is an in-memory stack: nothing is written to disk."""
    stack = Stack.from_urls(metadata="memory", artifacts="memory")
    assert stack.is_in_memory
    runs_and_reloads(stack, stack)
    home = Path(os.environ["FLOWCORE_HOME"])
    assert not home.exists() or not any(home.rglob("*"))


@pytest.mark.parametrize("url", ["mysql://db/flowcore", "redis://127.0.0.1/0", "sqlite://"])
def test_unknown_metadata_scheme_is_config_error_naming_the_url(url: str) -> None:
    """A metadata URL flowcore has no store for is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=url.split("://")[0]):
        Stack.from_urls(metadata=url)


def test_empty_urls_are_config_errors() -> None:
    """An empty metadata or artifact URL is a ConfigError saying so."""
    with pytest.raises(ConfigError, match="metadata store URL is empty"):
        Stack.from_urls(metadata="")
    with pytest.raises(ConfigError, match="artifact store URL is empty"):
        Stack.from_urls(metadata="memory", artifacts=" ")


def test_storage_options_for_a_local_directory_are_config_error(tmp_path: Path) -> None:
    """storage_options mean nothing to a local directory: a ConfigError, not silence."""
    with pytest.raises(ConfigError, match="storage_options"):
        Stack.from_urls(metadata="memory", artifacts=str(tmp_path), storage_options={"key": "x"})


def test_yaml_url_keys(tmp_path: Path) -> None:
    """`metadata_store: {url: sqlite:///...}` and `artifact_store: {url: ...}` in a stack file
    build the same stores as Stack.from_urls; relative sqlite URLs are relative to the file."""
    path = write(tmp_path / "conf" / "stack.yaml", f"""
metadata_store: {{url: "sqlite:///meta/flowcore.db"}}
artifact_store: {{url: "file://{tmp_path / 'blobs'}"}}
""")
    stack = Stack.from_yaml(path)
    runs_and_reloads(stack, Stack.from_yaml(path))
    assert (tmp_path / "conf" / "meta" / "flowcore.db").is_file()
    assert any((tmp_path / "blobs").iterdir())


def test_yaml_path_that_reads_like_a_url_word_is_still_a_path(tmp_path: Path) -> None:
    """`{path: memory}` is a directory named memory, not the in-memory store."""
    path = write(tmp_path / "stack.yaml", "metadata_store: {path: memory}\n")
    stack = Stack.from_yaml(path)
    assert not stack.is_in_memory
    answer_pipeline.with_options(stack=stack)()
    assert (tmp_path / "memory" / "flowcore.db").is_file()


@pytest.mark.parametrize(("text", "key"), [
    ("metadata_store: {path: a.db, url: 'sqlite:///b.db'}\n", "metadata_store"),
    ("metadata_store: {}\n", "metadata_store"),
    ("metadata_store: {url: 'mysql://x/y'}\n", "metadata_store"),
    ("artifact_store: {path: blobs, storage_options: {key: x}}\n", "artifact_store"),
    ("artifact_store: {url: blobs, region: x}\n", "region"),
])
def test_yaml_bad_store_blocks_are_config_errors_naming_file_and_key(
    tmp_path: Path, text: str, key: str
) -> None:
    """Both of path and url, neither, an unknown scheme, options for a local directory or an
    unknown key: a ConfigError naming the file and the key."""
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        Stack.from_yaml(path)
    assert "bad.yaml" in str(info.value) and key in str(info.value)


def test_repr_names_where_the_metadata_lives(tmp_path: Path) -> None:
    """A stack's repr shows its database's directory, or 'memory'."""
    assert str(tmp_path) in repr(Stack.from_urls(metadata=f"sqlite:///{tmp_path}/x.db"))
    assert "memory" in repr(Stack.from_urls(metadata="memory"))


async def test_heartbeat_timeout_parameter_reaches_the_store(tmp_path: Path) -> None:
    """`?heartbeat_timeout=5` on a metadata URL sets how long a silent run counts as alive,
    and is not left in the path of the database."""
    stack = Stack.from_urls(metadata=f"sqlite:///{tmp_path}/x.db?heartbeat_timeout=5")
    store = await stack.metadata_store()
    try:
        assert store._stale_after.total_seconds() == 5  # type: ignore[attr-defined]
        assert (tmp_path / "x.db").is_file()
    finally:
        await stack.close()


@pytest.mark.parametrize("value", ["0", "-1", "soon", ""])
def test_bad_heartbeat_timeout_is_config_error(value: str) -> None:
    """A heartbeat_timeout that is not a positive number of seconds is a ConfigError."""
    with pytest.raises(ConfigError, match="heartbeat_timeout"):
        Stack.from_urls(metadata=f"sqlite:///x.db?heartbeat_timeout={value}")
