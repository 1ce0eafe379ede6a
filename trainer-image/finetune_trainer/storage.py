"""Object storage for checkpoints and artifacts: S3 (any S3-compatible endpoint) or a local folder.

Keys are relative to the store's root (`s3://bucket/prefix` or a folder) and use `/` separators.
Both stores make a written object appear whole or not at all: S3 by its own semantics, the local
store by writing a temporary file and renaming it over the key.

S3 credentials come from the standard AWS chain (environment variables on the cluster, filled from
a Secret by the operator); they are never logged, and `repr()` shows only bucket, prefix and
endpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from finetune_trainer.errors import ConfigError

if TYPE_CHECKING:
    from finetune_trainer.spec import StorageSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

_TMP_PREFIX = ".tmp-"
"""Temporary files of LocalStore start with this; listings never show them."""

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store's root and its size in bytes."""

    key: str
    size: int


class StorageError(Exception):
    """A storage operation failed. `retryable` is False when trying again cannot help
    (access denied, no such bucket), so callers stop retrying at once."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ObjectNotFound(StorageError):  # noqa: N818 (other modules import this name)
    """The key does not exist."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"no such object: {uri}", retryable=False)
        self.uri = uri


class ObjectStore(Protocol):
    """What the trainer needs from a bucket: whole-object puts and gets, prefix listing, deletes."""

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key`, replacing any object there."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """Write the object to `path` (parents created); raises ObjectNotFound."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The object's content; raises ObjectNotFound."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with `prefix` (a string prefix, not a folder), sorted by key."""
        ...

    def delete(self, keys: list[str]) -> None:
        """Delete these keys; keys that do not exist are ignored."""
        ...

    def uri(self, key: str) -> str:
        """Where `key` lives, for people and status: `s3://bucket/prefix/key` or `file:///...`."""
        ...


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root or name nothing (`..`, absolute, empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key {key!r}: expected a relative path of non-empty parts without . or ..")
    return key


@contextlib.contextmanager
def config_errors(field: str) -> Iterator[None]:
    """Storage errors that no retry can fix (no such bucket, access denied, bad credentials) as a
    ConfigError naming `field`: the job fails at once (exit 78) instead of being retried."""
    try:
        yield
    except StorageError as e:
        if e.retryable or isinstance(e, ObjectNotFound):
            raise
        raise ConfigError(field, str(e)) from None


def backoff_delays(attempts: int, base: float, cap: float = 30.0) -> list[float]:
    """Sleeps between `attempts` tries: base, 2*base, 4*base, ... each at most `cap`."""
    return [min(cap, base * 2**i) for i in range(max(0, attempts - 1))]


def retry(
    op: Callable[[], T],
    *,
    attempts: int,
    backoff: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `op`, retrying StorageErrors marked retryable with exponential backoff."""
    delays = backoff_delays(attempts, backoff)
    for attempt in range(attempts):
        try:
            return op()
        except StorageError as e:
            if not e.retryable or attempt == attempts - 1:
                raise
            log.warning(
                "storage: %s failed (attempt %d of %d), retrying in %.2fs: %s",
                what,
                attempt + 1,
                attempts,
                delays[attempt],
                e,
            )
            sleep(delays[attempt])
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Local folder


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp)` on a temporary sibling renamed into place, so readers
    see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore:
    """A folder as an object store, for workstation runs and tests.

    Writes go to a temporary file in the target folder and are renamed over the key, so a reader
    never sees half a file. Empty folders left by deletes are removed.
    """

    def __init__(self, path: Path | str) -> None:
        self.root = Path(path).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_file(self, key: str, path: Path) -> None:
        write_atomically(self._path(key), lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomically(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(self.uri(key))
        write_atomically(path, lambda tmp: shutil.copyfile(source, tmp))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None

    def _walk(self) -> Iterator[tuple[str, Path]]:
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                full = Path(folder, name)
                yield full.relative_to(self.root).as_posix(), full

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        for key, full in self._walk():
            if key.startswith(prefix):
                try:
                    found.append(ObjectInfo(key, full.stat().st_size))
                except FileNotFoundError:
                    continue  # deleted while listing
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._prune_empty_parents(path.parent)

    def _prune_empty_parents(self, folder: Path) -> None:
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty (or gone): stop
            folder = folder.parent

    def uri(self, key: str) -> str:
        """`file://` URI of a key or of a key prefix (a trailing `/` is kept)."""
        stripped = key.rstrip("/")
        path = self._path(stripped) if stripped else self.root
        return path.as_uri() + ("/" if key.endswith("/") else "")


# ---------------------------------------------------------------------------------------------
# S3

_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "InvalidObjectState",
    }
)


_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalError",
    }
)


_SESSION_LOCK = threading.Lock()


@functools.cache
def _shared_session() -> boto3.session.Session:
    """One boto3 session per process: building one loads the service models (a third of a second),
    and sessions are not thread-safe, so clients are created from it under _SESSION_LOCK."""
    return boto3.session.Session()


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> (`bucket`, `some/prefix`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError("storage.uri", f"expected s3://bucket[/prefix], got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def is_retryable_s3_error(code: str, http_status: int | None) -> bool:
    """Throttling, timeouts and server errors are worth retrying; auth and missing buckets are not."""
    if code in _PERMANENT_CODES:
        return False
    if code in _TRANSIENT_CODES:
        return True
    if http_status is None:
        return True
    return http_status >= 500 or http_status in (408, 429)


class S3Store:
    """An S3 bucket prefix as an object store (AWS or any S3-compatible server).

    Retries happen twice over: botocore's standard retry mode (`max_attempts` per request, for
    throttling and transient network errors) and, around uploads, our own exponential backoff
    (`upload_attempts`, starting at `backoff` seconds) that also covers failures botocore gives up
    on, such as a multipart upload losing its connection. Files above `multipart_threshold` bytes
    upload in parts of `multipart_chunksize` bytes, several at a time.
    """

    def __init__(
        self,
        uri: str,
        endpoint: str | None = None,
        region: str | None = None,
        *,
        max_attempts: int = 5,
        upload_attempts: int = 3,
        backoff: float = 1.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 64 << 20,
        max_concurrency: int = 4,
    ) -> None:
        self.bucket, self.prefix = split_s3_uri(uri)
        self.endpoint = endpoint
        self.upload_attempts = upload_attempts
        self.backoff = backoff
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # S3-compatible servers (MinIO, Ceph, moto) are addressed by path, not by bucket DNS name.
            s3={"addressing_style": "path"} if endpoint else {},
        )
        with _SESSION_LOCK:
            session = _shared_session()
            self._client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint!r}" if self.endpoint else ""
        return f"S3Store({self.uri('')!r}{where})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, what: str, key: str) -> StorageError:
        """Translate a boto error into a StorageError naming the object (never credentials)."""
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ClientError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound"):
                return ObjectNotFound(self.uri(key))
            return StorageError(
                f"{what} {self.uri(key)}: {code or status}: {error.get('Message', '')}".rstrip(": "),
                retryable=is_retryable_s3_error(code, status),
            )
        return StorageError(f"{what} {self.uri(key)}: {type(e).__name__}: {e}")

    def _call(self, what: str, key: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except (BotoCoreError, ClientError, Boto3Error) as e:
            raise self._error(e, what, key) from e

    def _upload(self, what: str, key: str, op: Callable[[], None]) -> None:
        retry(
            lambda: self._call(what, key, op),
            attempts=self.upload_attempts,
            backoff=self.backoff,
            what=f"{what} {self.uri(key)}",
        )

    def put_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        self._upload(
            "upload",
            key,
            lambda: self._client.upload_file(str(path), self.bucket, full, Config=self._transfer),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._upload("upload", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)

        def fetch(tmp: Path) -> None:
            self._call(
                "download",
                key,
                lambda: self._client.download_file(self.bucket, full, str(tmp), Config=self._transfer),
            )

        write_atomically(path, fetch)

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

        return self._call("download", key, fetch)

    def list(self, prefix: str) -> list[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""

        def collect() -> list[ObjectInfo]:
            found = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(ObjectInfo(obj["Key"][len(root) :], int(obj["Size"])))
            return sorted(found, key=lambda o: o.key)

        return self._call("list", prefix, collect)

    def delete(self, keys: list[str]) -> None:
        full = [self._key(k) for k in keys]
        for start in range(0, len(full), 1000):  # DeleteObjects takes at most 1000 keys
            batch = full[start : start + 1000]
            response = self._call(
                "delete",
                keys[start],
                lambda batch=batch: self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                ),
            )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}: "
                    f"{first.get('Message', '')} ({len(errors)} keys failed)"
                )

    def uri(self, key: str) -> str:
        path = "/".join(p for p in (self.prefix, key) if p)
        return f"s3://{self.bucket}/{path}"


def open_store(storage: StorageSpec, default_root: Path) -> ObjectStore:
    """The store named by `storage.uri`: `s3://` -> S3Store, a path or `file://` -> LocalStore,
    unset -> LocalStore(default_root)."""
    uri = storage.uri
    if uri is None:
        return LocalStore(default_root)
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint=storage.endpoint, region=storage.region)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError("storage.uri", f"expected file:///absolute/path, got {uri!r}")
        return LocalStore(Path(unquote(parsed.path)))
    if PurePosixPath(uri).is_absolute():
        return LocalStore(Path(uri))
    raise ConfigError("storage.uri", f"expected s3://bucket/prefix, an absolute path or file://, got {uri!r}")
