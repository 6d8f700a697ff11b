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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread

from flowcore._models import ArtifactVersion
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
from flowcore.materializers._cloudpickle import PICKLE_FILE
from flowcore.stores._base import ArtifactStore

__all__ = ["SIGNATURE_FILE", "LocalArtifactStore"]

SIGNATURE_FILE = ".flowcore-signature"
_KEY_BYTES = 32
_INLINE_BYTES = 64 * 1024  # values up to this size are hashed in memory first


class LocalArtifactStore(ArtifactStore):
    """Stores each artifact in `root/<h[:2]>/<h>/`, where `h` is the sha256 of its content.

    Equal content is stored once. Values written with the cloudpickle fallback are signed
    with an HMAC key kept next to the artifacts, and a pickle whose signature does not verify
    is never unpickled.

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
        # Digests this process has stored or seen stored (content-addressed: never changes,
        # unless someone deletes it behind our back, which exists() reports on a cache hit).
        self._known: set[str] = set()

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
        files = self._files_for(value, materializer)
        if files is not None and sum(map(len, files.values())) <= _INLINE_BYTES:
            # A small value whose files are known without I/O: hashed here, and written only
            # when this content is not stored yet (equal outputs are common: None, 0, []).
            digest, size = files_digest(files)
            final = self.root / digest[:2] / digest
            if digest not in self._known:
                await anyio.to_thread.run_sync(self._publish_files, files, final)
                self._known.add(digest)
            used, uri = materializer, str(final)
        else:
            # Writing and hashing are blocking file I/O; a cancellation waits for the thread,
            # so no half-written directory is left behind.
            used, uri, digest, size = await anyio.to_thread.run_sync(
                self._save_sync, value, materializer, step_label
            )
        # Record the concrete type when the value is an instance of a subclass, so a loader
        # that rebuilds from the type (dataclasses, pydantic) rebuilds the right one.
        stored_type = type(value) if isinstance(data_type, type) and isinstance(
            value, data_type) else data_type
        artifact = ArtifactVersion(
            id=uuid.uuid4().hex,
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
        if os.path.isdir(artifact.uri):
            return True
        # Deleted behind our back: the next save of this content must write it again.
        self._known.discard(os.path.basename(artifact.uri))
        return False

    def bind(self, artifact: ArtifactVersion) -> ArtifactVersion:
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

    @staticmethod
    def _publish(uri: str, final: Path) -> bool:
        """Rename a filled staging directory to its content address; False if equal content
        was already there (stored by us earlier, or by a racing writer)."""
        final.parent.mkdir(exist_ok=True)
        try:
            # Atomic publish: readers see the whole directory or none of it.
            os.rename(uri, final)
        except OSError:
            if not final.is_dir():
                raise
            return False
        return True

    def _publish_files(self, files: dict[str, bytes], final: Path) -> None:
        if final.is_dir():
            return
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
            signed = issubclass(used, CloudpickleMaterializer)
            if signed:
                self._sign(uri)
            digest, size = directory_digest(uri)
            final = self.root / digest[:2] / digest
            if not self._publish(uri, final) and signed:
                # The stored copy's signature may come from an older key: put ours, made
                # from our own bytes, in its place.
                os.replace(os.path.join(uri, SIGNATURE_FILE), final / SIGNATURE_FILE)
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
        what = f"artifact '{artifact.name}' (id {artifact.id}) at {artifact.uri}"
        if not os.path.isdir(artifact.uri):
            raise ArtifactLoadError(
                f"{what} is missing: the directory no longer exists (was the artifact store "
                "moved or cleaned?)"
            )
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
