"""The fsspec artifact store against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import _s3_server
import cloudpickle
import numpy as np
import pytest
from _s3_server import S3, free_port, s3_filesystem

from flowcore import AsyncClient, Materializer, Stack, pipeline, step
from flowcore._models import ArtifactVersion, StepStatus
from flowcore.exceptions import ArtifactLoadError, StoreError
from flowcore.materializers import hash_directory, materializer_for
from flowcore.stores._fsspec import FsspecArtifactStore
from flowcore.stores._fsspec_remote import MANIFEST
from flowcore.stores._sqlite import SqliteMetadataStore

REPO = Path(__file__).resolve().parent.parent

# The server and bucket fixtures, registered in this module by name.
s3_endpoint = _s3_server.s3_endpoint
s3_bucket = _s3_server.s3_bucket


class Table:
    """Columns of numbers, stored by its own materializer as several files."""

    def __init__(self, columns: dict[str, list[float]]) -> None:
        self.columns = columns

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and other.columns == self.columns

    __hash__ = None  # type: ignore[assignment]


class TableMaterializer(Materializer):
    """One text file per column under columns/, a schema, and an empty directory it expects."""

    ASSOCIATED_TYPES = (Table,)

    def save(self, data: Any, uri: str) -> None:
        os.makedirs(os.path.join(uri, "columns"))
        os.makedirs(os.path.join(uri, "scratch", "empty"))
        for name, values in data.columns.items():
            with open(os.path.join(uri, "columns", f"{name}.txt"), "w") as f:
                f.write("\n".join(map(repr, values)))
        with open(os.path.join(uri, "schema.json"), "w") as f:
            json.dump(sorted(data.columns), f)

    def load(self, data_type: type, uri: str) -> Any:
        assert os.path.isdir(os.path.join(uri, "scratch", "empty"))
        with open(os.path.join(uri, "schema.json")) as f:
            names = json.load(f)
        columns = {}
        for name in names:
            with open(os.path.join(uri, "columns", f"{name}.txt")) as f:
                columns[name] = [float(v) for v in f.read().split("\n")]
        return Table(columns)


class Opaque:
    """No built-in materializer handles it: pickled."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


@step
def make_weights() -> np.ndarray:
    return np.linspace(0.0, 1.0, 2_000)


@step
def make_table(w: np.ndarray) -> Table:
    return Table({"low": [float(w.min())], "high": [float(w.max())], "n": [float(len(w))]})


@step
def make_opaque() -> Opaque:
    return Opaque(7)


@step
def summarise(t: Table, o: Opaque) -> dict[str, float]:
    return {"high": t.columns["high"][0], "value": float(o.value)}


@pipeline
def training() -> None:
    summarise(make_table(make_weights()), make_opaque())


def s3_stack(s3: S3, tmp_path: Path, prefix: str = "flowcore") -> Stack:
    """A stack of this bucket and a SQLite database under tmp_path (new store objects)."""
    db = tmp_path / "flowcore.db"
    return Stack(artifact_store=FsspecArtifactStore(s3.url(prefix), s3.options),
                 metadata_factory=lambda a: SqliteMetadataStore(db, a))


def objects(s3: S3) -> list[str]:
    return sorted(s3_filesystem(s3.endpoint).find(s3.bucket))


async def save(store: FsspecArtifactStore, value: Any) -> ArtifactVersion:
    return await store.save(value, materializer=materializer_for(type(value)),
                            data_type=type(value), name="output", producer_step_run_id="sr-1",
                            step_label="pipeline 'p', step 's', output 'output'")


# -- pipelines on the object store ----------------------------------------------------------

async def test_pipeline_outputs_are_stored_by_content_and_load_back(s3_bucket: S3,
                                                                   tmp_path: Path) -> None:
    """A pipeline's array, multi-file custom, pickled and JSON outputs land under
    <prefix>/<content hash>/ with a manifest, and load back through the client."""
    stack = s3_stack(s3_bucket, tmp_path)
    run = await training.with_options(stack=stack).run()
    assert run.status.value == "completed"
    fetched = await AsyncClient(stack).get_pipeline_run(run.id)
    weights = fetched.steps["make_weights"].output
    np.testing.assert_array_equal(await weights.aload(), np.linspace(0.0, 1.0, 2_000))
    table = fetched.steps["make_table"].output
    assert await table.aload() == Table({"low": [0.0], "high": [1.0], "n": [2000.0]})
    assert await fetched.steps["make_opaque"].output.aload() == Opaque(7)
    assert fetched.steps["summarise"].output.load() == {"high": 1.0, "value": 7.0}
    keys = objects(s3_bucket)
    prefix = f"{s3_bucket.bucket}/flowcore/{table.content_hash}"
    assert table.uri == f"s3://{prefix}"
    assert sorted(k for k in keys if k.startswith(prefix + "/")) == [
        f"{prefix}/{MANIFEST}", f"{prefix}/columns/high.txt", f"{prefix}/columns/low.txt",
        f"{prefix}/columns/n.txt", f"{prefix}/schema.json"]
    for artifact in (weights, table, fetched.steps["make_opaque"].output):
        assert f"{s3_bucket.bucket}/flowcore/{artifact.content_hash}/{MANIFEST}" in keys
        assert await stack.artifact_store.verify(artifact) is None


async def test_cache_hits_across_two_stacks_sharing_bucket_and_database(
        s3_bucket: S3, tmp_path: Path) -> None:
    """A second Stack (new store objects) on the same bucket and database reuses every
    step, and its cached outputs load from the bucket."""
    first = await training.with_options(stack=s3_stack(s3_bucket, tmp_path)).run()
    before = objects(s3_bucket)
    other = s3_stack(s3_bucket, tmp_path)
    second = await training.with_options(stack=other).run()
    assert {sr.status for sr in second.steps.values()} == {StepStatus.CACHED}
    assert objects(s3_bucket) == before
    assert (second.steps["make_table"].output.content_hash
            == first.steps["make_table"].output.content_hash)
    reread = await AsyncClient(other).get_pipeline_run(second.id)
    assert await reread.steps["make_table"].output.aload() == Table(
        {"low": [0.0], "high": [1.0], "n": [2000.0]})


async def test_damaged_object_is_a_cache_miss_and_is_rewritten(s3_bucket: S3,
                                                              tmp_path: Path) -> None:
    """Bytes overwritten in the bucket: load refuses them, verify says damaged, the next run
    misses the cache with that reason, runs the step and heals the stored copy."""
    first = await training.with_options(stack=s3_stack(s3_bucket, tmp_path)).run()
    weights = first.steps["make_weights"].output
    fs = s3_filesystem(s3_bucket.endpoint)
    key = f"{s3_bucket.bucket}/flowcore/{weights.content_hash}/array.npy"
    original = fs.cat_file(key)
    fs.pipe_file(key, original[:-8] + np.float64(42.0).tobytes())  # same size, other bytes
    stack = s3_stack(s3_bucket, tmp_path)
    reread = stack.artifact_store.bind(weights)
    with pytest.raises(ArtifactLoadError, match="damaged") as info:
        await reread.aload()
    assert weights.id in str(info.value)
    reason = await stack.artifact_store.verify(weights)
    assert reason is not None and "damaged" in reason and weights.id in reason
    second = await training.with_options(stack=stack).run()
    again = second.steps["make_weights"]
    assert again.status is StepStatus.COMPLETED
    assert again.cache_miss_reason is not None and "damaged" in again.cache_miss_reason
    assert second.steps["make_table"].status is StepStatus.CACHED  # same content came back
    assert fs.cat_file(key) == original
    np.testing.assert_array_equal(await reread.aload(), np.linspace(0.0, 1.0, 2_000))
    assert await stack.artifact_store.verify(weights) is None


async def test_artifact_without_manifest_does_not_exist(s3_bucket: S3, tmp_path: Path) -> None:
    """Files whose manifest is gone (an upload cut short looks the same) are absent: load
    says missing, verify says missing, and the next run writes the artifact again."""
    first = await training.with_options(stack=s3_stack(s3_bucket, tmp_path)).run()
    table = first.steps["make_table"].output
    fs = s3_filesystem(s3_bucket.endpoint)
    prefix = f"{s3_bucket.bucket}/flowcore/{table.content_hash}"
    fs.rm_file(f"{prefix}/{MANIFEST}")
    assert fs.exists(f"{prefix}/schema.json")
    stack = s3_stack(s3_bucket, tmp_path)
    assert not stack.artifact_store.exists(table)
    reason = await stack.artifact_store.verify(table)
    assert reason is not None and "missing" in reason and table.id in reason
    with pytest.raises(ArtifactLoadError, match="missing"):
        stack.artifact_store.bind(table).load()
    second = await training.with_options(stack=stack).run()
    assert second.steps["make_table"].status is StepStatus.COMPLETED
    assert "missing" in str(second.steps["make_table"].cache_miss_reason)
    assert fs.exists(f"{prefix}/{MANIFEST}")
    assert await stack.artifact_store.bind(table).aload() == Table(
        {"low": [0.0], "high": [1.0], "n": [2000.0]})


# -- reaching the store ----------------------------------------------------------------------

async def test_open_names_a_missing_bucket_and_no_step_runs(s3_endpoint: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """open() on a missing bucket is a StoreError naming the bucket and URL; a run on such
    a stack fails with it before any step body runs."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    missing = S3(endpoint=s3_endpoint, bucket="flowcore-no-such-bucket")
    with pytest.raises(StoreError, match="flowcore-no-such-bucket") as info:
        await FsspecArtifactStore(missing.url(), missing.options).open()
    assert "s3://flowcore-no-such-bucket/flowcore" in str(info.value)
    marker = tmp_path / "ran"

    @step
    def touch() -> int:
        marker.touch()
        return 1

    @pipeline
    def touching() -> None:
        touch()

    with pytest.raises(StoreError, match="flowcore-no-such-bucket"):
        await touching.with_options(stack=s3_stack(missing, tmp_path)).run()
    assert not marker.exists()


async def test_unreachable_endpoint_fails_within_seconds(s3_bucket: S3) -> None:
    """An endpoint nothing listens on is a StoreError naming the URL and the endpoint,
    raised in seconds (botocore alone would retry for minutes)."""
    closed = f"http://127.0.0.1:{free_port()}"
    store = FsspecArtifactStore(s3_bucket.url(), {**s3_bucket.options, "endpoint_url": closed})
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot be reached") as info:
        await store.open()
    assert s3_bucket.url() in str(info.value) and closed in str(info.value)
    assert time.monotonic() - started < 45  # a stalled connect would take minutes


async def test_endpoint_and_credentials_from_the_environment(
        s3_bucket: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no storage_options, AWS_ENDPOINT_URL and the AWS_* keys are used, as s3fs reads them."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    store = FsspecArtifactStore(s3_bucket.url("from-env"))
    await store.open()
    artifact = await save(store, {"from": "env"})
    assert artifact.load() == {"from": "env"}
    assert f"{s3_bucket.bucket}/from-env/{artifact.content_hash}/{MANIFEST}" in objects(s3_bucket)


def test_missing_protocol_package_is_a_config_error_naming_the_extra(tmp_path: Path) -> None:
    """Without s3fs importable, an s3:// store is a ConfigError saying pip install
    flowcore[s3]; a gs:// store without gcsfs names gcsfs."""
    code = textwrap.dedent("""
        import sys
        sys.modules["s3fs"] = None  # as if not installed
        from flowcore.exceptions import ConfigError
        from flowcore.stores._fsspec import FsspecArtifactStore
        for url in ("s3://bucket/prefix", "gs://bucket/prefix"):
            try:
                FsspecArtifactStore(url).open_sync()
            except ConfigError as exc:
                print("ConfigError", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("ConfigError") for line in lines)
    assert "pip install flowcore[s3]" in lines[0] and "s3://bucket/prefix" in lines[0]
    assert "gcsfs" in lines[1]


# -- the store itself ------------------------------------------------------------------------

async def test_concurrent_writers_of_equal_content_are_harmless(s3_bucket: S3) -> None:
    """Twelve concurrent saves of one value through two store objects end in one artifact
    whose every version loads and verifies."""
    stores = [FsspecArtifactStore(s3_bucket.url(), s3_bucket.options) for _ in range(2)]
    value = {"rows": list(range(5_000))}
    artifacts = await asyncio.gather(*(save(stores[i % 2], value) for i in range(12)))
    assert len({a.uri for a in artifacts}) == 1
    prefixes = {k.split("/")[2] for k in objects(s3_bucket)}
    assert prefixes == {artifacts[0].content_hash}
    for artifact in artifacts:
        assert await stores[0].verify(artifact) is None
        assert artifact.load() == value


async def test_content_hash_matches_the_local_stores(s3_bucket: S3, tmp_path: Path) -> None:
    """The recorded hash is that of the materializer's files, as the local store computes
    it, so equal content has one address on every store."""
    from flowcore.stores._local import LocalArtifactStore

    value = Table({"a": [1.0, 2.0]})
    remote = await save(FsspecArtifactStore(s3_bucket.url(), s3_bucket.options), value)
    local = await save(LocalArtifactStore(tmp_path / "artifacts"), value)
    assert remote.content_hash == local.content_hash == hash_directory(local.uri)
    assert remote.size == local.size


async def test_fifty_megabytes_round_trip_streamed(s3_bucket: S3) -> None:
    """A 50 MB array saves and loads back equal, and neither direction holds a second whole
    copy in memory (traced peak stays well under 2x the array)."""
    store = FsspecArtifactStore(s3_bucket.url(), s3_bucket.options)
    value = np.arange(50 * 1024 * 1024 // 8, dtype=np.float64)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        artifact = await save(store, value)
        saving = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loaded = await artifact.aload()
        loading = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(loaded, value)
    assert artifact.size is not None and artifact.size > value.nbytes
    mb, size = 1024 * 1024, value.nbytes
    # Beyond the value (and, loading, the array built from the file) only bounded transfer
    # buffers: measured ~29 MB saving (8 MB parts), ~12 MB loading. Whole copies were 2x.
    assert saving < 0.8 * size, f"save held {saving / mb:.0f} MB beyond the value"
    assert loading < 1.5 * size, f"load held {loading / mb:.0f} MB"
    assert await FsspecArtifactStore(s3_bucket.url(), s3_bucket.options).verify(artifact) is None


def test_store_pickles_and_works_in_another_process(s3_bucket: S3, tmp_path: Path) -> None:
    """A cloudpickled store saves with save_sync and loads with load_sync in another process
    (as a Dask worker would), and that process's artifact loads here."""
    store = FsspecArtifactStore(s3_bucket.url(), s3_bucket.options)
    (tmp_path / "store.pkl").write_bytes(cloudpickle.dumps(store))
    code = textwrap.dedent("""
        import pickle, sys
        from flowcore.materializers import materializer_for
        store = pickle.loads(open(sys.argv[1], "rb").read())
        value = {"made": "in a worker"}
        art = store.save_sync(value, materializer=materializer_for(dict), data_type=dict,
                              name="output", producer_step_run_id="w-1", step_label="worker")
        assert store.load_sync(art) == value
        sys.stdout.buffer.write(pickle.dumps(art))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store.pkl")],
                         capture_output=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr.decode()
    artifact = cloudpickle.loads(out.stdout)
    assert store.bind(artifact).load() == {"made": "in a worker"}
    assert store.verify_sync(artifact) is None


KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from flowcore.materializers import Materializer
    from flowcore.stores._fsspec import FsspecArtifactStore

    class Blob:
        pass

    class BlobMaterializer(Materializer):
        ASSOCIATED_TYPES = (Blob,)

        def save(self, data, uri):
            with open(os.path.join(uri, "small.txt"), "w") as f:
                f.write("uploaded first")
            with open(os.path.join(uri, "large.bin"), "wb") as f:
                f.write(os.urandom(60 * 1024 * 1024))  # unique content: a fresh address

    store = FsspecArtifactStore(sys.argv[1], {"endpoint_url": sys.argv[2], "key": "x",
                                              "secret": "x"})
    store.save_sync(Blob(), materializer=BlobMaterializer, data_type=Blob, name="output",
                    producer_step_run_id="sr-1", step_label="killed")
""")


def test_writer_killed_mid_upload_leaves_no_artifact(s3_bucket: S3) -> None:
    """A writer SIGKILLed after its first file is up and while its large one uploads leaves
    no manifest, so readers see no artifact at that address."""
    fs = s3_filesystem(s3_bucket.endpoint)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, s3_bucket.url(),
                             s3_bucket.endpoint], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        # Nothing but the bucket tells another process how far an upload is: watch it.
        deadline = time.monotonic() + 60
        small: list[str] = []
        while not small and time.monotonic() < deadline and proc.poll() is None:
            small = [k for k in fs.find(s3_bucket.bucket) if k.endswith("/small.txt")]
            time.sleep(0.02)
        assert small, "the writer never uploaded its first file"
    finally:
        proc.kill()
        proc.wait()
    assert not [k for k in fs.find(s3_bucket.bucket) if k.endswith(MANIFEST)]
    digest = small[0].split("/")[-2]
    store = FsspecArtifactStore(s3_bucket.url(), s3_bucket.options)
    ghost = store.bind(ArtifactVersion(
        id="ghost", name="output", uri=f"{s3_bucket.url()}/{digest}",
        materializer="flowcore.materializers._builtin.BytesMaterializer",
        data_type="builtins.bytes", content_hash=digest))
    assert not store.exists(ghost)
    assert "missing" in str(store.verify_sync(ghost))


async def test_any_fsspec_url_works_without_code_of_its_own(tmp_path: Path) -> None:
    """A memory:// store (fsspec's own, no S3 code involved) saves, loads, verifies and
    reports an overwritten file as damaged; it is not shared by hosts, an s3:// one is."""
    import fsspec

    url = f"memory://flowcore-{os.getpid()}-{id(tmp_path)}/artifacts"
    store = FsspecArtifactStore(url)
    await store.open()
    value = Table({"x": [1.0, 2.0, 3.0]})
    artifact = await save(store, value)
    assert await artifact.aload() == value
    assert await store.verify(artifact) is None
    memory = fsspec.filesystem("memory")
    key = f"{memory._strip_protocol(artifact.uri)}/schema.json"
    memory.pipe_file(key, memory.cat_file(key).replace(b"x", b"y"))
    assert "damaged" in str(await store.verify(artifact))
    with pytest.raises(ArtifactLoadError, match="damaged"):
        await artifact.aload()
    assert not store.shared_by_hosts
    assert FsspecArtifactStore("s3://bucket/prefix").shared_by_hosts


class Touch:
    """Unpickling this creates a file: proof that a refused pickle was never unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


async def test_pickle_forged_by_a_bucket_writer_is_never_unpickled(s3_bucket: S3,
                                                                   tmp_path: Path) -> None:
    """Someone who can write the bucket but not the metadata replaces a pickle and rewrites
    its manifest to match: verify and load refuse it (its hash is not the recorded one), and
    it is never unpickled. This is why the store needs no signing key."""
    import pickle

    from flowcore.stores._fsspec_remote import listing, make_manifest, write_manifest

    store = FsspecArtifactStore(s3_bucket.url(), s3_bucket.options)
    artifact = await save(store, Opaque(3))
    assert artifact.materializer.endswith("CloudpickleMaterializer")
    fs = s3_filesystem(s3_bucket.endpoint)
    key = f"{s3_bucket.bucket}/flowcore/{artifact.content_hash}"
    marker = tmp_path / "unpickled"
    fs.pipe_file(f"{key}/artifact.pkl", pickle.dumps(Touch(str(marker))))
    found = listing(fs, key)
    files = [(rel, "", size) for rel, (size, _tag) in found.items()]
    write_manifest(fs, key, make_manifest(artifact.content_hash, sum(n for _, _, n in files),
                                          files, [], found))
    assert "damaged" in str(await store.verify(artifact))
    with pytest.raises(ArtifactLoadError, match="damaged"):
        await FsspecArtifactStore(s3_bucket.url(), s3_bucket.options).bind(artifact).aload()
    assert not marker.exists()
