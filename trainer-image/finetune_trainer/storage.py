"""Object storage for checkpoints and artifacts: S3 (any S3-compatible endpoint) or a local folder.

Keys are relative to the store's root (`s3://bucket/prefix` or a folder) and use `/` separators.
Both stores make a written object appear whole or not at all: S3 by its own semantics, the local
store by writing a temporary file and renaming it over the key.

S3 credentials come from the standard AWS chain (environment variables on the cluster, filled from
a Secret by the operator), or, when `FINETUNE_S3_CREDENTIALS_FILE` names one, from a file of
short-lived credentials that the operator renews (`storage.sts`); they are never logged, and `repr()`
shows only bucket, prefix and endpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.credentials import CredentialProvider, RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError
from botocore.model import ServiceModel
from botocore.retries.standard import (
    ModeledRetryableChecker,
    OrRetryChecker,
    RetryContext,
    ThrottledRetryableChecker,
    ThrottlingStatusCodeChecker,
    TransientRetryableChecker,
)
from s3transfer.exceptions import RetriesExceededError
from s3transfer.manager import TransferManager

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

    def put_files(self, files: Sequence[tuple[str, Path]]) -> None:
        """Store each (key, path) like `put_file`, several at a time where the store can; waits for
        all of them and then raises the first failure, if any."""
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


@dataclass(frozen=True)
class RetryPolicy:
    """A named retry policy for work above single requests (a whole checkpoint, say): `attempts`
    tries in all, sleeping `backoff` seconds after the first failure, doubling, at most
    `max_backoff`. A StorageError marked not retryable ends it at once; so does the last attempt.

    Single S3 requests are retried by botocore (`S3_RETRIES`); this is the one layer above it.
    """

    name: str
    attempts: int
    backoff: float
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"{self.name}: attempts: expected >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"{self.name}: backoff: expected >= 0, got {self.backoff}/{self.max_backoff}")

    def delays(self) -> list[float]:
        """The sleeps between the attempts: backoff, 2*backoff, 4*backoff, ... each at most max_backoff."""
        return [min(self.max_backoff, self.backoff * 2**i) for i in range(self.attempts - 1)]

    def run(
        self,
        op: Callable[[], T],
        *,
        what: str,
        on_failure: Callable[[Exception], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """`op()`, tried again as this policy says; `on_failure` sees every failed attempt, the
        last included. The last failure is raised."""
        delays = self.delays()
        for n in range(self.attempts):
            try:
                return op()
            except Exception as e:
                if on_failure is not None:
                    on_failure(e)
                permanent = isinstance(e, StorageError) and not e.retryable
                if permanent or n == self.attempts - 1:
                    log.error("%s: %s: giving up after %d attempt(s): %s", self.name, what, n + 1, e)
                    raise
                log.warning(
                    "%s: %s: attempt %d of %d failed, retrying in %.2fs: %s",
                    self.name,
                    what,
                    n + 1,
                    self.attempts,
                    delays[n],
                    e,
                )
                sleep(delays[n])
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

    def put_files(self, files: Sequence[tuple[str, Path]]) -> None:
        # One after another: a local copy is bound by the disk, not by round trips.
        for key, path in files:
            self.put_file(key, path)

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

S3_RETRIES: dict[str, Any] = {"mode": "standard", "total_max_attempts": 5}
"""botocore's retries for every S3 request: standard mode (exponential backoff with jitter and a
retry quota; adaptive mode's client-side rate limiter is meant for many writers contending for one
table, not one uploader per pod), 5 attempts in all, the first included. They cover throttling
(SlowDown), 5xx answers, timeouts and dropped connections; s3transfer adds its own retries of a
download whose body stream breaks. Work above one request is retried by a `RetryPolicy`."""

_RETRY_CONDITIONS = OrRetryChecker(
    [
        TransientRetryableChecker(),
        ThrottledRetryableChecker(),
        ThrottlingStatusCodeChecker(),
        ModeledRetryableChecker(),
    ]
)
"""botocore's standard-mode retry conditions (`StandardRetryConditions` without its attempt count
and its STS and DynamoDB special cases): asked after botocore has given up on a request, the same
rule decides a StorageError's `retryable`."""

_SESSION_LOCK = threading.Lock()


CREDENTIALS_FILE_ENV = "FINETUNE_S3_CREDENTIALS_FILE"
"""A JSON file in the `credential_process` format (AccessKeyId, SecretAccessKey, SessionToken,
Expiration): the operator's per-job scoped credentials, mounted from a Secret it renews."""


class FileCredentialProvider(CredentialProvider):  # type: ignore[misc]
    """Temporary credentials from a file that is replaced before they expire (a mounted Secret
    that the kubelet updates in place). botocore re-reads it when the credentials it holds come
    within 15 minutes of their expiry (its advisory refresh; at 10 minutes a failed read fails the
    request), so a long job keeps working across renewals without restarting."""

    METHOD = "finetune-credentials-file"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _read(self) -> dict[str, str]:
        try:
            doc = json.loads(Path(self.path).read_text())
            return {
                "access_key": doc["AccessKeyId"],
                "secret_key": doc["SecretAccessKey"],
                "token": doc["SessionToken"],
                "expiry_time": doc["Expiration"],
            }
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                "storage",
                f"cannot read the S3 credentials file {self.path} ({CREDENTIALS_FILE_ENV}): "
                f"{type(e).__name__}: {e}",
            ) from None

    def load(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(
            metadata=self._read(), refresh_using=self._read, method=self.METHOD
        )


@functools.cache
def _shared_session() -> boto3.session.Session:
    """One boto3 session per process: building one loads the service models (a third of a second),
    and sessions are not thread-safe, so clients are created from it under _SESSION_LOCK. With
    CREDENTIALS_FILE_ENV set, the file's credentials come first in the chain."""
    core = botocore.session.get_session()
    path = os.environ.get(CREDENTIALS_FILE_ENV)
    if path:
        core.get_component("credential_provider").insert_before("env", FileCredentialProvider(path))
    return boto3.session.Session(botocore_session=core)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> (`bucket`, `some/prefix`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError("storage.uri", f"expected s3://bucket[/prefix], got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def botocore_would_retry(error: Exception, service_model: ServiceModel | None = None) -> bool:
    """Whether botocore's standard retry mode counts `error` as transient (throttling, 5xx,
    RequestTimeout, a dropped connection, an error the service model marks retryable). Access
    denied, no such bucket or bad credentials are not: trying again cannot help."""
    if isinstance(error, RetriesExceededError):
        return True  # s3transfer retried a broken download stream and ran out of attempts
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        operation = None
        if service_model is not None and error.operation_name in service_model.operation_names:
            operation = service_model.operation_model(error.operation_name)
        context = RetryContext(
            attempt_number=1,
            operation_model=operation,
            parsed_response=error.response,
            http_response=AWSResponse("", status, {}, None) if isinstance(status, int) else None,
        )
    else:
        context = RetryContext(attempt_number=1, caught_exception=error)
    return bool(_RETRY_CONDITIONS.is_retryable(context))


class S3Store:
    """An S3 bucket prefix as an object store (AWS or any S3-compatible server).

    Every request is retried by botocore (`S3_RETRIES`). Transfers go through one s3transfer
    TransferManager per store, so the files of `put_files` upload together and a file above
    `multipart_threshold` bytes uploads in parts of `multipart_chunksize` bytes; at most
    `max_concurrency` requests are in flight at once, all files together.
    """

    def __init__(
        self,
        uri: str,
        endpoint: str | None = None,
        region: str | None = None,
        *,
        retries: dict[str, Any] | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 64 << 20,
        max_concurrency: int = 8,
    ) -> None:
        self.bucket, self.prefix = split_s3_uri(uri)
        self.endpoint = endpoint
        config = Config(
            retries=retries or S3_RETRIES,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, max_concurrency),
            # S3-compatible servers (MinIO, Ceph, moto) are addressed by path, not by bucket DNS name.
            s3={"addressing_style": "path"} if endpoint else {},
        )
        with _SESSION_LOCK:
            session = _shared_session()
            self._client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        self._transfers: TransferManager | None = None
        self._transfers_lock = threading.Lock()

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint!r}" if self.endpoint else ""
        return f"S3Store({self.uri('')!r}{where})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _manager(self) -> TransferManager:
        """The store's transfer manager, started at the first transfer (its threads with it)."""
        with self._transfers_lock:
            if self._transfers is None:
                self._transfers = TransferManager(self._client, self._transfer_config)
            return self._transfers

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
                retryable=botocore_would_retry(cause, self._client.meta.service_model),
            )
        return StorageError(
            f"{what} {self.uri(key)}: {type(e).__name__}: {e}", retryable=botocore_would_retry(e)
        )

    def _call(self, what: str, key: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except (BotoCoreError, ClientError, RetriesExceededError) as e:
            raise self._error(e, what, key) from e

    def put_file(self, key: str, path: Path) -> None:
        self.put_files([(key, path)])

    def put_files(self, files: Sequence[tuple[str, Path]]) -> None:
        manager = self._manager()
        pending = [(key, manager.upload(str(path), self.bucket, self._key(key))) for key, path in files]
        first: StorageError | None = None
        for key, future in pending:
            try:
                self._call("upload", key, future.result)
            except StorageError as e:
                first = first or e
        if first is not None:
            raise first

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._call("upload", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)

        def fetch(tmp: Path) -> None:
            self._call("download", key, self._manager().download(self.bucket, full, str(tmp)).result)

        write_atomically(path, fetch)

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            return body

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
