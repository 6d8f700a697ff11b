"""The local artifact store and the SQLite store on real files, across real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from pydantic import BaseModel

from flowcore._models import ArtifactVersion
from flowcore.exceptions import ArtifactLoadError, MaterializerError
from flowcore.materializers import (
    CloudpickleMaterializer,
    Materializer,
    directory_digest,
    hash_directory,
    materializer_for,
)
from flowcore.stores._local import SIGNATURE_FILE, LocalArtifactStore

REPO = Path(__file__).resolve().parent.parent


class Model(BaseModel):
    name: str
    scores: list[float]


@dataclasses.dataclass
class Params:
    lr: float
    name: str


class Opaque:
    """A plain class no built-in materializer handles: it is pickled."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


class Touch:
    """Unpickling this creates a file: proof that a refused pickle was never unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    """A local artifact store under tmp_path/home/artifacts."""
    return LocalArtifactStore(tmp_path / "home" / "artifacts")


async def save(store: LocalArtifactStore, value: Any,
               materializer: type[Materializer] | None = None) -> ArtifactVersion:
    return await store.save(
        value, materializer=materializer or materializer_for(type(value)),
        data_type=type(value), name="output", producer_step_run_id="sr-1",
        step_label="pipeline 'p', step 'train', output 'output'")


def artifact_dirs(store: LocalArtifactStore) -> list[Path]:
    return [d for prefix in store.root.iterdir() if not prefix.name.startswith(".")
            for d in prefix.iterdir()]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize(
    "value",
    [None, True, 42, 2.5, "text", b"\x00bytes", [1, [2, "x"]], {"a": {"b": None}}, (1, 2),
     {1, 2, 3}, frozenset({"a"}), Model(name="m", scores=[0.5]), Params(lr=0.1, name="n"),
     Opaque(7), {1: "int keys fall back to pickle"}, [(1, 2)]],
    ids=repr,
)
async def test_every_value_round_trips(store: LocalArtifactStore, value: Any) -> None:
    """Each value loads back equal and of the same type, sync and async."""
    artifact = await save(store, value)
    assert artifact.load() == value and type(artifact.load()) is type(value)
    assert await artifact.aload() == value
    assert store.exists(artifact)
    assert artifact.content_hash == hash_directory(artifact.uri)
    assert artifact.size is not None and artifact.size > 0
    assert artifact.producer_step_run_id == "sr-1"
    assert artifact.python_version == "{}.{}.{}".format(*sys.version_info[:3])


async def test_numpy_and_path_round_trip(store: LocalArtifactStore, tmp_path: Path) -> None:
    """Arrays load back equal; a Path loads back as a copy inside the artifact."""
    array = np.linspace(0, 1, 7)
    loaded = (await save(store, array)).load()
    np.testing.assert_array_equal(loaded, array)
    src = tmp_path / "report.txt"
    src.write_text("hello")
    copy = (await save(store, src)).load()
    assert copy.read_text() == "hello" and store.root in copy.parents


async def test_records_materializer_and_type_names(store: LocalArtifactStore) -> None:
    """The artifact names its materializer and data type as module.qualname."""
    artifact = await save(store, Params(lr=1.0, name="x"))
    assert artifact.materializer == (
        "flowcore.materializers._builtin.DataclassMaterializer")
    assert artifact.data_type == f"{__name__}.Params"


async def test_local_dataclass_loads_back_in_this_process(store: LocalArtifactStore) -> None:
    """A type defined in a function body loads back by name within the same process."""

    @dataclasses.dataclass
    class LocalPoint:
        x: int

    artifact = await save(store, LocalPoint(3))
    assert "<locals>" in artifact.data_type
    assert artifact.load() == LocalPoint(3)


async def test_fallback_is_logged_and_recorded(store: LocalArtifactStore,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A value the built-in refuses is pickled, recorded as such, with a warning naming the step."""
    with caplog.at_level(logging.WARNING, logger="flowcore"):
        artifact = await save(store, {1: "a"})
    assert artifact.materializer.endswith("CloudpickleMaterializer")
    assert "step 'train'" in caplog.text and "dict" in caplog.text
    assert (Path(artifact.uri) / SIGNATURE_FILE).is_file()


async def test_tampered_pickle_is_refused_before_unpickling(store: LocalArtifactStore,
                                                            tmp_path: Path) -> None:
    """A pickle replaced after saving fails its integrity check (hash, then signature) and is
    never unpickled."""
    artifact = await save(store, Opaque(1))
    marker = tmp_path / "unpickled"
    (Path(artifact.uri) / "artifact.pkl").write_bytes(pickle.dumps(Touch(str(marker))))
    with pytest.raises(ArtifactLoadError, match=r"damaged|signature"):
        artifact.load()
    assert not marker.exists()


async def test_missing_signature_is_refused(store: LocalArtifactStore) -> None:
    """A pickle without its signature file is refused."""
    artifact = await save(store, Opaque(2))
    (Path(artifact.uri) / SIGNATURE_FILE).unlink()
    with pytest.raises(ArtifactLoadError, match=artifact.id):
        artifact.load()


async def test_pickle_signed_with_another_key_is_refused(store: LocalArtifactStore,
                                                         tmp_path: Path) -> None:
    """A store with another signing key refuses this store's pickles."""
    artifact = await save(store, Opaque(3))
    other = LocalArtifactStore(store.root, key_path=tmp_path / "other.key")
    await save(other, Opaque(4))  # creates the other key
    with pytest.raises(ArtifactLoadError, match="signature"):
        other.bind(artifact).load()


async def test_wrong_python_version_is_refused(store: LocalArtifactStore) -> None:
    """A pickle recorded under another Python major.minor raises ArtifactLoadError."""
    saved = await save(store, Opaque(5))
    (Path(saved.uri) / "metadata.json").write_text('{"python_version": "3.6.0"}')
    # As recorded by that other Python: its hash and size are those of the files as they are.
    digest, size = directory_digest(saved.uri)
    artifact = store.bind(ArtifactVersion(
        id=saved.id, name=saved.name, uri=saved.uri, materializer=saved.materializer,
        data_type=saved.data_type, content_hash=digest, size=size))
    with pytest.raises(ArtifactLoadError, match=r"3\.6\.0"):
        artifact.load()


async def test_unpicklable_value_raises_materializer_error(store: LocalArtifactStore) -> None:
    """A threading.Lock raises MaterializerError naming the step and the type, leaving no files."""
    with pytest.raises(MaterializerError, match=r"step 'train'.*lock"):
        await save(store, threading.Lock())
    assert list(store.root.iterdir()) == []


async def test_equal_values_share_one_directory(store: LocalArtifactStore) -> None:
    """Equal values get equal hashes and one directory; a different value gets another."""
    first = await save(store, {"weights": [1, 2, 3]})
    second = await save(store, {"weights": [1, 2, 3]})
    assert first.id != second.id
    assert first.content_hash == second.content_hash and first.uri == second.uri
    third = await save(store, {"weights": [1, 2, 4]})
    assert third.content_hash != first.content_hash
    assert len(artifact_dirs(store)) == 2
    assert Path(first.uri) == store.root / first.content_hash[:2] / first.content_hash


async def test_concurrent_equal_saves_leave_one_directory(store: LocalArtifactStore) -> None:
    """Many concurrent saves of one value end in one directory and no staging leftovers."""
    artifacts = await asyncio.gather(*(save(store, Opaque(9)) for _ in range(12)))
    assert len({a.uri for a in artifacts}) == 1
    assert len(artifact_dirs(store)) == 1
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert all(a.load() == Opaque(9) for a in artifacts)


async def test_signing_key_is_private_and_reused(store: LocalArtifactStore) -> None:
    """The key is made on the first pickle, next to the artifacts, mode 0600, then reused."""
    key = store.root.parent / "signing.key"
    await save(store, [1])
    assert not key.exists()  # JSON artifacts need no key
    artifact = await save(store, Opaque(1))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    assert len(first) == 32
    again = LocalArtifactStore(store.root)
    await save(again, Opaque(2))
    assert key.read_bytes() == first
    assert again.bind(artifact).load() == Opaque(1)


async def test_new_key_re_signs_reused_pickles(store: LocalArtifactStore) -> None:
    """After the key is replaced, saving equal content again re-signs the shared directory."""
    old = await save(store, Opaque(6))
    store.key_path.unlink()
    fresh = LocalArtifactStore(store.root)
    new = await save(fresh, Opaque(6))
    assert new.uri == old.uri
    assert new.load() == Opaque(6)


async def test_missing_directory_fails_to_load(store: LocalArtifactStore) -> None:
    """A deleted artifact directory is reported by exists() and by load()."""
    artifact = await save(store, "gone soon")
    import shutil

    shutil.rmtree(artifact.uri)
    assert not store.exists(artifact)
    with pytest.raises(ArtifactLoadError, match=artifact.id) as info:
        artifact.load()
    assert artifact.uri in str(info.value)


async def test_pickle_from_another_process_loads(store: LocalArtifactStore) -> None:
    """A pickle saved by another process (sharing the key file) loads here."""
    code = (
        "import asyncio, sys\n"
        "from flowcore.materializers import CloudpickleMaterializer\n"
        "from flowcore.stores._local import LocalArtifactStore\n"
        "async def main():\n"
        f"    s = LocalArtifactStore({str(store.root)!r})\n"
        "    a = await s.save({'made': 'elsewhere'}, materializer=CloudpickleMaterializer,\n"
        "        data_type=dict, name='o', producer_step_run_id='x', step_label='s')\n"
        "    print(a.uri)\n"
        "asyncio.run(main())\n"
    )
    proc = await anyio.run_process([sys.executable, "-c", code], env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    uri = proc.stdout.decode().strip()
    artifact = ArtifactVersion(id="x", name="o", uri=uri,
                               materializer="flowcore.materializers._cloudpickle."
                               "CloudpickleMaterializer", data_type="builtins.dict")
    assert store.bind(artifact).load() == {"made": "elsewhere"}
    assert CloudpickleMaterializer.__name__ in artifact.materializer


# -- several processes on one SQLite file ---------------------------------------------------

WORKER = '''
import asyncio, os, sys, time, uuid
from datetime import UTC, datetime
from flowcore._models import PipelineRun, RunStatus, StepRun, StepRunConfig, StepStatus
from flowcore.exceptions import RunNameConflictError
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._sqlite import SqliteMetadataStore

home, mode, tag = sys.argv[1], sys.argv[2], sys.argv[3]

def new_run(name, steps):
    run = PipelineRun(id=uuid.uuid4().hex, name=name, pipeline_name="p",
                      start_time=datetime.now(UTC))
    for s in steps:
        run.steps[s] = StepRun(id=uuid.uuid4().hex, name=s, step_name=s, pipeline_run_id=run.id,
                               config=StepRunConfig(parameters={"tag": tag}))
    return run

async def one_run(store, name):
    run = new_run(name, ["a", "b", "c"])
    await store.create_run(run)
    for status in (StepStatus.RUNNING, StepStatus.COMPLETED):
        for sr in run.steps.values():
            sr.status = status
        await asyncio.gather(*(store.update_step_run(run, sr) for sr in run.steps.values()))
    run.status = RunStatus.COMPLETED
    await store.update_run(run)

async def main():
    store = SqliteMetadataStore(os.path.join(home, "flowcore.db"),
                                LocalArtifactStore(os.path.join(home, "artifacts")))
    await store.open()
    open(os.path.join(home, "ready-" + tag), "w").close()
    while not os.path.exists(os.path.join(home, "go")):
        time.sleep(0.005)
    try:
        if mode == "race":
            try:
                await store.create_run(new_run("contested", ["a"]))
                print("created")
            except RunNameConflictError:
                print("conflict")
        else:
            for i in range(0, 25, 5):
                await asyncio.gather(*(one_run(store, f"{tag}-{j}") for j in range(i, i + 5)))
            print("done")
    finally:
        await store.close()

asyncio.run(main())
'''


def run_workers(home: Path, mode: str, count: int) -> list[subprocess.CompletedProcess[str]]:
    home.mkdir(parents=True, exist_ok=True)
    script = home / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(home), mode, f"w{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in range(count)]
    deadline = time.monotonic() + 60
    while len(list(home.glob("ready-*"))) < count and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.01)
    (home / "go").touch()  # release every worker at once
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_two_processes_racing_for_one_run_name(tmp_path: Path) -> None:
    """Two processes creating the same run name at once: exactly one succeeds."""
    results = run_workers(tmp_path / "home", "race", 2)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert sorted(r.stdout.strip() for r in results) == ["conflict", "created"]
    with sqlite3.connect(tmp_path / "home" / "flowcore.db") as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_four_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    """Four processes writing runs concurrently: no 'database is locked', every row stored."""
    results = run_workers(tmp_path / "home", "write", 4)
    for r in results:
        assert r.returncode == 0, r.stderr
        assert "locked" not in r.stderr
        assert r.stdout.strip() == "done"
    with sqlite3.connect(tmp_path / "home" / "flowcore.db") as db:
        runs = db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        steps = db.execute("SELECT status, COUNT(*) FROM step_runs GROUP BY status").fetchall()
    assert runs == [("completed", 100)]
    assert steps == [("completed", 300)]


async def test_content_deleted_behind_our_back_is_written_again(tmp_path: Path) -> None:
    """After an artifact directory is deleted, saving the same small value writes it again
    (the store's memory of stored digests does not outlive exists() saying it is gone)."""
    import shutil

    from flowcore.materializers import materializer_for

    store = LocalArtifactStore(tmp_path / "artifacts")
    first = await store.save(41, materializer=materializer_for(int), data_type=int, name="output",
                             producer_step_run_id="s1", step_label="step 's'")
    shutil.rmtree(first.uri)
    assert not store.exists(first)
    second = await store.save(41, materializer=materializer_for(int), data_type=int,
                              name="output", producer_step_run_id="s2", step_label="step 's'")
    assert second.uri == first.uri and store.exists(second)
    assert second.load() == 41
