"""Checkpoints against a real S3 server (moto's standalone server over HTTP) and a local folder.

Every scenario of issue 3 item 5 that does not need a model: upload then resume, partial uploads
skipped, another config's checkpoints ignored, corruption caught by sha256, keep-last-K pruning,
and S3 going away and coming back while training goes on.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import boto3
import pytest
from finetune_trainer.checkpoints import (
    MANIFEST_NAME,
    CheckpointRef,
    CheckpointUploader,
    CorruptCheckpoint,
    build_manifest,
    describe_files,
    download,
    encode_manifest,
    list_complete,
    resolve_resume,
    step_prefix,
)
from finetune_trainer.storage import (
    LocalStore,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    RetryPolicy,
    S3Store,
    StorageError,
    sha256_file,
)
from localkube.s3 import S3
from s3server import TEST_CREDENTIALS, start_moto_server


@pytest.fixture
def moto_s3(s3: S3, monkeypatch: pytest.MonkeyPatch) -> str:
    """Endpoint of the session's S3 server (localkube's `s3`), with its credentials in the
    environment, where S3Store reads them. Each test uses a bucket of its own."""
    aws_credentials(monkeypatch)
    return s3.endpoint_url


def aws_credentials(env: pytest.MonkeyPatch) -> None:
    for name, value in TEST_CREDENTIALS.items():
        env.setenv(name, value)
    env.setenv("AWS_CONFIG_FILE", "/nonexistent")
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    env.delenv("AWS_PROFILE", raising=False)


def new_bucket(endpoint: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3_store(endpoint: str, bucket: str, request_attempts: int = 2, **kwargs: object) -> S3Store:
    options = {
        "retries": {"mode": "standard", "total_max_attempts": request_attempts},
        "connect_timeout": 2.0,
        **kwargs,
    }
    return S3Store(f"s3://{bucket}/jobs/ns/job", endpoint=endpoint, region="us-east-1", **options)


def quick_retry(attempts: int) -> RetryPolicy:
    return RetryPolicy("test-upload", attempts=attempts, backoff=0.01)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_s3")
    return s3_store(endpoint, new_bucket(endpoint))


class RecordingStore:
    """A real store that records the operations made through it, in order."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.ops: list[tuple[str, str]] = []

    def put_file(self, key: str, path: Path) -> None:
        self.ops.append(("put", key))
        self.inner.put_file(key, path)

    def put_files(self, files: Sequence[tuple[str, Path]]) -> None:
        self.ops.extend(("put", key) for key, _ in files)
        self.inner.put_files(files)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.ops.append(("put", key))
        self.inner.put_bytes(key, data)

    def get_file(self, key: str, path: Path) -> None:
        self.inner.get_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def list(self, prefix: str) -> list[ObjectInfo]:
        self.ops.append(("list", prefix))
        return self.inner.list(prefix)

    def delete(self, keys: list[str]) -> None:
        self.ops.extend(("delete", k) for k in keys)
        self.inner.delete(keys)

    def uri(self, key: str) -> str:
        return self.inner.uri(key)


class GatedStore(RecordingStore):
    """Uploads wait until the test opens the gate: the worker is provably busy meanwhile."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def put_files(self, files: Sequence[tuple[str, Path]]) -> None:
        self.entered.set()
        self.gate.wait()
        super().put_files(files)


def local_checkpoint(root: Path, step: int) -> Path:
    """A tiny checkpoint folder shaped like the trainer's (adapter, nested optimizer state)."""
    folder = root / f"local-step-{step}"
    (folder / "optimizer").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(f"adapter at step {step};".encode() * 8)
    (folder / "optimizer" / "state.pt").write_bytes(bytes([step % 256]) * 64)
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def stored_steps(store: ObjectStore) -> set[int]:
    return {int(o.key.split("/")[1].removeprefix("step-")) for o in store.list("checkpoints/")}


def upload(
    store: ObjectStore, tmp_path: Path, fingerprint: str, steps: list[int], keep_last: int = 10
) -> None:
    with CheckpointUploader(
        store, fingerprint, keep_last, retry=quick_retry(2), skip_superseded=False
    ) as uploader:
        for step in steps:
            uploader.submit(step, local_checkpoint(tmp_path / uuid.uuid4().hex, step))
        assert uploader.wait(30)
        assert uploader.failures == 0, uploader.last_error


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        sha256_file(a / f) == sha256_file(b / f) for f in files
    )


# ---------------------------------------------------------------------------------------------


def test_upload_then_resume_from_the_newest(store: ObjectStore, tmp_path: Path) -> None:
    completed: list[tuple[int, float]] = []
    uploader = CheckpointUploader(
        store,
        "fp",
        keep_last=5,
        retry=quick_retry(2),
        staging_dir=tmp_path / "staging",
        skip_superseded=False,
    )
    uploader.on_complete = lambda ref, seconds: completed.append((ref.step, seconds))
    for step in (10, 20):
        uploader.submit(step, local_checkpoint(tmp_path, step), state={"loss": 1.0 / step})
    assert uploader.wait(30)
    assert uploader.close()
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())

    assert [s for s, _ in completed] == [10, 20]
    assert all(seconds >= 0 for _, seconds in completed)
    assert uploader.last_complete is not None and uploader.last_complete.step == 20
    assert (uploader.failures, uploader.last_error) == (0, None)

    resumed = resolve_resume(store, "fp", tmp_path / "resume")
    assert resumed is not None
    path, ref = resumed
    assert (ref.step, ref.prefix) == (20, "checkpoints/step-00000020/")
    assert ref.uri == store.uri("checkpoints/step-00000020/")
    assert ref.trainer_state == {"loss": 0.05}
    assert ref.manifest == uploader.last_complete.manifest
    assert path == tmp_path / "resume" / "step-00000020"
    assert same_tree(path, tmp_path / "local-step-20")


def test_manifest_is_written_after_every_file(store: ObjectStore, tmp_path: Path) -> None:
    recorder = RecordingStore(store)
    upload(recorder, tmp_path, "fp", [10])
    puts = [key for op, key in recorder.ops if op == "put"]
    assert puts[-1] == "checkpoints/step-00000010/manifest.json"
    assert sorted(puts[:-1]) == [
        "checkpoints/step-00000010/adapter_model.safetensors",
        "checkpoints/step-00000010/optimizer/state.pt",
        "checkpoints/step-00000010/trainer_state.json",
    ]


def test_submit_returns_at_once_and_the_caller_may_delete_its_folder(
    store: ObjectStore, tmp_path: Path
) -> None:
    gated = GatedStore(store)
    with CheckpointUploader(gated, "fp", keep_last=2, retry=quick_retry(1)) as uploader:
        folder = local_checkpoint(tmp_path / "work", 10)
        uploader.submit(10, folder)  # the worker now blocks in put_file until the gate opens
        shutil.rmtree(folder)  # the trainer rotates its local checkpoints at once
        assert uploader.pending == 1
        assert not uploader.wait(0.05)
        gated.gate.set()
        assert uploader.wait(30)
    assert uploader.last_complete is not None
    resumed = resolve_resume(store, "fp", tmp_path / "resume")
    assert resumed is not None and same_tree(resumed[0], local_checkpoint(tmp_path / "expected", 10))


def test_a_backlog_keeps_only_the_newest_waiting_checkpoint(store: ObjectStore, tmp_path: Path) -> None:
    gated = GatedStore(store)
    completed: list[int] = []
    with CheckpointUploader(
        gated, "fp", keep_last=5, retry=quick_retry(1), on_complete=lambda ref, _: completed.append(ref.step)
    ) as uploader:
        uploader.submit(10, local_checkpoint(tmp_path, 10))
        assert gated.entered.wait(30)  # step 10 is being uploaded
        uploader.submit(20, local_checkpoint(tmp_path, 20))
        uploader.submit(30, local_checkpoint(tmp_path, 30))
        assert uploader.pending == 3
        gated.gate.set()
        assert uploader.wait(30)
    assert completed == [10, 30]
    assert (uploader.superseded, uploader.failures) == (1, 0)
    assert stored_steps(store) == {10, 30}


def test_missing_objects_are_reported_as_such(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.get_bytes("checkpoints/nothing")
    with pytest.raises(ObjectNotFound):
        store.get_file("checkpoints/nothing", tmp_path / "x")
    upload(store, tmp_path, "fp", [10])
    ref = list_complete(store, "fp")[0]
    store.delete(["checkpoints/step-00000010/trainer_state.json"])
    with pytest.raises(CorruptCheckpoint, match=r"trainer_state\.json: missing"):
        download(store, ref, tmp_path / "dest")


def put_partial(store: ObjectStore, tmp_path: Path, step: int, fingerprint: str, *, manifest: bool) -> None:
    """What a preempted upload leaves: files, and optionally a manifest naming one file that never
    arrived."""
    folder = local_checkpoint(tmp_path / f"partial-{step}", step)
    files = describe_files(folder)
    for f in files[:-1]:
        store.put_file(step_prefix(step) + f["path"], folder / f["path"])
    if manifest:
        store.put_bytes(
            step_prefix(step) + MANIFEST_NAME, encode_manifest(build_manifest(step, fingerprint, files))
        )


def test_half_uploaded_checkpoints_are_skipped(store: ObjectStore, tmp_path: Path) -> None:
    upload(store, tmp_path, "fp", [10])
    put_partial(store, tmp_path, 20, "fp", manifest=False)
    put_partial(store, tmp_path, 30, "fp", manifest=True)
    assert stored_steps(store) == {10, 20, 30}

    assert [r.step for r in list_complete(store, "fp")] == [10]
    resumed = resolve_resume(store, "fp", tmp_path / "resume")
    assert resumed is not None and resumed[1].step == 10


def test_checkpoints_of_another_config_are_never_used(store: ObjectStore, tmp_path: Path) -> None:
    upload(store, tmp_path, "config-a", [10])
    upload(store, tmp_path, "config-b", [20, 30], keep_last=1)

    assert [r.step for r in list_complete(store, "config-a")] == [10]
    assert resolve_resume(store, "config-a", tmp_path / "a")[1].step == 10
    assert resolve_resume(store, "config-c", tmp_path / "c") is None
    # config-b's pruning kept config-a's checkpoint: it is not config-b's to judge.
    assert stored_steps(store) == {10, 30}


def test_a_newer_trainers_checkpoints_are_left_alone(store: ObjectStore, tmp_path: Path) -> None:
    put_partial(store, tmp_path, 5, "fp", manifest=False)
    store.put_bytes("checkpoints/step-00000005/manifest.json", b'{"format_version": 2}')
    upload(store, tmp_path, "fp", [10, 20], keep_last=1)
    assert stored_steps(store) == {5, 20}


def test_corrupted_file_is_caught_by_sha256_and_the_previous_checkpoint_used(
    store: ObjectStore, tmp_path: Path
) -> None:
    upload(store, tmp_path, "fp", [10, 20])
    key = "checkpoints/step-00000020/optimizer/state.pt"
    original = store.get_bytes(key)
    store.put_bytes(key, bytes(b ^ 0xFF for b in original))  # same size: only the hash can tell

    newest = list_complete(store, "fp")[0]
    assert newest.step == 20
    with pytest.raises(CorruptCheckpoint, match=r"step 20: optimizer/state\.pt: sha256"):
        download(store, newest, tmp_path / "direct")

    resumed = resolve_resume(store, "fp", tmp_path / "resume")
    assert resumed is not None and resumed[1].step == 10
    assert not (tmp_path / "resume" / "step-00000020").exists()


def test_keep_last_prunes_old_and_partial_checkpoints(store: ObjectStore, tmp_path: Path) -> None:
    put_partial(store, tmp_path, 5, "fp", manifest=False)
    put_partial(store, tmp_path, 15, "fp", manifest=True)
    put_partial(store, tmp_path, 100, "fp", manifest=False)  # newer than anything written below
    upload(store, tmp_path, "fp", [10, 20, 30, 40], keep_last=2)

    assert stored_steps(store) == {30, 40, 100}
    assert [r.step for r in list_complete(store, "fp")] == [40, 30]


def test_a_step_submitted_twice_stays_complete(store: ObjectStore, tmp_path: Path) -> None:
    """A periodic save and then SIGTERM at the same step: the second upload must not open a
    window in which the step has no manifest."""
    upload(store, tmp_path, "fp", [10])
    recorder = RecordingStore(store)
    upload(recorder, tmp_path, "fp", [10])
    assert not [op for op in recorder.ops if op[0] in ("put", "delete")]
    assert [r.step for r in list_complete(store, "fp")] == [10]


def test_a_step_rewritten_by_a_later_run_replaces_the_old_objects(store: ObjectStore, tmp_path: Path) -> None:
    """An earlier run left step 20 with an extra file; a run that redoes step 20 replaces it whole."""
    put_partial(store, tmp_path, 20, "fp", manifest=True)
    store.put_bytes("checkpoints/step-00000020/stale.bin", b"stale")
    upload(store, tmp_path, "fp", [20])
    keys = {o.key.removeprefix("checkpoints/step-00000020/") for o in store.list("checkpoints/")}
    assert keys == {"adapter_model.safetensors", "optimizer/state.pt", "trainer_state.json", MANIFEST_NAME}
    assert resolve_resume(store, "fp", tmp_path / "resume")[1].step == 20


# ---------------------------------------------------------------------------------------------
# S3 only


def test_s3_unreachable_then_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_credentials(monkeypatch)
    endpoint, stop = start_moto_server()
    port = int(endpoint.rsplit(":", 1)[1])
    bucket = new_bucket(endpoint)
    store = s3_store(endpoint, bucket, request_attempts=1)
    completed: list[CheckpointRef] = []
    failed: list[tuple[int, str, int]] = []  # (failed attempts, error, checkpoints given up so far)
    uploader = CheckpointUploader(
        store,
        "fp",
        keep_last=2,
        retry=quick_retry(3),
        on_complete=lambda ref, _: completed.append(ref),
        on_failed_attempt=lambda n, error: failed.append((n, error, uploader.failures)),
    )
    try:
        stop()  # the port now refuses connections
        uploader.submit(10, local_checkpoint(tmp_path, 10))
        assert uploader.wait(60)
        assert uploader.failures == 1
        assert uploader.failed_attempts == 3  # every retry counts: what status shows while failing
        # Each failed attempt is announced as it happens, before the checkpoint is given up.
        assert [(n, given_up) for n, _, given_up in failed] == [(1, 0), (2, 0), (3, 0)]
        assert all(error.startswith("step 10: StorageError") for _, error, _ in failed)
        assert uploader.last_error is not None and uploader.last_error.startswith("step 10: StorageError")
        assert uploader.last_complete is None and completed == []

        uploader.submit(20, local_checkpoint(tmp_path, 20))
        assert uploader.wait(60)
        assert (uploader.failures, uploader.failed_attempts) == (2, 6)  # consecutive

        endpoint_again, stop = start_moto_server(port)
        assert endpoint_again == endpoint
        uploader.submit(30, local_checkpoint(tmp_path, 30))
        assert uploader.wait(60)
        assert (uploader.failures, uploader.failed_attempts, uploader.last_error) == (0, 0, None)
        assert [r.step for r in completed] == [30]
        assert resolve_resume(store, "fp", tmp_path / "resume")[1].step == 30
    finally:
        uploader.close()
        stop()


def test_s3_permanent_errors_are_not_retried(moto_s3: str, tmp_path: Path) -> None:
    store = RecordingStore(s3_store(moto_s3, "no-such-bucket-here", request_attempts=5))
    with CheckpointUploader(store, "fp", keep_last=2, retry=quick_retry(5)) as uploader:
        uploader.submit(10, local_checkpoint(tmp_path, 10))
        assert uploader.wait(30)
    assert uploader.failures == 1
    assert "NoSuchBucket" in uploader.last_error
    assert len([op for op in store.ops if op[0] == "list"]) == 1


def test_s3_large_files_upload_in_parts(moto_s3: str, tmp_path: Path) -> None:
    bucket = new_bucket(moto_s3)
    part = 5 << 20  # the smallest part S3 accepts
    store = s3_store(moto_s3, bucket, multipart_threshold=part, multipart_chunksize=part)
    big = tmp_path / "big.bin"
    big.write_bytes(b"0123456789abcdef" * ((2 * part + 4096) // 16))
    store.put_file("artifacts/big.bin", big)

    head = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").head_object(
        Bucket=bucket, Key="jobs/ns/job/artifacts/big.bin"
    )
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert store.list("artifacts/") == [ObjectInfo("artifacts/big.bin", big.stat().st_size)]
    store.get_file("artifacts/big.bin", tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == sha256_file(big)


def test_s3_a_checkpoints_files_upload_concurrently(moto_s3: str, tmp_path: Path) -> None:
    """put_files sends the files together through one transfer manager: three PutObject requests
    are in flight at once (each waits in botocore's before-send hook until all three arrived;
    uploaded one after another, the first would wait alone and the barrier would time out)."""
    bucket = new_bucket(moto_s3)
    store = s3_store(moto_s3, bucket)
    barrier = threading.Barrier(3, timeout=20)

    def all_in_flight(**_: object) -> None:
        barrier.wait()  # raises BrokenBarrierError after 20 s alone

    store._client.meta.events.register("before-send.s3.PutObject", all_in_flight)
    folder = local_checkpoint(tmp_path, 10)
    files = [(f"checkpoints/x/{p.name}", p) for p in sorted(folder.rglob("*")) if p.is_file()]
    assert len(files) == 3
    store.put_files(files)
    assert sorted(o.key for o in store.list("checkpoints/x/")) == sorted(k for k, _ in files)


def test_a_retried_checkpoint_sends_only_the_files_not_stored_yet(tmp_path: Path) -> None:
    """One file's upload fails once (a fault injected in front of a real LocalStore: a lost
    connection for one object cannot be produced on demand otherwise); the retry sends that file
    and the manifest, not the files the first attempt stored."""

    class FailsOnce(RecordingStore):
        failed = False

        def put_files(self, files: Sequence[tuple[str, Path]]) -> None:
            self.ops.extend(("put", key) for key, _ in files)
            ok = [(k, p) for k, p in files if not k.endswith("state.pt") or self.failed]
            self.inner.put_files(ok)
            if len(ok) < len(files):
                self.failed = True
                raise StorageError("upload state.pt: connection reset")

    store = FailsOnce(LocalStore(tmp_path / "store"))
    with CheckpointUploader(store, "fp", keep_last=2, retry=quick_retry(3)) as uploader:
        uploader.submit(10, local_checkpoint(tmp_path, 10))
        assert uploader.wait(30)
    assert (uploader.failures, uploader.failed_attempts) == (0, 0)  # reset once it completed
    prefix = "checkpoints/step-00000010/"
    puts = [key.removeprefix(prefix) for op, key in store.ops if op == "put"]
    first = ["adapter_model.safetensors", "optimizer/state.pt", "trainer_state.json"]
    assert puts == [*first, "optimizer/state.pt", MANIFEST_NAME]
    assert resolve_resume(store, "fp", tmp_path / "resume")[1].step == 10
