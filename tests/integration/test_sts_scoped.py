"""Scoped storage credentials against a real MinIO with STS: what the session policy made by
finetune_operator.credentials lets a job's credentials do, and what it refuses.

team-a/a1 gets credentials the operator's way (session_policy + AssumeRole with the platform's
credentials); the server, not our code, decides every allow and deny below. The trainer's own S3
store then runs on them through the mounted-file path (FINETUNE_S3_CREDENTIALS_FILE), renewal
included. The per-job Secret on a real API server is at the end (marked cluster): written, renewed
and removed; STS refusing or unreachable; a Secret of that name the job does not own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from e2e.harness import install_crd
from finetune_operator.config import OperatorConfig
from finetune_operator.credentials import (
    ANNOTATION_EXPIRES,
    CREDENTIALS_KEY,
    MINIO_ROLE_ARN,
    REASON_FAILED,
    REASON_NOT_OWNED,
    CredentialsError,
    Issued,
    StorageCredentials,
    assume_role,
    readable_prefixes,
    secret_name,
    session_policy,
)
from finetune_operator.jobbuilder import resolved_storage
from finetune_operator.naming import owner_reference
from finetune_operator.status import credentials_status
from localkube.minio import MinIO, require_minio, start_minio

BUCKET = "ml-artifacts"
OTHER_BUCKET = "team-b-private"

CFG = OperatorConfig.model_validate(
    {
        "storage": {
            "uri": f"s3://{BUCKET}/finetune",
            "sts": {"enabled": True, "durationSeconds": 900, "renewBeforeSeconds": 300},
        },
        "resyncSeconds": 60,
        "policy": {
            "modelPrefixes": [f"s3://{BUCKET}/base-models/"],
            "dataPrefixes": [f"s3://{BUCKET}/datasets/"],
        },
    }
)


def ftj(namespace: str = "team-a", name: str = "a1", uid: str = "uid-a1") -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"model": {"s3": f"s3://{BUCKET}/base-models/tiny/"}, "data": {"hub": "org/data"}},
    }


@pytest.fixture(scope="module")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinIO]:
    require_minio()
    server = start_minio(tmp_path_factory.mktemp("minio"), buckets=(BUCKET, OTHER_BUCKET))
    root = server.client()
    for key in (
        "base-models/tiny/config.json",
        "datasets/rows.jsonl",
        "finetune/team-a/a0/export/adapter.safetensors",  # an earlier job of team-a
        "finetune/team-a/a10/checkpoints/step-1/manifest.json",  # a namesake with a longer name
        "finetune/team-b/b1/export/merged.safetensors",
    ):
        root.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    root.put_object(Bucket=OTHER_BUCKET, Key="data.jsonl", Body=b"secret rows")
    try:
        yield server
    finally:
        server.stop()


def issue(server: MinIO, job: dict[str, Any]) -> Issued:
    """Credentials for `job` exactly as the operator makes them."""
    meta = job["metadata"]
    policy = session_policy(resolved_storage(job, CFG)["uri"], readable_prefixes(meta["namespace"], CFG))
    return assume_role(server.client("sts"), policy, CFG.storage.sts, f"{meta['namespace']}.{meta['name']}")


def client_for(server: MinIO, creds: Issued) -> Any:
    return server.client(
        access_key=creds.access_key_id, secret_key=creds.secret_access_key, session_token=creds.session_token
    )


def denied(call: Any, **kwargs: Any) -> str:
    """The error code of a refused call (it must be refused)."""
    with pytest.raises(ClientError) as refused:
        call(**kwargs)
    return str(refused.value.response["Error"]["Code"])


def test_job_credentials_reach_own_prefix_and_allowed_reads_only(minio: MinIO) -> None:
    creds = issue(minio, ftj())
    assert creds.expiration - datetime.now(UTC) <= timedelta(seconds=900)
    s3 = client_for(minio, creds)
    own = "finetune/team-a/a1/"

    # Its own prefix: write, read, list, delete; and a multipart upload (checkpoints of any size).
    s3.put_object(Bucket=BUCKET, Key=own + "checkpoints/step-5/manifest.json", Body=b"{}")
    assert s3.get_object(Bucket=BUCKET, Key=own + "checkpoints/step-5/manifest.json")["Body"].read() == b"{}"
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=own + "checkpoints/")
    assert [o["Key"] for o in listed["Contents"]] == [own + "checkpoints/step-5/manifest.json"]
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=own + "export/model.gguf")
    part = s3.upload_part(
        Bucket=BUCKET,
        Key=own + "export/model.gguf",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"g" * 1024,
    )
    s3.complete_multipart_upload(
        Bucket=BUCKET,
        Key=own + "export/model.gguf",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    s3.delete_object(Bucket=BUCKET, Key=own + "checkpoints/step-5/manifest.json")

    # Read-only: the platform's base models and data sets, and its own namespace's earlier outputs.
    assert s3.get_object(Bucket=BUCKET, Key="base-models/tiny/config.json")["Body"].read() == b"x"
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="base-models/tiny/")["KeyCount"] == 1
    assert s3.get_object(Bucket=BUCKET, Key="datasets/rows.jsonl")["Body"].read() == b"x"
    assert (
        s3.get_object(Bucket=BUCKET, Key="finetune/team-a/a0/export/adapter.safetensors")["Body"].read()
        == b"x"
    )
    for key in ("base-models/tiny/poisoned.json", "datasets/rows.jsonl", "finetune/team-a/a0/export/x"):
        assert denied(s3.put_object, Bucket=BUCKET, Key=key, Body=b"y") == "AccessDenied"
    assert denied(s3.delete_object, Bucket=BUCKET, Key="base-models/tiny/config.json") == "AccessDenied"

    # team-b's prefix: no read, no write, no listing.
    team_b = "finetune/team-b/b1/export/merged.safetensors"
    assert denied(s3.get_object, Bucket=BUCKET, Key=team_b) == "AccessDenied"
    assert (
        denied(s3.put_object, Bucket=BUCKET, Key="finetune/team-b/b1/export/evil", Body=b"y")
        == "AccessDenied"
    )
    assert denied(s3.list_objects_v2, Bucket=BUCKET, Prefix="finetune/team-b/") == "AccessDenied"
    # A namesake whose name starts with a1 is another job of the namespace: readable (as earlier
    # outputs are), never writable. The bucket root and the platform's whole prefix: not listable.
    namesake = "finetune/team-a/a10/checkpoints/step-1/manifest.json"
    assert s3.get_object(Bucket=BUCKET, Key=namesake)["Body"].read() == b"x"
    assert denied(s3.put_object, Bucket=BUCKET, Key=namesake, Body=b"y") == "AccessDenied"
    assert denied(s3.delete_object, Bucket=BUCKET, Key=namesake) == "AccessDenied"
    assert denied(s3.list_objects_v2, Bucket=BUCKET) == "AccessDenied"
    assert denied(s3.list_objects_v2, Bucket=BUCKET, Prefix="finetune/") == "AccessDenied"
    # Another bucket, and the account's buckets.
    assert denied(s3.get_object, Bucket=OTHER_BUCKET, Key="data.jsonl") == "AccessDenied"
    assert denied(s3.put_object, Bucket=OTHER_BUCKET, Key="x", Body=b"y") == "AccessDenied"
    assert denied(s3.list_objects_v2, Bucket=OTHER_BUCKET) == "AccessDenied"
    assert denied(s3.list_buckets) == "AccessDenied"

    # And team-b's own job is scoped the other way round.
    other = client_for(minio, issue(minio, ftj("team-b", "b1", "uid-b1")))
    assert other.get_object(Bucket=BUCKET, Key=team_b)["Body"].read() == b"x"
    assert denied(other.get_object, Bucket=BUCKET, Key=own + "export/model.gguf") == "AccessDenied"


def test_trainer_store_works_on_the_mounted_file_and_follows_a_renewal(
    minio: MinIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's S3Store (checkpoint upload, listing for resume, download) on credentials read
    from the file the operator's Secret becomes; a new file (the kubelet's update after a renewal)
    is what its next request signs with."""
    from finetune_trainer import storage

    path = tmp_path / CREDENTIALS_KEY
    first = issue(minio, ftj())
    path.write_text(json.dumps(first.document()))
    monkeypatch.setenv(storage.CREDENTIALS_FILE_ENV, str(path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    storage._shared_session.cache_clear()
    try:
        store = storage.S3Store(
            f"s3://{BUCKET}/finetune/team-a/a1", endpoint=minio.endpoint_url, region="us-east-1"
        )
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "adapter.safetensors").write_bytes(b"w" * 4096)
        store.put_file("checkpoints/step-10/adapter.safetensors", ckpt / "adapter.safetensors")
        assert [o.key for o in store.list("checkpoints/")] == ["checkpoints/step-10/adapter.safetensors"]
        assert store.get_bytes("checkpoints/step-10/adapter.safetensors") == b"w" * 4096

        signer = store._client._request_signer
        assert signer._credentials.get_frozen_credentials().access_key == first.access_key_id
        renewed = issue(minio, ftj())
        assert renewed.access_key_id != first.access_key_id
        path.write_text(json.dumps(renewed.document()))
        store.put_file("checkpoints/step-20/adapter.safetensors", ckpt / "adapter.safetensors")
        assert signer._credentials.get_frozen_credentials().access_key == renewed.access_key_id

        foreign = storage.S3Store(
            f"s3://{BUCKET}/finetune/team-b/b1", endpoint=minio.endpoint_url, region="us-east-1"
        )
        with pytest.raises(storage.StorageError, match="AccessDenied"):
            foreign.put_file("export/adapter.safetensors", ckpt / "adapter.safetensors")
    finally:
        storage._shared_session.cache_clear()


def job_on_cluster(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    """A FineTuneJob created on the API server (no operator runs): its uid is the server's."""
    install_crd(cluster)  # waits for Established, which `kubectl wait` does not on a loaded machine
    job = ftj(namespace, name)
    job["metadata"].pop("uid")
    cluster.apply(job)
    return cluster.get("finetunejob", name, namespace)


@pytest.mark.cluster
def test_operator_writes_an_owned_secret_renews_it_and_it_goes_with_the_job(
    minio: MinIO, cluster: Any
) -> None:
    """StorageCredentials on the real API server: the Secret carries the ownerReference and the
    expiry, holds working scoped credentials, is renewed inside renewBeforeSeconds, and the
    garbage collector deletes it with the FineTuneJob."""
    from finetune_operator.kube import Kube

    namespace = cluster.new_namespace("sts")
    job = job_on_cluster(cluster, namespace, "a1")

    clock = [datetime.now(UTC)]
    kube = Kube(cluster.api_client())
    issuer = StorageCredentials(CFG, kube, minio.client("sts"), now=lambda: clock[0])
    uri = resolved_storage(job, CFG)["uri"]

    def secret() -> dict[str, Any]:
        return cluster.get("secret", secret_name("a1"), namespace)

    def held() -> dict[str, Any]:
        return json.loads(base64.b64decode(secret()["data"][CREDENTIALS_KEY]))

    expires = asyncio.run(issuer.ensure(job, uri))
    meta = secret()["metadata"]
    assert meta["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert meta["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert meta["annotations"][ANNOTATION_EXPIRES] == expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    first = held()
    s3 = minio.client(
        access_key=first["AccessKeyId"],
        secret_key=first["SecretAccessKey"],
        session_token=first["SessionToken"],
    )
    s3.put_object(Bucket=BUCKET, Key=f"finetune/{namespace}/a1/ok", Body=b"1")
    assert denied(s3.put_object, Bucket=BUCKET, Key="finetune/team-b/b1/x", Body=b"1") == "AccessDenied"

    # Outside the renewal window nothing is issued; inside it, new credentials replace the old.
    assert asyncio.run(issuer.ensure(job, uri)) == expires
    assert held()["AccessKeyId"] == first["AccessKeyId"]
    clock[0] = expires - timedelta(seconds=CFG.storage.sts.renew_before_seconds - 1)
    renewed_until = asyncio.run(issuer.ensure(job, uri))
    assert held()["AccessKeyId"] != first["AccessKeyId"]
    assert secret()["metadata"]["annotations"][ANNOTATION_EXPIRES] == renewed_until.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )

    cluster.kubectl("delete", "finetunejob", "a1", "-n", namespace, "--wait=true")
    cluster.kubectl(
        "wait", "--for=delete", f"secret/{secret_name('a1')}", "-n", namespace, "--timeout=60s", check=False
    )
    out = cluster.kubectl("get", "secrets", "-n", namespace, "-o", "name")
    assert secret_name("a1") not in str(out)


@pytest.mark.cluster
def test_sts_refused_or_unreachable_is_said_naming_storage_sts_and_the_code_and_writes_no_secret(
    minio: MinIO, cluster: Any, tmp_path: Path
) -> None:
    """AssumeRole refused by the real MinIO (the operator's keys are not a user of it) and MinIO
    stopped: a CredentialsError with the reason status shows, naming storage.sts and what the
    server or the SDK said, never a key; one run of failures keeps its first time (the grace is
    counted from it); no Secret is written, so no Job could mount one."""
    from finetune_operator.kube import Kube

    namespace = cluster.new_namespace("sts-fail")
    job = job_on_cluster(cluster, namespace, "a1")
    uri = resolved_storage(job, CFG)["uri"]
    kube = Kube(cluster.api_client())
    clock = [datetime.now(UTC)]
    wrong_key = secrets.token_hex(16)
    refused = StorageCredentials(
        CFG, kube, minio.client("sts", access_key="not-a-user", secret_key=wrong_key), now=lambda: clock[0]
    )

    with pytest.raises(CredentialsError) as first:
        asyncio.run(refused.ensure(job, uri))
    error = first.value
    assert error.reason == REASON_FAILED and error.since == clock[0]
    assert error.message.startswith(f"storage.sts: AssumeRole of {MINIO_ROLE_ARN} at ")
    assert "(AccessDenied: The Access Key Id you provided does not exist in our records.)" in error.message
    assert wrong_key not in error.message and minio.root_password not in error.message
    started = clock[0]
    clock[0] += timedelta(seconds=45)
    with pytest.raises(CredentialsError) as again:
        asyncio.run(refused.ensure(job, uri))
    assert again.value.since == started
    # What status makes of it: Pending within the grace, Failed once it has lasted that long.
    assert credentials_status(job, again.value, clock[0], grace=60)["phase"] == "Pending"
    assert credentials_status(job, again.value, clock[0], grace=45)["phase"] == "Failed"

    stopped = start_minio(tmp_path, buckets=())
    gone = stopped.client("sts")
    stopped.stop()
    with pytest.raises(CredentialsError) as down:
        asyncio.run(StorageCredentials(CFG, kube, gone).ensure(job, uri))
    assert down.value.reason == REASON_FAILED
    assert "EndpointConnectionError: Could not connect to the endpoint URL" in down.value.message
    assert stopped.root_password not in down.value.message

    assert cluster.kubectl("get", "secret", secret_name("a1"), "-n", namespace, check=False).returncode != 0


@pytest.mark.cluster
def test_a_secret_the_job_does_not_own_is_never_overwritten_nor_deleted(minio: MinIO, cluster: Any) -> None:
    """A `<job>-storage` Secret made by a tenant (keys of their choosing) or owned by another
    FineTuneJob: the operator's write is refused by the API server's answer to the ownership test,
    the Secret keeps its keys and its owners, and the job's removal leaves it; once it is gone the
    job's own Secret is written, renewed through the same test, and removed."""
    from finetune_operator.kube import Kube

    namespace = cluster.new_namespace("sts-foreign")
    job = job_on_cluster(cluster, namespace, "a2")
    other = job_on_cluster(cluster, namespace, "a3")
    uri = resolved_storage(job, CFG)["uri"]
    name = secret_name("a2")
    clock = [datetime.now(UTC)]
    issuer = StorageCredentials(CFG, Kube(cluster.api_client()), minio.client("sts"), now=lambda: clock[0])
    planted = {CREDENTIALS_KEY: base64.b64encode(b'{"Version":1,"AccessKeyId":"tenant-key"}').decode()}

    for owners in ([], [owner_reference(other)]):
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace, "ownerReferences": owners},
                "data": planted,
            }
        )
        with pytest.raises(CredentialsError) as refused:
            asyncio.run(issuer.ensure(job, uri))
        assert refused.value.reason == REASON_NOT_OWNED, refused.value.message
        assert refused.value.message.startswith(
            f"Secret {name} exists in namespace {namespace} and is not owned by this FineTuneJob"
        )
        kept = cluster.get("secret", name, namespace)
        assert kept["data"] == planted
        assert kept["metadata"].get("ownerReferences", []) == owners
        assert ANNOTATION_EXPIRES not in (kept["metadata"].get("annotations") or {})

        asyncio.run(issuer.remove(job))  # the job finished: its own Secret would go, this one stays
        assert cluster.get("secret", name, namespace)["data"] == planted
        issuer.forget(namespace, "a2")
        cluster.kubectl("delete", "secret", name, "-n", namespace)

    expires = asyncio.run(issuer.ensure(job, uri))
    secret = cluster.get("secret", name, namespace)
    assert secret["metadata"]["ownerReferences"] == [owner_reference(job)]
    first = json.loads(base64.b64decode(secret["data"][CREDENTIALS_KEY]))["AccessKeyId"]
    clock[0] = expires - timedelta(seconds=CFG.storage.sts.renew_before_seconds)
    asyncio.run(issuer.ensure(job, uri))
    renewed = cluster.get("secret", name, namespace)
    assert json.loads(base64.b64decode(renewed["data"][CREDENTIALS_KEY]))["AccessKeyId"] != first
    asyncio.run(issuer.remove(job))
    assert cluster.kubectl("get", "secret", name, "-n", namespace, check=False).returncode != 0
