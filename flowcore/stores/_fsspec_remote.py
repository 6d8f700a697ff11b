"""What the fsspec artifact store does to the remote side: open a filesystem from a URL,
read and write manifests, list an artifact's objects and move files, one at a time or batched.

Every function here blocks (network I/O): the store calls them from flowcore's worker threads,
or from a Dask worker's own thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from flowcore.exceptions import ConfigError, StoreError

__all__ = [
    "MANIFEST",
    "Listing",
    "Manifest",
    "check_reachable",
    "download",
    "is_shared",
    "listing",
    "local_files",
    "make_manifest",
    "mismatch",
    "open_filesystem",
    "read_manifest",
    "upload",
    "write_manifest",
]

# Written last, so an artifact whose upload was cut short (a crash, a cancelled save) has none
# and does not exist for any reader. Its name starts with the reserved ".flowcore" prefix, so it
# never takes part in a content hash and no materializer's file is mistaken for it.
MANIFEST = ".flowcore-manifest.json"
_FORMAT = 1

# Protocols whose first path component is a bucket (or container) that must already exist:
# a missing one is an error, never created behind the user's back.
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
_S3 = frozenset({"s3", "s3a"})
_PROCESS_LOCAL = frozenset({"file", "local", "memory"})
# Which package brings each protocol: s3 is flowcore's own extra, the others work by URL alone.
_PACKAGES = {"s3": "flowcore[s3]", "s3a": "flowcore[s3]", "gs": "gcsfs", "gcs": "gcsfs",
             "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs"}

# Fail within seconds when the endpoint cannot be reached (botocore waits 60 s to connect and
# retries 5 times by default); the user's own config_kwargs win over these.
_S3_CONFIG = {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}}
# Uploads in parts of this size, one part in flight: a large file is never read into memory
# whole (s3fs would otherwise put a file under 100 MB in one request). Measured on a 150 MB
# array: 29 MB traced at the peak (botocore holds a part about three times), 45 MB with two
# parts in flight. Fixed, so equal content gets an equal multipart ETag whoever writes it.
S3_PART = 8 * 1024 * 1024
_S3_PUT = {"chunksize": S3_PART, "max_concurrency": 1}
# Downloads stream to disk in 64 KB reads; s3fs would otherwise fetch a file over 50 MB as
# ten concurrent ranges, each read whole into memory.
_S3_GET = {"max_concurrency": 1}
# Files smaller than this go up or down in one batched, concurrent call; larger ones one by one.
_BATCH_BELOW = 4 * 1024 * 1024
# The first of these in a file's info is its version tag: it changes whenever its bytes do.
_TAG_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "created")

Manifest = dict[str, Any]
# relative path -> (size, version tag or None), as the store lists them now.
Listing = dict[str, tuple[int, str | None]]


def open_filesystem(url: str, storage_options: Mapping[str, Any]) -> tuple[Any, str, str]:
    """(filesystem, root path without protocol, protocol) for `url`.

    Raises:
        ConfigError: fsspec or the protocol's package is not installed, or the URL is bad.
    """
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    try:
        import fsspec.core
    except ImportError as exc:
        raise ConfigError(f"artifact store {url}: fsspec is not installed; "
                          f"pip install {_PACKAGES.get(protocol, 'fsspec')}") from exc
    options = dict(storage_options)
    # Listings are read to check artifacts that other processes may have changed or healed:
    # a cached listing would answer from the past.
    options["use_listings_cache"] = False
    if protocol in _S3:
        config = dict(_S3_CONFIG)
        config.update(options.get("config_kwargs") or {})
        options["config_kwargs"] = config
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise ConfigError(f"artifact store {url}: the package for '{protocol}://' URLs is not "
                          f"installed; pip install {_PACKAGES.get(protocol, protocol)}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"artifact store {url}: {type(exc).__name__}: {exc}") from exc
    return fs, str(root).rstrip("/"), protocol


def is_shared(url: str) -> bool:
    """Whether `url` names storage that other hosts reach too (a bucket, sftp, hdfs...), not a
    local path or memory://."""
    return "://" in url and url.split("://", 1)[0].lower() not in _PROCESS_LOCAL


def check_reachable(fs: Any, root: str, protocol: str, url: str) -> None:
    """Raise StoreError naming `url` unless its bucket exists and answers; create the root
    directory of a store without buckets (a local path, memory://)."""
    if protocol not in _BUCKETED:
        try:
            fs.makedirs(root, exist_ok=True)
        except Exception as exc:
            raise StoreError(f"artifact store {url}: cannot create {root}: {exc}") from exc
        return
    bucket = root.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError as exc:
        endpoint = _endpoint(fs)
        raise StoreError(
            f"artifact store {url}: bucket '{bucket}' does not exist{endpoint} (or the endpoint "
            "is not an object store); create it, or fix the URL") from exc
    except Exception as exc:
        raise StoreError(f"artifact store {url} cannot be reached{_endpoint(fs)}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _endpoint(fs: Any) -> str:
    found = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get(
        "endpoint_url")
    return f" at {found}" if found else ""


def read_manifest(fs: Any, key: str) -> Manifest | None:
    """The manifest of the artifact under `key`, or None when there is none (it does not exist)."""
    try:
        raw = fs.cat_file(f"{key}/{MANIFEST}")
    except FileNotFoundError:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return {"format": _FORMAT, "files": {}, "dirs": [], "unreadable": True}
    return found if isinstance(found, dict) else {"format": _FORMAT, "files": {},
                                                  "unreadable": True}


def listing(fs: Any, key: str) -> Listing:
    """Every object under `key` but the manifest, with its size and version tag."""
    prefix = f"{key}/"
    try:
        found = fs.find(key, detail=True)
    except FileNotFoundError:
        return {}
    result: Listing = {}
    for name, info in found.items():
        name = str(name)
        if not name.startswith(prefix) or info.get("type") == "directory":
            continue
        rel = name[len(prefix):]
        if rel != MANIFEST:
            result[rel] = (int(info.get("size") or 0), _tag(info))
    return result


def _tag(info: Mapping[str, Any]) -> str | None:
    for name in _TAG_KEYS:
        value = info.get(name)
        if value is not None:
            return str(value)
    return None


def local_files(path: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """([(relative path, full path, size)], [relative directories]) under a local directory."""
    files: list[tuple[str, str, int]] = []
    dirs: list[str] = []
    for dirpath, subdirs, names in os.walk(path):
        for name in subdirs:
            dirs.append(os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/"))
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel != MANIFEST:
                files.append((rel, full, os.path.getsize(full)))
    return sorted(files), sorted(dirs)


def upload(fs: Any, protocol: str, files: list[tuple[str, str, int]], key: str) -> None:
    """Put each local file at `key/<relative path>`: small ones in one concurrent batch, large
    ones streamed one at a time in bounded parts."""
    small = [(full, f"{key}/{rel}") for rel, full, size in files if size < _BATCH_BELOW]
    if small:
        fs.put([f for f, _ in small], [r for _, r in small])
    extra = _S3_PUT if protocol in _S3 else {}
    for rel, full, size in files:
        if size >= _BATCH_BELOW:
            fs.put_file(full, f"{key}/{rel}", **extra)


def download(fs: Any, protocol: str, manifest: Manifest, key: str, target: str) -> None:
    """Get every file the manifest lists into the local directory `target` (streamed to disk),
    and recreate its empty directories (an object store keeps none)."""
    for rel in manifest.get("dirs") or ():
        os.makedirs(os.path.join(target, *str(rel).split("/")), exist_ok=True)
    small: list[tuple[str, str]] = []
    extra = _S3_GET if protocol in _S3 else {}
    for rel, entry in sorted((manifest.get("files") or {}).items()):
        local = os.path.join(target, *str(rel).split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if int(entry.get("size") or 0) < _BATCH_BELOW:
            small.append((f"{key}/{rel}", local))
        else:
            fs.get_file(f"{key}/{rel}", local, **extra)
    if small:
        fs.get([r for r, _ in small], [f for _, f in small])


def make_manifest(digest: str, size: int, files: list[tuple[str, str, int]], dirs: list[str],
                  found: Listing) -> Manifest:
    """The manifest of freshly uploaded files, with the version tags the store gave them."""
    return {
        "format": _FORMAT,
        "content_hash": digest,
        "size": size,
        "files": {rel: {"size": n, "tag": found.get(rel, (n, None))[1]} for rel, _, n in files},
        "dirs": dirs,
    }


def write_manifest(fs: Any, key: str, manifest: Manifest) -> None:
    fs.pipe_file(f"{key}/{MANIFEST}", json.dumps(manifest, sort_keys=True).encode())


def mismatch(manifest: Manifest, found: Listing) -> str | None:
    """Why the objects listed now differ from those the manifest recorded, or None.
    "unknown" when the store gives no version tags to compare (the bytes must be hashed)."""
    files: Mapping[str, Any] = manifest.get("files") or {}
    unknown = False
    for rel, entry in files.items():
        now = found.get(rel)
        if now is None:
            return f"its file '{rel}' is missing"
        if now[0] != entry.get("size"):
            return f"its file '{rel}' changed size"
        tag = entry.get("tag")
        if tag is None or now[1] is None:
            unknown = True
        elif tag != now[1]:
            return f"its file '{rel}' was overwritten"
    return "unknown" if unknown else None
