"""Scoped, short-lived storage credentials for each job: STS AssumeRole with an inline session policy.

Why: with a namespace's `finetune-s3` Secret every pod of the namespace holds the same keys, and
those reach whatever the bucket lets them reach, whichever prefix the job was allowed to name. With
`storage.sts.enabled` the platform's credentials stay with the operator (its own namespace); for
each job the operator asks STS for credentials narrowed by a session policy to what admission lets
that job touch: read/write under its own prefix `<storage.uri>/<namespace>/<name>/`, read-only
under the namespace's prefix and the platform's model, data and listed storage prefixes
(`readable_prefixes`, the same lists finetune_operator.admission checks). A session's rights are
the intersection of the caller's (AWS: the role's) and the session policy, so it can only narrow.

They reach the pod as a file in a Secret volume (never in the Job spec), which the trainer re-reads
before they expire (finetune_trainer.storage); the kubelet updates a mounted Secret's files in place,
so a renewal reaches a running pod. The Secret has the FineTuneJob as its owner, so it goes with the
job; the credentials themselves cannot be revoked one by one: they expire.

The operator never reads a Secret (RBAC's `get` on Secrets would be every tenant Secret's values):
it remembers each job's expiry in memory, and after a restart or a leader change issues fresh
credentials once per running job. The expiry is also an annotation on the Secret, for people and
for checks. A Secret of that name that the job does not control (made by a tenant to feed the pod
keys of their choosing, or owned by another object) is never overwritten, deleted or mounted: a
JSON patch whose `test` operations require the job's controller ownerReference is refused by the
API server before it changes anything (`ownership_test`).

What fails (STS refusing or unreachable, the Secret not written, a Secret not the job's) is raised
as a CredentialsError with a status reason and a message that names `storage.sts` or the Secret and
the server's error code, never a key or a token; the reconcile shows it and retries
(status.credentials_status).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from finetune_trainer.timestamps import rfc3339

from finetune_operator.admission import namespace_prefix
from finetune_operator.api import API_GROUP
from finetune_operator.config import OperatorConfig, StsSettings
from finetune_operator.kube import ApiError, ConflictError, Kube, NotFoundError
from finetune_operator.naming import job_labels, job_name, owner_reference, short_name

log = logging.getLogger(__name__)

SECRET_SUFFIX = "-storage"
"""The per-job Secret is `<Job name>-storage` (the chart's Job policy allows exactly that volume)."""
CREDENTIALS_KEY = "credentials.json"
"""Key of the Secret, and file name in the pod: the `credential_process` JSON format (Version 1,
AccessKeyId, SecretAccessKey, SessionToken, Expiration), which any AWS SDK can also read through
`credential_process = cat <file>`."""
MOUNT_DIR = "/etc/finetune-storage"
ENV_CREDENTIALS_FILE = "FINETUNE_S3_CREDENTIALS_FILE"
"""Tells the trainer to take its S3 credentials from this file, re-read before they expire."""
ANNOTATION_EXPIRES = f"{API_GROUP}/credentials-expire-at"
MINIO_ROLE_ARN = "arn:minio:iam:::role/finetune-operator"
"""Sent when `storage.sts.roleArn` is unset: the STS API requires one, MinIO ignores it."""

REASON_FAILED = "StorageCredentialsFailed"
"""Status reason: STS did not issue the job's credentials, or their Secret could not be written."""
REASON_NOT_OWNED = "StorageSecretNotOwned"
"""Status reason: a Secret with the job's credentials Secret name exists and the job does not own it."""
ERROR_LIMIT = 300
"""Characters of a server's error message kept in a status message."""

OWN_PREFIX_ACTIONS = (
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
)
"""What a trainer does under its own prefix: checkpoints and exports (multipart), resume, pruning."""


def uses_sts(own_secret: str | None, cfg: OperatorConfig) -> bool:
    """Whether a job gets scoped credentials: STS is on and the job names no credentials Secret of
    its own (a team's private bucket, allowed by `policy.credentialsSecrets`)."""
    return cfg.storage.sts.enabled and not own_secret


def secret_name(ftj_name: str) -> str:
    """Name of the job's credentials Secret."""
    return f"{job_name(ftj_name)}{SECRET_SUFFIX}"


def readable_prefixes(namespace: str, cfg: OperatorConfig) -> list[str]:
    """`s3://` prefixes a job of `namespace` may read: its namespace's own (earlier jobs' outputs)
    and the platform's listed storage, model and data prefixes, as admission allows them."""
    allowed = cfg.policy.for_namespace(namespace)
    own = namespace_prefix(cfg, namespace)
    found = [*([own] if own else []), *allowed.storage_uris, *allowed.model_prefixes, *allowed.data_prefixes]
    return list(dict.fromkeys(found))


def _split(uri: str) -> tuple[str, str]:
    # Not urlparse: S3 keys may hold '?' and '#', which it would cut off as query and fragment.
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ValueError(f"expected s3://bucket[/prefix], got {uri!r}")
    key = key.strip("/")
    if any(c in key for c in "*?$"):
        # These are wildcards and variables in a policy: the prefix would grant more than it says.
        raise ValueError(f"{uri!r}: '*', '?' and '$' cannot be used in a scoped prefix")
    return bucket, key


def session_policy(job_uri: str, read_uris: Sequence[str]) -> dict[str, Any]:
    """The inline session policy for a job storing under `job_uri` (`s3://bucket/prefix/ns/name`)
    that may read under each of `read_uris`: object read/write under the job's prefix, object
    read under the others, and ListBucket on each bucket only for those prefixes (an `s3:prefix`
    condition), nothing else. Prefixes end at a `/`, so `ns/a1` does not reach `ns/a10`."""
    bucket, key = _split(job_uri)
    own = f"{key}/" if key else ""
    reads: dict[str, list[str]] = {}
    for uri in read_uris:
        b, k = _split(uri)
        reads.setdefault(b, []).append(f"{k}/" if k else "")
    statements: list[dict[str, Any]] = [
        {
            "Sid": "JobPrefixReadWrite",
            "Effect": "Allow",
            "Action": list(OWN_PREFIX_ACTIONS),
            "Resource": [f"arn:aws:s3:::{bucket}/{own}*"],
        }
    ]
    if reads:
        statements.append(
            {
                "Sid": "ReadOnly",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{b}/{p}*" for b, prefixes in reads.items() for p in prefixes],
            }
        )
    listed: dict[str, list[str]] = {bucket: [own]}
    for b, prefixes in reads.items():
        listed.setdefault(b, []).extend(prefixes)
    for i, (b, prefixes) in enumerate(listed.items()):
        patterns = sorted({pattern for p in prefixes for pattern in ((p, f"{p}*") if p else ("*",))})
        statements.append(
            {
                "Sid": f"List{i}",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{b}"],
                "Condition": {"StringLike": {"s3:prefix": patterns}},
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


class CredentialsError(Exception):
    """Why a job's credentials cannot reach it: a status `reason` and a `message` that names what to
    fix, never a key or a token. `since`: when this process first failed so for the job (in memory:
    after a restart the grace period starts again, it never ends early)."""

    def __init__(self, reason: str, message: str, since: datetime | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.since = since


def sts_error_text(error: Exception) -> str:
    """What STS (or the SDK on the way) answered, for status: the error code and message of a
    refusal, else the exception's kind and text (an unreachable endpoint, no operator credentials).
    Neither carries a secret: STS never echoes keys, tokens or the signature."""
    if isinstance(error, ClientError):
        err = error.response.get("Error") or {}
        text = f"{err.get('Code') or 'Error'}: {err.get('Message') or 'no message'}"
    else:
        text = f"{type(error).__name__}: {error}"
    return text[:ERROR_LIMIT]


def assume_role_failed(error: Exception, sts: StsSettings, endpoint: str | None) -> CredentialsError:
    """The CredentialsError for a failed AssumeRole: names the operator's config and what STS said."""
    role = sts.role_arn or MINIO_ROLE_ARN
    where = endpoint or "AWS STS"
    return CredentialsError(
        REASON_FAILED,
        f"storage.sts: AssumeRole of {role} at {where} failed ({sts_error_text(error)}); the platform "
        "team checks the operator's storage.sts settings, its storage credentials and the STS endpoint",
    )


def secret_not_owned(namespace: str, name: str) -> CredentialsError:
    """The CredentialsError for a credentials Secret name taken by a Secret the job does not own."""
    return CredentialsError(
        REASON_NOT_OWNED,
        f"Secret {name} exists in namespace {namespace} and is not owned by this FineTuneJob (no "
        "controller ownerReference with its uid): someone created it under the name of the job's "
        "credentials Secret, which would choose the keys the job's pod uses, or another object owns "
        "it; the operator neither overwrites nor mounts it; delete it",
    )


@dataclass(frozen=True)
class Issued:
    """Temporary credentials from STS."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime

    def document(self) -> dict[str, Any]:
        """The `credential_process` JSON the pod reads."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": rfc3339(self.expiration),
        }


def renewal_due(expires: datetime | None, now: datetime, renew_before_seconds: float) -> bool:
    """Whether to (re)issue: none known (a new job, or this operator started since), or they
    expire within `renew_before_seconds`."""
    return expires is None or expires - now <= timedelta(seconds=renew_before_seconds)


def removal_due(completed: datetime | None, now: datetime, duration_seconds: float) -> bool:
    """Whether a finished job's Secret is still worth a DELETE: unless the job finished longer ago
    than a credential lifetime, since what the Secret holds has expired by then (and the Secret
    goes with the FineTuneJob). Spares a restarted operator one DELETE per long-finished job."""
    return completed is None or now - completed < timedelta(seconds=duration_seconds)


def secret_manifest(ftj: dict[str, Any], issued: Issued) -> dict[str, Any]:
    """The job's credentials Secret: owned by the FineTuneJob (deleted with it), labelled like the
    job's Job, its expiry as an annotation."""
    meta = ftj["metadata"]
    body = json.dumps(issued.document(), separators=(",", ":"))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": job_labels(meta["name"]),
            "annotations": {ANNOTATION_EXPIRES: rfc3339(issued.expiration)},
            "ownerReferences": [owner_reference(ftj)],
        },
        "data": {CREDENTIALS_KEY: base64.b64encode(body.encode()).decode()},
    }


def ownership_test(uid: str) -> list[dict[str, Any]]:
    """JSON patch `test` operations that hold only for a Secret whose first ownerReference is the
    FineTuneJob `uid` as controller (as secret_manifest writes it): the API server refuses the
    whole patch (422) otherwise, before changing anything."""
    return [
        {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": uid},
        {"op": "test", "path": "/metadata/ownerReferences/0/controller", "value": True},
    ]


def renewal_patch(secret: dict[str, Any], uid: str) -> list[dict[str, Any]]:
    """A JSON patch putting `secret`'s credentials and expiry into the existing Secret, only if the
    FineTuneJob `uid` controls it (ownership_test)."""
    meta = secret["metadata"]
    return [
        *ownership_test(uid),
        {"op": "add", "path": "/metadata/annotations", "value": meta["annotations"]},
        {"op": "add", "path": "/metadata/labels", "value": meta["labels"]},
        {"op": "add", "path": "/data", "value": secret["data"]},
    ]


def patch_did_not_apply(error: ApiError) -> bool:
    """Whether the API server refused a JSON patch because an operation did not apply (a `test`
    that failed, a path that is not there): 422 Invalid with no field causes (Kubernetes 1.34 says
    only "the server rejected our request due to an error in our request"), unlike a patched object
    that fails validation (422 naming the fields). renewal_patch's other operations always apply,
    so for it this means the ownership test failed."""
    details = error.body.get("details") or {}
    return error.status == 422 and error.body.get("reason") == "Invalid" and not details.get("causes")


def session_name(namespace: str, name: str) -> str:
    """RoleSessionName (at most 64 characters), seen in the storage server's audit log."""
    return short_name(f"{namespace}.{name}", 64)


def assume_role(sts_client: Any, policy: dict[str, Any], sts: StsSettings, session: str) -> Issued:
    """One AssumeRole call (blocking)."""
    answer = sts_client.assume_role(
        RoleArn=sts.role_arn or MINIO_ROLE_ARN,
        RoleSessionName=session,
        Policy=json.dumps(policy, separators=(",", ":")),
        DurationSeconds=sts.duration_seconds,
    )
    creds = answer["Credentials"]
    return Issued(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"], creds["Expiration"])


def sts_client(cfg: OperatorConfig) -> Any:
    """A boto3 STS client at the storage endpoint (MinIO serves STS there; AWS's regional STS when
    no endpoint is set), with the operator's own credentials from the default chain."""
    return boto3.client(
        "sts", endpoint_url=cfg.storage.endpoint, region_name=cfg.storage.region or "us-east-1"
    )


Key = tuple[str, str]


class StorageCredentials:
    """Issues and renews each job's credentials Secret; remembers expiries in memory only."""

    def __init__(
        self,
        cfg: OperatorConfig,
        kube: Kube,
        client: Any = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.cfg = cfg
        self.kube = kube
        self._client = client
        self._now = now
        self._expires: dict[Key, tuple[str, datetime]] = {}
        """(namespace, name) -> (FineTuneJob uid, expiry) of the Secret this process wrote."""
        self._removed: dict[Key, str] = {}
        """(namespace, name) -> uid of the finished job whose Secret this process deleted."""
        self._failing: dict[Key, tuple[str, datetime]] = {}
        """(namespace, name) -> (FineTuneJob uid, first failure) while issuing keeps failing."""

    def expires(self, namespace: str, name: str, uid: str) -> datetime | None:
        known = self._expires.get((namespace, name))
        return known[1] if known and known[0] == uid else None

    async def ensure(self, ftj: dict[str, Any], job_uri: str) -> datetime:
        """Make sure the job's Secret holds credentials valid beyond renewBeforeSeconds, issuing new
        ones if not; returns their expiry. Raises CredentialsError (since: the first of this run of
        failures) for what the status shows; other errors (the API server unreachable) as they are."""
        meta = ftj["metadata"]
        key, uid = (meta["namespace"], meta["name"]), meta["uid"]
        try:
            expires = await self._ensure(ftj, job_uri)
        except CredentialsError as e:
            first = self._failing.get(key)
            since = first[1] if first is not None and first[0] == uid else self._now()
            self._failing[key] = (uid, since)
            raise CredentialsError(e.reason, e.message, since) from e.__cause__
        self._failing.pop(key, None)
        return expires

    async def _ensure(self, ftj: dict[str, Any], job_uri: str) -> datetime:
        meta = ftj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        sts = self.cfg.storage.sts
        known = self.expires(namespace, name, uid)
        if known is not None and not renewal_due(known, self._now(), sts.renew_before_seconds):
            return known
        if self._client is None:
            self._client = sts_client(self.cfg)
        policy = session_policy(job_uri, readable_prefixes(namespace, self.cfg))
        try:
            issued = await asyncio.to_thread(
                assume_role, self._client, policy, sts, session_name(namespace, name)
            )
        except (BotoCoreError, ClientError) as e:
            raise assume_role_failed(e, sts, self.cfg.storage.endpoint) from e
        await self._write(namespace, uid, secret_manifest(ftj, issued))
        self._expires[(namespace, name)] = (uid, issued.expiration)
        log.info(
            "%s storage credentials for %s/%s, valid until %s",
            "renewed" if known else "issued",
            namespace,
            name,
            rfc3339(issued.expiration),
        )
        return issued.expiration

    async def _write(self, namespace: str, uid: str, secret: dict[str, Any]) -> None:
        name = secret["metadata"]["name"]
        try:
            try:
                await self.kube.create_secret(namespace, secret)
            except ConflictError:
                # Ours from before (a renewal, or a restart), or a namesake: patched only if the job
                # controls it, without reading it.
                await self.kube.patch_secret(namespace, name, renewal_patch(secret, uid))
        except ApiError as e:
            if patch_did_not_apply(e):
                raise secret_not_owned(namespace, name) from e
            why = f"{e.status} {e.body.get('reason') or ''}: {e.body.get('message') or ''}"[:ERROR_LIMIT]
            raise CredentialsError(
                REASON_FAILED,
                f"storage.sts: the job's credentials were issued but the Secret {name} could not be "
                f"written in namespace {namespace} (the API server answered {why}); the operator needs "
                "create and patch on Secrets there (the chart grants them with storage.sts.enabled)",
            ) from e
        except NotFoundError as e:  # the namespace is being deleted
            raise CredentialsError(
                REASON_FAILED, f"storage.sts: the Secret {name} cannot be written: {e}"
            ) from e

    async def remove(self, ftj: dict[str, Any]) -> None:
        """The job has finished: delete its Secret, once per process (after a restart, one call per
        finished job, mostly answered 404), and only if the job controls it: the ownership test
        (a JSON patch that changes nothing) gives the Secret's uid, the DELETE's precondition. Its
        credentials expire on their own; the owner reference would delete the Secret with the
        FineTuneJob anyway."""
        meta = ftj["metadata"]
        key = (meta["namespace"], meta["name"])
        if self._removed.get(key) == meta["uid"]:
            return
        name = secret_name(key[1])
        try:
            found = await self.kube.patch_secret(key[0], name, ownership_test(meta["uid"]))
            await self.kube.delete_secret(key[0], name, found["metadata"]["uid"])
        except (NotFoundError, ConflictError):
            pass  # none, or replaced between the two calls (the precondition failed)
        except ApiError as e:
            if e.status != 403 and not patch_did_not_apply(e):
                raise
            # Not this job's (the ownership test; 403: the chart's Secret policy).
            log.warning("did not delete Secret %s/%s: not this job's: %s", key[0], name, e)
        self._removed[key] = meta["uid"]
        self._expires.pop(key, None)
        self._failing.pop(key, None)

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone (its Secret with it, by the owner reference)."""
        self._expires.pop((namespace, name), None)
        self._removed.pop((namespace, name), None)
        self._failing.pop((namespace, name), None)
