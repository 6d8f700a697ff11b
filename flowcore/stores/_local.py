"""An artifact store on the local file system: content-addressed directories, signed pickles."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowcore._ids import new_id
from flowcore._models import ArtifactVersion
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import ArtifactLoadError, StoreError
from flowcore.materializers import (
    CloudpickleMaterializer,
    Materializer,
    directory_digest,
    files_digest,
    remember_type,
    save_with_fallback,
    type_from_name,
)
from flowcore.materializers._base import is_known_type
from flowcore.materializers._cloudpickle import PICKLE_FILE
from flowcore.materializers._content import (
    DirectoryState,
    directory_state,
    replace_content,
    state_size,
)
from flowcore.materializers._estimate import SMALL_BYTES, roughly_small
from flowcore.stores._base import ArtifactStore
from flowcore.stores._sqlite_inline import (
    inline_artifact,
    inline_damage,
    is_inline,
    payload_of,
    with_payload,
)

__all__ = ["SIGNATURE_FILE", "LocalArtifactStore"]

SIGNATURE_FILE = ".flowcore-signature"
_KEY_BYTES = 32


class LocalArtifactStore(ArtifactStore):
    """Stores each artifact in `root/<h[:2]>/<h>/`, where `h` is the sha256 of its content.

    Equal content is stored once. Values written with the cloudpickle fallback are signed
    with an HMAC key kept next to the artifacts, and a pickle whose signature does not verify
    is never unpickled.

    Integrity: a load checks the artifact's size, and for artifacts of 64 KB or less its
    content hash; `verify` (what a cache hit asks) checks the full hash of any size. A write
    of content already stored replaces whatever is there, so a damaged or deleted artifact
    heals the next time its content is produced. The only thing remembered in memory is the
    stat() view of directories this process wrote or fully verified, and it is trusted only
    while the directory still looks exactly like that.

    Args:
        root: the directory artifacts live in (created on first save).
        key_path: the signing key file; defaults to `root.parent / "signing.key"`. It is
            created on first use (32 random bytes, mode 0600) and reused afterwards.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        key_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root).absolute()  # uris must not depend on the working directory
        self.key_path = Path(key_path).absolute() if key_path else self.root.parent / "signing.key"
        self._key: bytes | None = None
        self._key_lock = threading.Lock()
        # uri -> the directory_state() it had when this process last wrote or fully hashed it.
        self._sound: dict[str, DirectoryState] = {}
        # Set by a metadata store that keeps small values in its rows (SQLite): see keep_inline.
        self._inline = False

    def keep_inline(self) -> None:
        """Save small values as inline artifacts (their bytes go into the metadata row, no
        file; see `_sqlite_inline`). Called by the SQLite metadata store this store serves."""
        self._inline = True

    def __repr__(self) -> str:
        return f"<LocalArtifactStore {self.root}>"

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
        if self._inline:
            small = inline_artifact(value, materializer=materializer, data_type=data_type,
                                    name=name, producer_step_run_id=producer_step_run_id)
            if small is not None:
                return small
        # Encoding and hashing on the loop only for a value surely small (a bounded look).
        files = self._files_for(value, materializer) if roughly_small(value) else None
        if files is not None and sum(map(len, files.values())) <= SMALL_BYTES:
            # Small, and its files known without I/O: hashed here, and written unless this
            # process wrote or verified this content and its files are untouched since.
            digest, size = files_digest(files)
            final = self.root / digest[:2] / digest
            if not self._vouched(str(final)):
                await run_in_worker_thread(self._publish_files, files, final)
            used, uri = materializer, str(final)
        else:
            # Serialising, hashing and writing in a worker thread. A cancelled save leaves
            # the thread to finish: publishing is a rename, so no half-written artifact.
            used, uri, digest, size = await run_in_worker_thread(
                self._save_sync, value, materializer, step_label
            )
        # Record the concrete type when the value is an instance of a subclass, so a loader
        # that rebuilds from the type (dataclasses, pydantic) rebuilds the right one.
        stored_type = type(value) if isinstance(data_type, type) and isinstance(
            value, data_type) else data_type
        artifact = ArtifactVersion(
            id=new_id(),
            name=name,
            uri=uri,
            materializer=remember_type(used),
            data_type=remember_type(stored_type),
            content_hash=digest,
            size=size,
            producer_step_run_id=producer_step_run_id,
            python_version="{}.{}.{}".format(*sys.version_info[:3]),
        )
        return self.bind(artifact)

    @staticmethod
    def _files_for(value: Any, materializer: type[Any]) -> dict[str, bytes] | None:
        """The files a materializer would write for `value`, if it can tell without I/O.

        This is only a fast path: when it fails (a str holding a lone surrogate cannot be
        encoded as JSON text) the value takes the full save path, whose fallback rules decide.
        """
        if not hasattr(materializer, "files_for"):
            return None
        try:
            files: dict[str, bytes] | None = materializer.files_for(value)
        except Exception:
            return None
        return files

    def exists(self, artifact: ArtifactVersion) -> bool:
        if is_inline(artifact):  # kept in its metadata row, beside this store
            return payload_of(artifact) is not None
        if os.path.isdir(artifact.uri):
            return True
        self._sound.pop(artifact.uri, None)
        return False

    async def verify(self, artifact: ArtifactVersion) -> str | None:
        if is_inline(artifact):  # a few bytes in its row: hashed here
            return inline_damage(artifact)
        state = directory_state(artifact.uri)  # stat() only: fine on the loop
        if state is None:
            self._sound.pop(artifact.uri, None)
            return f"{_what(artifact)} is missing: its directory no longer exists"
        if self._sound.get(artifact.uri) == state and _types_known(artifact):
            return None
        if artifact.size is not None and state_size(state) != artifact.size:
            return _damaged(artifact)
        if state_size(state) <= SMALL_BYTES and _types_known(artifact):
            return self._check(artifact, state)  # a few small files: cheaper than a thread
        return await run_in_worker_thread(self._check, artifact, state)

    def _check(self, artifact: ArtifactVersion, state: DirectoryState) -> str | None:
        """The full check behind `verify` (blocking: reads every file)."""
        unloadable = _unloadable(artifact)
        if unloadable is not None:
            return f"{_what(artifact)} is no longer loadable: {unloadable}"
        try:
            digest, size = directory_digest(artifact.uri)
        except OSError:
            return f"{_what(artifact)} is missing: its directory no longer exists"
        recorded = _recorded_hash(artifact)
        if (recorded is not None and digest != recorded) or (
                artifact.size is not None and size != artifact.size):
            return _damaged(artifact)
        if os.path.exists(os.path.join(artifact.uri, PICKLE_FILE)):
            try:
                with open(os.path.join(artifact.uri, PICKLE_FILE), "rb") as f:
                    self._verify(artifact.uri, f.read())
            except (OSError, ArtifactLoadError) as exc:
                return f"{_what(artifact)} is no longer loadable: {exc}"
        # The state seen before hashing: a change made meanwhile makes the next look re-hash.
        self._sound[artifact.uri] = state
        return None

    def _vouched(self, uri: str) -> bool:
        """Whether this process wrote or fully verified `uri` and it is untouched since."""
        known = self._sound.get(uri)
        return known is not None and directory_state(uri) == known

    def bind(self, artifact: ArtifactVersion) -> ArtifactVersion:
        if is_inline(artifact):  # its bytes are with it, from its metadata row
            return with_payload(artifact, payload_of(artifact))
        # ArtifactVersion has no public setter for its loader; the store owns this attribute.
        artifact._loader = self._load
        return artifact

    # -- writing (runs in a worker thread) -------------------------------------------------

    @contextlib.contextmanager
    def _staging(self) -> Iterator[str]:
        """An empty directory to fill, next to the artifacts (so publishing is a rename);
        removed afterwards with whatever is left in it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".tmp-", dir=self.root)
        except OSError as exc:
            raise StoreError(f"cannot write artifacts under {self.root}: {exc}") from exc
        try:
            uri = os.path.join(staging, "artifact")
            os.mkdir(uri)
            yield uri
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, uri: str, final: Path) -> None:
        """Move a filled staging directory to its content address. If that address is taken
        (equal content stored earlier, by us or a racing writer, or a damaged copy of it),
        the staged files replace what is there, unless this process knows it is intact."""
        final.parent.mkdir(exist_ok=True)
        try:
            # Atomic publish: readers see the whole directory or none of it.
            os.rename(uri, final)
        except OSError:
            if not final.is_dir():
                raise
            if not self._vouched(str(final)):
                replace_content(uri, str(final))
        state = directory_state(str(final))
        if state is not None:
            self._sound[str(final)] = state

    def _publish_files(self, files: dict[str, bytes], final: Path) -> None:
        with self._staging() as uri:
            for rel, data in files.items():
                with open(os.path.join(uri, rel), "wb") as f:
                    f.write(data)
            self._publish(uri, final)

    def _save_sync(
        self, value: Any, materializer: type[Materializer], step_label: str
    ) -> tuple[type[Materializer], str, str, int]:
        with self._staging() as uri:
            used = save_with_fallback(value, materializer, uri, label=step_label)
            if issubclass(used, CloudpickleMaterializer):
                self._sign(uri)
            digest, size = directory_digest(uri)
            final = self.root / digest[:2] / digest
            # The stored copy's signature may come from an older key: a fresh store has not
            # vouched for it, so ours (made from our own bytes) replaces it.
            self._publish(uri, final)
            return used, str(final), digest, size

    def _sign(self, uri: str) -> None:
        with open(os.path.join(uri, PICKLE_FILE), "rb") as f:
            signature = self._signature(f.read())
        with open(os.path.join(uri, SIGNATURE_FILE), "w", encoding="ascii") as f:
            f.write(signature)

    def _signature(self, payload: bytes) -> str:
        return hmac.new(self._signing_key(), payload, hashlib.sha256).hexdigest()

    def _signing_key(self) -> bytes:
        with self._key_lock:
            if self._key is None:
                self._key = _load_or_create_key(self.key_path)
            return self._key

    # -- loading (synchronous: `ArtifactVersion.aload` moves it to a thread) ----------------

    def _load(self, artifact: ArtifactVersion) -> Any:
        what = _what(artifact)
        self._check_before_load(artifact)
        materializer = type_from_name(artifact.materializer)
        if not (isinstance(materializer, type) and issubclass(materializer, Materializer)):
            raise ArtifactLoadError(
                f"{what}: cannot import its materializer '{artifact.materializer}'"
            )
        data_type = type_from_name(artifact.data_type) or object
        try:
            if issubclass(materializer, CloudpickleMaterializer):
                return materializer().load_checked(
                    data_type, artifact.uri, lambda payload: self._verify(artifact.uri, payload)
                )
            return materializer().load(data_type, artifact.uri)
        except ArtifactLoadError as exc:
            raise ArtifactLoadError(f"cannot load {what}: {exc}") from exc
        except Exception as exc:
            raise ArtifactLoadError(
                f"cannot load {what} with {artifact.materializer}: {type(exc).__name__}: {exc}"
            ) from exc

    def _check_before_load(self, artifact: ArtifactVersion) -> None:
        """Missing: refuse. Then the size, and the full hash of an artifact of 64 KB or less
        (a larger one is hashed in full by `verify`, when a cache hit would reuse it)."""
        state = directory_state(artifact.uri)
        if state is None:
            raise ArtifactLoadError(
                f"{_what(artifact)} is missing: the directory no longer exists (was the "
                "artifact store moved or cleaned?)"
            )
        if self._sound.get(artifact.uri) == state:
            return
        size = state_size(state)
        damaged = artifact.size is not None and size != artifact.size
        recorded = _recorded_hash(artifact)
        if not damaged and size <= SMALL_BYTES and recorded is not None:
            damaged = directory_digest(artifact.uri)[0] != recorded
            if not damaged:
                self._sound[artifact.uri] = state
        if damaged:
            raise ArtifactLoadError(
                f"{_damaged(artifact)}; run the step again (with the cache on, its next run "
                "replaces it)"
            )

    def _verify(self, uri: str, payload: bytes) -> None:
        try:
            with open(os.path.join(uri, SIGNATURE_FILE), encoding="ascii") as f:
                recorded = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactLoadError(
                f"the pickle has no readable signature ({exc}); refusing to unpickle it"
            ) from exc
        if not hmac.compare_digest(recorded, self._signature(payload)):
            raise ArtifactLoadError(
                f"the pickle's signature does not verify with {self.key_path}: it was changed "
                "after it was written, or signed with another key; refusing to unpickle it"
            )


def _what(artifact: ArtifactVersion) -> str:
    return (f"artifact '{artifact.name}' (id {artifact.id}) of step run "
            f"{artifact.producer_step_run_id} at {artifact.uri}")


def _damaged(artifact: ArtifactVersion) -> str:
    return f"{_what(artifact)} is damaged: its content no longer matches its stored hash"


def _recorded_hash(artifact: ArtifactVersion) -> str | None:
    # The hash recorded at write; artifacts stored by early versions may have none.
    return artifact._content_hash


def _types_known(artifact: ArtifactVersion) -> bool:
    return is_known_type(artifact.materializer) and is_known_type(artifact.data_type)


def _unloadable(artifact: ArtifactVersion) -> str | None:
    """Why the artifact's materializer or type cannot be imported any more, or None."""
    materializer = type_from_name(artifact.materializer)
    if not (isinstance(materializer, type) and issubclass(materializer, Materializer)):
        return f"its materializer '{artifact.materializer}' cannot be imported"
    name = artifact.data_type
    if issubclass(materializer, CloudpickleMaterializer) and (
            name.startswith("__main__.") or "<locals>" in name):
        return None  # cloudpickle stored such a class by value, inside the pickle
    try:
        found = type_from_name(name)
    except Exception as exc:  # the module exists but fails to import
        return f"importing its type '{name}' failed: {type(exc).__name__}: {exc}"
    if found is None:
        return f"its type '{name}' cannot be imported (was its module renamed or moved?)"
    return None


def _load_or_create_key(path: Path) -> bytes:
    """Read the signing key at `path`, creating it (0600) if no process has yet."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_key(path)
    except OSError as exc:
        raise StoreError(f"cannot read the artifact signing key {path}: {exc}") from exc
    if len(key) != _KEY_BYTES:
        raise StoreError(
            f"the artifact signing key {path} holds {len(key)} bytes, not {_KEY_BYTES}; "
            "restore it, or delete it to make a new one (pickles signed with it will no "
            "longer load)"
        )
    return key


def _create_key(path: Path) -> bytes:
    key = os.urandom(_KEY_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".signing-", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
            # link() never replaces an existing file, so when two processes race, both end
            # up with the key of whichever linked first.
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise StoreError(f"cannot create the artifact signing key {path}: {exc}") from exc
    return key
