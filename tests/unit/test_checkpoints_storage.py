"""The storage layer under checkpoints: LocalStore on a real folder, store selection, retries."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import StorageSpec
from finetune_trainer.storage import (
    LocalStore,
    ObjectInfo,
    ObjectNotFound,
    RetryPolicy,
    S3Store,
    StorageError,
    botocore_would_retry,
    open_store,
    sha256_file,
    split_s3_uri,
)


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    store.put_file("checkpoints/step-00000001/a.bin", src)
    store.put_bytes("checkpoints/step-00000001/sub/b.json", b"{}")
    store.put_bytes("checkpoints-other/c", b"c")

    assert store.get_bytes("checkpoints/step-00000001/a.bin") == b"weights"
    store.get_file("checkpoints/step-00000001/sub/b.json", tmp_path / "out" / "b.json")
    assert (tmp_path / "out" / "b.json").read_bytes() == b"{}"
    assert store.list("checkpoints/") == [
        ObjectInfo("checkpoints/step-00000001/a.bin", 7),
        ObjectInfo("checkpoints/step-00000001/sub/b.json", 2),
    ]
    assert [o.key for o in store.list("checkpoints")] == [
        "checkpoints-other/c",
        "checkpoints/step-00000001/a.bin",
        "checkpoints/step-00000001/sub/b.json",
    ]
    assert store.uri("checkpoints/x") == (tmp_path / "root" / "checkpoints" / "x").as_uri()


def test_local_store_delete_removes_emptied_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("checkpoints/step-00000001/sub/b", b"b")
    store.put_bytes("checkpoints/step-00000002/a", b"a")
    store.delete(["checkpoints/step-00000001/sub/b", "checkpoints/step-00000001/never-existed"])
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()
    assert (tmp_path / "checkpoints" / "step-00000002" / "a").exists()


def test_local_store_missing_objects(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ObjectNotFound, match="no such object"):
        store.get_bytes("nope")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert store.list("") == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/"])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="object key"):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_local_store_readers_never_see_half_a_file(tmp_path: Path) -> None:
    """A reader polling the key while a writer replaces it sees the old or the new bytes only."""
    store = LocalStore(tmp_path)
    old, new = b"o" * 1_000_000, b"n" * 2_000_000
    store.put_bytes("k", old)
    seen: set[int] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(len(store.get_bytes("k")))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(20):
        store.put_bytes("k", new)
        store.put_bytes("k", old)
    done.set()
    reader.join()
    assert seen <= {len(old), len(new)}
    assert [o.key for o in store.list("")] == ["k"]  # no temporary files left or listed


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_open_store_picks_the_store_from_the_uri(tmp_path: Path) -> None:
    assert open_store(StorageSpec(), tmp_path).root == tmp_path
    assert open_store(StorageSpec(uri=str(tmp_path / "a")), tmp_path).root == tmp_path / "a"
    assert open_store(StorageSpec(uri=(tmp_path / "b c").as_uri()), tmp_path).root == tmp_path / "b c"
    s3 = open_store(
        StorageSpec(uri="s3://my-bucket/jobs/ns/name/", endpoint="http://127.0.0.1:9", region="eu-west-1"),
        tmp_path,
    )
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("my-bucket", "jobs/ns/name")
    assert s3.uri("checkpoints/x") == "s3://my-bucket/jobs/ns/name/checkpoints/x"
    assert repr(s3) == "S3Store('s3://my-bucket/jobs/ns/name', endpoint='http://127.0.0.1:9')"


def test_open_store_refuses_a_remote_file_uri(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage\.uri"):
        open_store(StorageSpec(uri="file://otherhost/data"), tmp_path)


def test_split_s3_uri() -> None:
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    assert split_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    with pytest.raises(ConfigError, match=r"storage\.uri"):
        split_s3_uri("gs://bucket/a")


def test_s3_store_never_shows_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
    store = S3Store("s3://bucket/p", endpoint="http://127.0.0.1:9", region="us-east-1")
    assert "SECRET" not in repr(store) and "secret" not in repr(store)


def client_error(code: str, status: int | None, operation: str = "PutObject") -> ClientError:
    """The error botocore raises for an S3 error answer (built from the answer's parsed form)."""
    response: dict = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {}}
    if status is not None:
        response["ResponseMetadata"]["HTTPStatusCode"] = status
    return ClientError(response, operation)


def test_retryable_s3_errors_are_the_ones_botocore_retries() -> None:
    service = S3Store(
        "s3://bucket", endpoint="http://127.0.0.1:9", region="us-east-1"
    )._client.meta.service_model
    assert botocore_would_retry(client_error("SlowDown", 503), service)
    assert botocore_would_retry(client_error("RequestTimeout", 400), service)  # an idle upload's 400
    assert botocore_would_retry(client_error("InternalError", 500), service)
    assert botocore_would_retry(client_error("", 429), service)
    assert botocore_would_retry(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert botocore_would_retry(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))
    assert not botocore_would_retry(client_error("AccessDenied", 403), service)
    assert not botocore_would_retry(client_error("NoSuchBucket", 404), service)
    assert not botocore_would_retry(client_error("InvalidRequest", 400), service)
    assert not botocore_would_retry(NoCredentialsError())  # a config error: exit 78, not a retry


def test_retry_policy_backoff_doubles_up_to_the_cap() -> None:
    assert RetryPolicy("p", attempts=5, backoff=0.5, max_backoff=3.0).delays() == [0.5, 1.0, 2.0, 3.0]
    assert RetryPolicy("p", attempts=1, backoff=1.0).delays() == []
    with pytest.raises(ValueError, match="p: attempts: expected >= 1, got 0"):
        RetryPolicy("p", attempts=0, backoff=1.0)


def test_retry_policy_retries_transient_errors_only() -> None:
    sleeps: list[float] = []
    calls = []
    seen: list[Exception] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StorageError("connection reset")
        return "ok"

    policy = RetryPolicy("upload", attempts=3, backoff=0.1)
    assert policy.run(flaky, what="x", on_failure=seen.append, sleep=sleeps.append) == "ok"
    assert sleeps == [0.1, 0.2] and len(seen) == 2

    def denied() -> None:
        calls.append(1)
        raise StorageError("AccessDenied", retryable=False)

    calls.clear()
    with pytest.raises(StorageError, match="AccessDenied"):
        RetryPolicy("upload", attempts=5, backoff=0.1).run(denied, what="x", sleep=sleeps.append)
    assert len(calls) == 1

    calls.clear()
    seen.clear()
    with pytest.raises(StorageError, match="connection reset"):
        RetryPolicy("upload", attempts=2, backoff=0.1).run(
            flaky, what="x", on_failure=seen.append, sleep=sleeps.append
        )
    assert len(calls) == 2 and len(seen) == 2  # the last failure is seen too
