"""An artifact store on any fsspec filesystem: S3 (s3fs), GCS (gcsfs), Azure (adlfs), local paths.

Layout: an artifact is every file its materializer wrote, under `<prefix>/<content hash>/`,
plus a small manifest written LAST (`<prefix>/<content hash>/.flowcore-manifest.json`). An
artifact without its manifest does not exist, so a reader never sees half of one, whatever
happens to a writer. Writers of equal content write the same keys with the same bytes, so
concurrent writers are harmless.

Why no HMAC signature on pickles here (the local store signs them): the local store's key is
a file next to its directory, private to whoever can read that directory. A bucket is shared by
hosts, so the key would have to live where every reader reaches it (the bucket itself, or the
metadata database), and then anyone able to write a forged pickle could sign it too. What
protects a reader instead is the content address: every load downloads the files and checks
their sha256 against the hash recorded in the metadata store *before* any materializer (and so
any unpickling) sees them. To make flowcore unpickle bytes of their choosing, one must be able
to write the metadata database, not merely the bucket.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from flowcore._ids import new_id
from flowcore._models import ArtifactVersion
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import ArtifactLoadError, FlowcoreError, StoreError
from flowcore.materializers import (
    Materializer,
    PathMaterializer,
    directory_digest,
    is_builtin_materializer,
    remember_type,
    save_with_fallback,
    type_from_name,
)
from flowcore.stores._base import ArtifactStore
from flowcore.stores._fsspec_remote import (
    check_reachable,
    download,
    is_shared,
    listing,
    local_files,
    make_manifest,
    mismatch,
    open_filesystem,
    read_manifest,
    upload,
    write_manifest,
)
from flowcore.stores._local import _damaged, _recorded_hash, _unloadable, _what

__all__ = ["FsspecArtifactStore"]


class FsspecArtifactStore(ArtifactStore):
    """Artifacts in an object store (or any fsspec filesystem), addressed by content.

    Materializers are unchanged: a save hands the materializer an empty local directory,
    hashes what it wrote and uploads it file by file; a load downloads the files into a local
    directory, checks their hash, then calls the materializer's `load`. Large files are
    streamed to and from disk, never held in memory whole.

    Integrity: every load checks the full content hash of what it downloaded (a damaged
    artifact is an ArtifactLoadError, never a wrong value). `verify` (what a cache hit asks)
    compares the objects' current sizes and version tags (S3's ETag) with those the manifest
    recorded when they were written: one listing, no download; on a filesystem without
    version tags it downloads and hashes. Saving content already stored and intact writes
    nothing; saving content whose stored copy is damaged or partial writes it again.

    Loaded files are removed after the load, except for materializers that may return
    something still pointing at them (a `Path`, or any user materializer): those files stay
    in a per-process directory until the process exits.

    The store pickles as its URL and options, so a Dask worker can use `save_sync` and
    `load_sync` itself; the filesystem is opened again in each process.

    Args:
        url: where artifacts go, e.g. `s3://bucket/prefix`, `gs://bucket/prefix`,
            `az://container/prefix`, or a local path.
        storage_options: passed to the fsspec filesystem (s3fs: `endpoint_url`, `key`,
            `secret`, `config_kwargs`, ...); without them credentials and the endpoint come
            from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self._lock = threading.Lock()
        self._fs: tuple[Any, str, str] | None = None  # (filesystem, root path, protocol)
        self._pid = 0

    def __repr__(self) -> str:
        return f"<FsspecArtifactStore {self.url}>"

    def __getstate__(self) -> dict[str, Any]:
        # Only what rebuilds it: the filesystem (its event loop, connections) and the lock
        # belong to this process.
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def shared_by_hosts(self) -> bool:
        """Whether other machines reach the same artifacts (an object store, not a local
        path or memory://), so a worker elsewhere may save and load through this store."""
        return is_shared(self.url)

    def _filesystem(self) -> tuple[Any, str, str]:
        """(filesystem, root path, protocol), opened on first use in this process."""
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                self._fs = open_filesystem(self.url, self.storage_options)
                self._pid = os.getpid()
            return self._fs

    # -- the ArtifactStore interface (async: the work happens in flowcore's worker threads) --

    async def open(self) -> None:
        """Check the bucket (or container) answers; raise StoreError/ConfigError naming the URL."""
        await run_in_worker_thread(self.open_sync)

    def open_sync(self) -> None:
        fs, root, protocol = self._filesystem()
        check_reachable(fs, root, protocol, self.url)

    async def save(
        self,
        value: Any,
        *,
        materializer: type[Any],
        data_type: type[Any],
        name: str,
        producer_step_run_id: str,
        step_label: str,
    ) -> ArtifactVersion:
        # A cancelled save leaves its thread to finish: the manifest goes up last, so an
        # upload cut short is never an artifact.
        return await run_in_worker_thread(
            self.save_sync, value, materializer=materializer, data_type=data_type, name=name,
            producer_step_run_id=producer_step_run_id, step_label=step_label)

    def exists(self, artifact: ArtifactVersion) -> bool:
        """Whether the artifact's manifest is there (blocking: one request; the engine asks
        `verify` instead, off the loop)."""
        try:
            fs, key = self._locate(artifact)
            return key is not None and read_manifest(fs, key) is not None
        except FlowcoreError:
            raise
        except Exception:
            return False

    async def verify(self, artifact: ArtifactVersion) -> str | None:
        return await run_in_worker_thread(self.verify_sync, artifact)

    def bind(self, artifact: ArtifactVersion) -> ArtifactVersion:
        # ArtifactVersion has no public setter for its loader; the store owns this attribute.
        artifact._loader = self.load_sync
        return artifact

    # -- synchronous work, also usable as is in a Dask worker ------------------------------

    def save_sync(
        self,
        value: Any,
        *,
        materializer: type[Any],
        data_type: type[Any],
        name: str,
        producer_step_run_id: str,
        step_label: str,
    ) -> ArtifactVersion:
        """Materialize `value` into a local staging directory, upload it unless equal content
        is already stored intact, and return its bound (not yet recorded) artifact version.

        Raises:
            MaterializerError: no materializer could store the value.
            StoreError: the upload failed.
        """
        fs, root, protocol = self._filesystem()
        with tempfile.TemporaryDirectory(prefix="flowcore-save-") as tmp:
            staged = os.path.join(tmp, "artifact")
            os.mkdir(staged)
            used = save_with_fallback(value, materializer, staged, label=step_label)
            digest, size = directory_digest(staged)
            self._publish(fs, protocol, staged, f"{root}/{digest}", digest, size)
        # The concrete type when the value is an instance of a subclass, as the local store.
        stored_type = type(value) if isinstance(data_type, type) and isinstance(
            value, data_type) else data_type
        return self.bind(ArtifactVersion(
            id=new_id(),
            name=name,
            uri=f"{self.url}/{digest}",
            materializer=remember_type(used),
            data_type=remember_type(stored_type),
            content_hash=digest,
            size=size,
            producer_step_run_id=producer_step_run_id,
            python_version="{}.{}.{}".format(*sys.version_info[:3]),
        ))

    def _publish(self, fs: Any, protocol: str, staged: str, key: str, digest: str,
                 size: int) -> None:
        try:
            stored = read_manifest(fs, key)
            if stored is not None and stored.get("content_hash") == digest and mismatch(
                    stored, listing(fs, key)) is None:
                return  # equal content stored and untouched since: nothing to write
            files, dirs = local_files(staged)
            upload(fs, protocol, files, key)
            # Listed after the upload: the tags the store gave these very bytes.
            write_manifest(fs, key, make_manifest(digest, size, files, dirs, listing(fs, key)))
        except Exception as exc:
            raise StoreError(f"cannot store an artifact at {self.url}/{digest}: "
                             f"{type(exc).__name__}: {exc}") from exc

    def load_sync(self, artifact: ArtifactVersion) -> Any:
        """Download the artifact, check its content hash, and load it with its materializer.

        Raises:
            ArtifactLoadError: it is missing, damaged, or its materializer cannot load it.
        """
        what = _what(artifact)
        materializer = type_from_name(artifact.materializer)
        if not (isinstance(materializer, type) and issubclass(materializer, Materializer)):
            raise ArtifactLoadError(
                f"{what}: cannot import its materializer '{artifact.materializer}'")
        data_type = type_from_name(artifact.data_type) or object
        keep = not _reads_into_memory(materializer)
        parent = tempfile.mkdtemp(prefix="flowcore-load-", dir=_kept_root() if keep else None)
        done = False
        try:
            local = self._fetch(artifact, parent)
            try:
                value = materializer().load(data_type, local)
            except ArtifactLoadError as exc:
                raise ArtifactLoadError(f"cannot load {what}: {exc}") from exc
            except Exception as exc:
                raise ArtifactLoadError(f"cannot load {what} with {artifact.materializer}: "
                                        f"{type(exc).__name__}: {exc}") from exc
            done = True
            return value
        finally:
            if not (keep and done):
                shutil.rmtree(parent, ignore_errors=True)

    def verify_sync(self, artifact: ArtifactVersion) -> str | None:
        """Why `artifact` cannot be reused (missing, damaged, no longer loadable), or None."""
        what = _what(artifact)
        try:
            fs, key = self._locate(artifact)
            stored = None if key is None else read_manifest(fs, key)
            if key is None or stored is None:
                return f"{what} is missing: the store has no manifest for it"
            unloadable = _unloadable(artifact)
            if unloadable is not None:
                return f"{what} is no longer loadable: {unloadable}"
            recorded = _recorded_hash(artifact)
            if stored.get("unreadable") or (
                    recorded is not None and stored.get("content_hash") != recorded) or (
                    artifact.size is not None and stored.get("size") != artifact.size):
                return f"{_damaged(artifact)} (its manifest records other content)"
            why = mismatch(stored, listing(fs, key))
            if why is None:
                return None
            if why != "unknown":
                return f"{_damaged(artifact)} ({why})"
            # No version tags to compare on this filesystem: hash the bytes themselves.
            with tempfile.TemporaryDirectory(prefix="flowcore-verify-") as tmp:
                self._fetch(artifact, tmp)
            return None
        except ArtifactLoadError as exc:
            return str(exc)
        except FlowcoreError:
            raise
        except Exception as exc:  # the store did not answer: not reusable now
            return f"{what} could not be checked: {type(exc).__name__}: {exc}"

    # -- helpers ---------------------------------------------------------------------------

    def _locate(self, artifact: ArtifactVersion) -> tuple[Any, str | None]:
        """The filesystem and the artifact's key in it (None if its URI is not of this
        store's protocol, e.g. a local path recorded by a local store)."""
        fs, _root, protocol = self._filesystem()
        uri = artifact.uri
        theirs = uri.split("://", 1)[0].lower() if "://" in uri else "file"
        ours = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if theirs != protocol and theirs not in ours:
            return fs, None
        return fs, str(fs._strip_protocol(uri)).rstrip("/")

    def _fetch(self, artifact: ArtifactVersion, parent: str) -> str:
        """Download the artifact into `parent/<hash>` and check it; return that directory."""
        what = _what(artifact)
        fs, key = self._locate(artifact)
        protocol = self._filesystem()[2]
        try:
            stored = None if key is None else read_manifest(fs, key)
        except Exception as exc:
            raise ArtifactLoadError(f"cannot read {what}: {type(exc).__name__}: {exc}") from exc
        if key is None or stored is None:
            raise ArtifactLoadError(f"{what} is missing: the store has no manifest for it (was "
                                    "the artifact store moved or cleaned?)")
        recorded = _recorded_hash(artifact) or str(stored.get("content_hash"))
        damaged = ArtifactLoadError(f"{_damaged(artifact)}; run the step again (with the "
                                    "cache on, its next run replaces it)")
        if stored.get("content_hash") != recorded:
            raise damaged
        local = os.path.join(parent, recorded)
        os.mkdir(local)
        try:
            download(fs, protocol, stored, key, local)
        except FileNotFoundError as exc:
            raise damaged from exc
        except Exception as exc:
            raise ArtifactLoadError(f"cannot download {what}: {type(exc).__name__}: {exc}"
                                    ) from exc
        # Checked before any materializer (so any unpickling) sees the bytes.
        digest, size = directory_digest(local)
        if digest != recorded or (artifact.size is not None and size != artifact.size):
            raise damaged
        return local


def _reads_into_memory(materializer: type[Materializer]) -> bool:
    """Whether what `materializer.load` returns no longer needs its files: true of flowcore's
    own, except the Path materializer, which returns a path into them."""
    return is_builtin_materializer(materializer) and not issubclass(materializer,
                                                                    PathMaterializer)


_kept: tuple[int, str] | None = None
_kept_lock = threading.Lock()


def _kept_root() -> str:
    """This process's directory for loaded files that must outlive the load (removed at exit)."""
    global _kept
    with _kept_lock:
        if _kept is None or _kept[0] != os.getpid():
            path = tempfile.mkdtemp(prefix="flowcore-loaded-")
            atexit.register(_remove_if_ours, os.getpid(), path)
            _kept = (os.getpid(), path)
        return _kept[1]


def _remove_if_ours(pid: int, path: str) -> None:
    # A forked child inherits the parent's exit handlers: it must not remove the parent's files.
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)
