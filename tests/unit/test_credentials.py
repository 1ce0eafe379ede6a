"""Scoped storage credentials (storage.sts): the session policy, the per-job Secret, renewal timing,
the Job that mounts them, the trainer's re-reading of the mounted file, and what a failure says.
The policy's effect on a real server, and the API server's answer to the ownership test, are
tests/integration/test_sts_scoped.py."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from finetune_operator.config import ConfigFileError, OperatorConfig, load_config
from finetune_operator.credentials import (
    ANNOTATION_EXPIRES,
    CREDENTIALS_KEY,
    ENV_CREDENTIALS_FILE,
    MOUNT_DIR,
    REASON_FAILED,
    REASON_NOT_OWNED,
    Issued,
    assume_role_failed,
    ownership_test,
    patch_did_not_apply,
    readable_prefixes,
    removal_due,
    renewal_due,
    renewal_patch,
    secret_manifest,
    secret_name,
    secret_not_owned,
    session_policy,
)
from finetune_operator.jobbuilder import build_job, secret_fields, trainer_manifest
from finetune_operator.kube import ApiError
from finetune_trainer.storage import FileCredentialProvider

STS = OperatorConfig.model_validate(
    {
        "storage": {
            "uri": "s3://mlb/finetune",
            "endpoint": "http://minio:9000",
            "sts": {"enabled": True, "durationSeconds": 3600, "renewBeforeSeconds": 900},
        },
        "policy": {
            "modelPrefixes": ["s3://mlb/base-models/"],
            "dataPrefixes": ["s3://datasets/public"],
            "credentialsSecrets": ["team-own-s3"],
            "namespaces": {"team-a": {"dataPrefixes": ["s3://mlb/base-models/", "s3://mlb/team-a-data"]}},
        },
    }
)


def ftj(name: str = "a1", namespace: str = "team-a", **storage: object) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 1},
        "spec": {
            "model": {"hub": "unsloth/Qwen3-8B"},
            "data": {"hub": "org/data"},
            **({"storage": storage} if storage else {}),
        },
    }


def statements(policy: dict) -> dict[str, dict]:
    return {s["Sid"]: s for s in policy["Statement"]}


def test_session_policy_grants_own_prefix_read_write_and_listed_prefixes_read_only() -> None:
    policy = session_policy(
        "s3://mlb/finetune/team-a/a1", ["s3://mlb/finetune/team-a/", "s3://mlb/base-models/"]
    )
    by_sid = statements(policy)
    assert policy["Version"] == "2012-10-17"
    assert by_sid["JobPrefixReadWrite"]["Resource"] == ["arn:aws:s3:::mlb/finetune/team-a/a1/*"]
    assert "s3:PutObject" in by_sid["JobPrefixReadWrite"]["Action"]
    assert by_sid["ReadOnly"] == {
        "Sid": "ReadOnly",
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": ["arn:aws:s3:::mlb/finetune/team-a/*", "arn:aws:s3:::mlb/base-models/*"],
    }
    assert by_sid["List0"]["Resource"] == ["arn:aws:s3:::mlb"]
    assert by_sid["List0"]["Condition"] == {
        "StringLike": {
            "s3:prefix": [
                "base-models/",
                "base-models/*",
                "finetune/team-a/",
                "finetune/team-a/*",
                "finetune/team-a/a1/",
                "finetune/team-a/a1/*",
            ]
        }
    }
    # Nothing but these: no bucket-wide action, no Deny needed (a session policy only narrows).
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
        "s3:ListBucket",
    }
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])


def test_prefixes_end_at_a_slash_so_a_namesake_with_a_longer_name_is_not_reached() -> None:
    policy = session_policy("s3://mlb/finetune/team-a/a1", [])
    resources = [r for s in policy["Statement"] for r in s["Resource"]]
    patterns = statements(policy)["List0"]["Condition"]["StringLike"]["s3:prefix"]
    # `a1*` would match team-a/a10/...; `a1/*` does not.
    assert "arn:aws:s3:::mlb/finetune/team-a/a1/*" in resources
    assert not any(
        p.startswith("finetune/team-a/a1") and not p.startswith("finetune/team-a/a1/") for p in patterns
    )
    assert "ReadOnly" not in statements(policy)


def test_other_buckets_get_their_own_list_statement_and_a_whole_bucket_prefix_lists_everything() -> None:
    policy = session_policy("s3://mlb/finetune/team-a/a1", ["s3://datasets/public", "s3://shared"])
    lists = [s for s in policy["Statement"] if s["Action"] == ["s3:ListBucket"]]
    assert [(s["Resource"], s["Condition"]["StringLike"]["s3:prefix"]) for s in lists] == [
        (["arn:aws:s3:::mlb"], ["finetune/team-a/a1/", "finetune/team-a/a1/*"]),
        (["arn:aws:s3:::datasets"], ["public/", "public/*"]),
        (["arn:aws:s3:::shared"], ["*"]),
    ]
    assert statements(policy)["ReadOnly"]["Resource"] == [
        "arn:aws:s3:::datasets/public/*",
        "arn:aws:s3:::shared/*",
    ]


@pytest.mark.parametrize(
    "uri", ["s3://mlb/base-*", "s3://mlb/a?b", "s3://mlb/${aws:username}", "https://ml/x"]
)
def test_wildcards_and_non_s3_uris_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match=r"scoped prefix|expected s3://"):
        session_policy("s3://mlb/finetune/team-a/a1", [uri])


def test_readable_prefixes_are_the_namespace_prefix_and_its_allowances_once_each() -> None:
    assert readable_prefixes("team-a", STS) == [
        "s3://mlb/finetune/team-a/",
        "s3://mlb/base-models/",
        "s3://datasets/public",
        "s3://mlb/team-a-data",
    ]
    assert readable_prefixes("team-b", STS) == [
        "s3://mlb/finetune/team-b/",
        "s3://mlb/base-models/",
        "s3://datasets/public",
    ]


def test_a_finished_jobs_secret_is_deleted_only_while_what_it_holds_may_still_be_valid() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert removal_due(None, now, 3600)  # no completionTime known: delete
    assert removal_due(now - timedelta(seconds=3599), now, 3600)
    assert not removal_due(now - timedelta(seconds=3600), now, 3600)  # expired; goes with the job


def test_renewal_due_when_unknown_or_within_the_window() -> None:
    now = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert renewal_due(None, now, 900)
    assert renewal_due(now + timedelta(seconds=900), now, 900)
    assert renewal_due(now - timedelta(seconds=1), now, 900)
    assert not renewal_due(now + timedelta(seconds=901), now, 900)


def test_secret_is_owned_by_the_job_and_carries_its_expiry() -> None:
    expires = datetime(2026, 12, 3, 10, 0, 5, tzinfo=UTC)
    secret = secret_manifest(ftj(), Issued("AKIA1", "secret1", "token1", expires))
    meta = secret["metadata"]
    assert meta["name"] == secret_name("a1") == "a1-storage"
    assert meta["namespace"] == "team-a"
    assert meta["annotations"] == {ANNOTATION_EXPIRES: "2026-12-03T10:00:05Z"}
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "a1",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert json.loads(base64.b64decode(secret["data"][CREDENTIALS_KEY])) == {
        "Version": 1,
        "AccessKeyId": "AKIA1",
        "SecretAccessKey": "secret1",
        "SessionToken": "token1",
        "Expiration": "2026-12-03T10:00:05Z",
    }


def test_job_mounts_the_per_job_secret_and_names_no_credential() -> None:
    job = build_job(ftj(), STS)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env[ENV_CREDENTIALS_FILE] == {
        "name": ENV_CREDENTIALS_FILE,
        "value": f"{MOUNT_DIR}/{CREDENTIALS_KEY}",
    }
    assert not [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    volume = next(v for v in pod["volumes"] if v["name"] == "storage")
    assert volume["secret"]["secretName"] == "a1-storage"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "storage")
    assert mount == {"name": "storage", "mountPath": MOUNT_DIR, "readOnly": True}  # whole, not subPath
    assert "AKIA" not in json.dumps(job)
    assert "credentialsSecret" not in trainer_manifest(ftj(), STS)["spec"]["storage"]
    assert secret_fields(ftj(), STS) == {"a1-storage": "the operator's scoped storage credentials"}


def test_a_job_naming_an_allowed_secret_of_its_own_keeps_it() -> None:
    job = build_job(ftj(credentialsSecret="team-own-s3"), STS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs == {
        "AWS_ACCESS_KEY_ID": "team-own-s3",
        "AWS_SECRET_ACCESS_KEY": "team-own-s3",
        "AWS_SESSION_TOKEN": "team-own-s3",
    }
    assert not [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "storage"]


def test_without_sts_the_namespace_secret_is_used_as_before() -> None:
    cfg = OperatorConfig.model_validate({"storage": {"uri": "s3://mlb/finetune"}})
    container = build_job(ftj(), cfg)["spec"]["template"]["spec"]["containers"][0]
    assert {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    } == {"finetune-s3"}
    assert ENV_CREDENTIALS_FILE not in {e["name"] for e in container["env"]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"storage": {"sts": {"enabled": True}}}, "storage.sts.enabled needs storage.uri"),
        (
            {"storage": {"uri": "s3://b/p", "sts": {"durationSeconds": 900, "renewBeforeSeconds": 900}}},
            "renewBeforeSeconds \\(900\\) must be less than durationSeconds",
        ),
        (
            {
                "resyncSeconds": 300,
                "storage": {"uri": "s3://b/p", "sts": {"enabled": True, "renewBeforeSeconds": 200}},
            },
            "must exceed resyncSeconds",
        ),
        ({"storage": {"sts": {"durationSeconds": 600}}}, "storage.sts.durationSeconds"),
    ],
)
def test_config_refuses_sts_settings_that_cannot_work(tmp_path: Path, doc: dict, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigFileError, match=message):
        load_config(path)


def test_trainer_rereads_the_credentials_file_once_they_near_expiry(tmp_path: Path) -> None:
    path = tmp_path / CREDENTIALS_KEY

    def write(key: str, expires_in: float) -> None:
        expires = datetime.now(UTC) + timedelta(seconds=expires_in)
        path.write_text(json.dumps(Issued(key, "s", "t", expires).document()))

    write("FAR", 3600)
    creds = FileCredentialProvider(str(path)).load()
    write("NEXT", 3600)
    # An hour left: botocore keeps what it has (no read per request).
    assert creds.get_frozen_credentials().access_key == "FAR"

    write("NEAR", 600)
    near = FileCredentialProvider(str(path)).load()
    write("RENEWED", 3600)  # the kubelet's update of the mounted Secret
    assert near.get_frozen_credentials().access_key == "RENEWED"
    assert near.get_frozen_credentials().token == "t"


def test_an_sts_refusal_is_said_with_storage_sts_the_role_and_the_servers_code_never_a_key() -> None:
    refused = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied."}, "ResponseMetadata": {}},
        "AssumeRole",
    )
    sts = STS.storage.sts.model_copy(update={"role_arn": "arn:aws:iam::1:role/finetune"})
    error = assume_role_failed(refused, sts, "http://minio:9000")
    assert error.reason == REASON_FAILED
    assert error.message.startswith(
        "storage.sts: AssumeRole of arn:aws:iam::1:role/finetune at http://minio:9000"
    )
    assert "(AccessDenied: Access Denied.)" in error.message
    # Unreachable: the SDK's own words; without a role MinIO's placeholder, without an endpoint AWS.
    down = assume_role_failed(
        EndpointConnectionError(endpoint_url="http://minio:9000/"), STS.storage.sts, None
    )
    assert "EndpointConnectionError: Could not connect to the endpoint URL" in down.message
    assert "arn:minio:iam:::role/finetune-operator at AWS STS" in down.message


def test_a_secret_the_job_does_not_control_is_named_with_why_it_is_left_alone() -> None:
    error = secret_not_owned("team-a", "a1-storage")
    assert error.reason == REASON_NOT_OWNED
    assert error.message.startswith("Secret a1-storage exists in namespace team-a and is not owned by this")
    assert "neither overwrites nor mounts it" in error.message


def test_a_renewal_patch_tests_the_jobs_controller_reference_before_it_writes() -> None:
    expires = datetime(2026, 12, 3, 10, 0, 5, tzinfo=UTC)
    secret = secret_manifest(ftj(), Issued("AKIA1", "secret1", "token1", expires))
    ops = renewal_patch(secret, "uid-1")
    # Tests first: the API server applies none of it unless both hold (JSON patch is atomic).
    assert (
        ops[:2]
        == ownership_test("uid-1")
        == [
            {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": "uid-1"},
            {"op": "test", "path": "/metadata/ownerReferences/0/controller", "value": True},
        ]
    )
    assert ops[2:] == [
        {"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION_EXPIRES: "2026-12-03T10:00:05Z"}},
        {"op": "add", "path": "/metadata/labels", "value": secret["metadata"]["labels"]},
        {"op": "add", "path": "/data", "value": secret["data"]},
    ]
    assert not any("ownerReferences" in op["path"] for op in ops[2:])  # the owner is never rewritten


def test_only_a_patch_that_did_not_apply_counts_as_a_failed_ownership_test() -> None:
    # The body Kubernetes 1.34 sends when a `test` fails (tests/integration/test_sts_scoped.py).
    failed_test = {
        "kind": "Status",
        "status": "Failure",
        "reason": "Invalid",
        "details": {},
        "code": 422,
        "message": "the server rejected our request due to an error in our request",
    }
    causes = [{"field": "metadata.annotations", "reason": "FieldValueInvalid"}]
    invalid = {**failed_test, "message": 'Secret "a1-storage" is invalid', "details": {"causes": causes}}
    assert patch_did_not_apply(ApiError(422, "PATCH", failed_test))
    assert not patch_did_not_apply(ApiError(422, "PATCH", invalid))
    assert not patch_did_not_apply(ApiError(403, "PATCH", {**failed_test, "reason": "Forbidden"}))
