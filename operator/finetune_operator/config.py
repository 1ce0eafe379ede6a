"""Operator-wide defaults and limits, set once by the platform team (the Helm chart's ConfigMap).

The file named by `FINETUNE_OPERATOR_CONFIG` is YAML with camelCase keys; every key is optional and
the defaults work for the local demo (`make demo`), where the trainer runs on the CPU.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

CONFIG_ENV = "FINETUNE_OPERATOR_CONFIG"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )


class StsSettings(_Model):
    """Per-job short-lived storage credentials (finetune_operator.credentials), instead of the
    namespace's `credentialsSecret`: the operator calls STS AssumeRole at `storage.endpoint` with an
    inline session policy for the job's own prefix (read/write) and the prefixes it may read, and
    writes the result into a Secret owned by the FineTuneJob, mounted into the pod as a file."""

    enabled: bool = False
    """Issue scoped credentials for every job that names no `spec.storage.credentialsSecret`."""
    role_arn: str | None = None
    """Role to assume; AWS requires one (the platform's role, which the session policy narrows).
    MinIO ignores it: the session gets the calling user's policy narrowed by the session policy."""
    duration_seconds: int = Field(default=3600, ge=900, le=43200)
    """Lifetime of each job's credentials (900 is STS's minimum; AWS caps it at the role's
    maximum session duration)."""
    renew_before_seconds: int = Field(default=900, ge=120)
    """Renew a running job's credentials when they expire within this many seconds. Must leave
    time for the kubelet to refresh the mounted file (up to about a minute plus its cache TTL) and
    exceed `resyncSeconds`, since the periodic reconcile is what notices."""
    credentials_secret: str | None = None
    """Secret in the operator's namespace with the platform's AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, given to the operator's container as environment by the chart. Unset:
    the operator's own identity (IRSA / Pod Identity on AWS, or environment set otherwise)."""

    @model_validator(mode="after")
    def _renewal_within_lifetime(self) -> StsSettings:
        if self.renew_before_seconds >= self.duration_seconds:
            raise ValueError(
                f"renewBeforeSeconds ({self.renew_before_seconds}) must be less than durationSeconds"
                f" ({self.duration_seconds}), or every reconcile would renew"
            )
        return self


class StorageDefaults(_Model):
    """Where checkpoints and artifacts go when a job names no storage."""

    uri: str | None = None
    """`s3://bucket/prefix`; the operator appends `<namespace>/<name>/` per job."""
    endpoint: str | None = None
    """S3 endpoint for S3-compatible servers; AWS when unset."""
    region: str | None = None
    """S3 region."""
    credentials_secret: str | None = "finetune-s3"
    """Secret (in the job's namespace) with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Not used
    for jobs that get scoped credentials (`sts.enabled`)."""
    sts: StsSettings = Field(default_factory=StsSettings)
    """Per-job scoped, short-lived credentials from STS (off by default)."""


class Allowances(_Model):
    """What jobs may name beyond the platform's defaults, platform-wide (`policy`) or for one
    namespace (`policy.namespaces.<name>`, added to the platform-wide lists). Every list is empty by
    default: a job then runs only the default image as the default ServiceAccount, stores under
    `<storage.uri>/<namespace>/<name>/` at the default endpoint, and reads S3 models and data only
    under its namespace's own prefix `<storage.uri>/<namespace>/`."""

    images: list[str] = Field(default_factory=list)
    """Trainer images `spec.image` may name besides defaultImage: exact references, or
    `repository:*` for any tag or digest of one repository."""
    service_accounts: list[str] = Field(default_factory=list)
    """ServiceAccounts `spec.serviceAccountName` may name besides `trainerServiceAccount`."""
    storage_uris: list[str] = Field(default_factory=list)
    """`s3://bucket/prefix` values `spec.storage.uri` may be at or under (a team's own bucket); the
    job still gets `<namespace>/<name>/` below it. Jobs may read models and data there too."""
    model_prefixes: list[str] = Field(default_factory=list)
    """`s3://bucket/prefix` under which `spec.model.s3` may read (the platform's base models)."""
    data_prefixes: list[str] = Field(default_factory=list)
    """`s3://bucket/prefix` under which `spec.data.s3` and `spec.data.validation.s3` may read."""
    endpoints: list[str] = Field(default_factory=list)
    """S3 endpoints `spec.storage.endpoint` may name besides storage.endpoint."""
    credentials_secrets: list[str] = Field(default_factory=list)
    """Secrets of the job's namespace `spec.storage.credentialsSecret` may name (a team's private
    bucket); none by default, so a job cannot swap the platform's storage credentials."""

    @field_validator("storage_uris", "model_prefixes", "data_prefixes")
    @classmethod
    def _s3_prefixes(cls, prefixes: list[str]) -> list[str]:
        for i, prefix in enumerate(prefixes):
            if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", prefix):
                raise ValueError(f"[{i}]: {prefix!r} is not an s3://bucket/prefix URI")
        return prefixes


class Policy(Allowances):
    """The platform's allowlists (finetune_operator.admission applies them)."""

    namespaces: dict[str, Allowances] = Field(default_factory=dict)
    """Further allowances for the jobs of one namespace, by namespace name."""

    def for_namespace(self, namespace: str) -> Allowances:
        """The platform-wide lists plus the namespace's own."""
        extra = self.namespaces.get(namespace)
        if extra is None:
            return Allowances.model_validate(self.model_dump(exclude={"namespaces"}))
        return Allowances(
            **{name: [*getattr(self, name), *getattr(extra, name)] for name in Allowances.model_fields}
        )


class Ports(_Model):
    """TCP ports the operator listens on (all interfaces)."""

    metrics: int = Field(default=9090, ge=1, le=65535)
    """Prometheus `/metrics`."""
    progress: int = Field(default=8081, ge=1, le=65535)
    """Progress reports from training pods."""
    health: int = Field(default=8080, ge=1, le=65535)
    """`/healthz` and `/readyz`."""


class LeaderElection(_Model):
    """Lease-based leader election; only the leader reconciles. Off for a single replica."""

    enabled: bool = False
    """Take a `coordination.k8s.io/v1` Lease before reconciling."""
    namespace: str = "default"
    """Namespace of the Lease (the operator's own)."""
    lease_name: str = "finetune-operator"
    """Name of the Lease."""
    lease_duration_seconds: int = Field(default=15, ge=5, le=300)
    """How long a leader's claim lasts without renewal; a standby takes over after this."""
    renew_seconds: float = Field(default=5.0, gt=0)
    """How often the leader renews the Lease."""


class KueueSettings(_Model):
    """Kueue integration: the queue a job goes to and whether its Workload is read."""

    enabled: bool = False
    """Read Kueue's Workloads (get/list/watch only) to show why a job waits or was preempted; the
    chart's RBAC follows this. Jobs with a queue are queued either way."""
    workload_api_version: str = Field(default="v1beta2", pattern=r"^v1beta[12]$")
    """kueue.x-k8s.io version the Workloads are read in: v1beta2 from Kueue 0.15, v1beta1 before."""
    default_queues: dict[str, str] = Field(default_factory=dict)
    """Namespace -> LocalQueue for jobs that name no spec.queueName; the key `*` covers every
    namespace not listed."""

    def queue_for(self, namespace: str) -> str | None:
        """The platform's default LocalQueue in `namespace`, if any."""
        return self.default_queues.get(namespace) or self.default_queues.get("*")


class OperatorConfig(_Model):
    """Everything the platform team sets once; a user's job names only model and data."""

    default_image: str = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
    """Trainer image when the job names none."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy of the trainer container."""
    trainer_command: list[str] = Field(
        default_factory=lambda: ["python", "-m", "finetune_trainer", "run", "/etc/finetune/job.json"],
        min_length=1,
    )
    """Trainer argv; it reads the job manifest from the file the pod's downward-API volume writes."""
    storage: StorageDefaults = Field(default_factory=StorageDefaults)
    """Storage defaults."""
    trainer_service_account: str | None = None
    """ServiceAccount of every training pod whose job names none (the namespace's `default` when
    unset); it needs no Kubernetes API access."""
    policy: Policy = Field(default_factory=Policy)
    """What jobs may name beyond the defaults: images, ServiceAccounts, storage, S3 sources."""
    default_node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels every training pod must match; a job's own nodeSelector wins per key."""
    default_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Tolerations every training pod gets, before the job's own."""
    default_cpu: str = "2"
    """CPU request when the job names none."""
    default_memory: str = "8Gi"
    """Memory request and limit when the job names none."""
    max_gpus_per_job: int = Field(default=8, ge=0)
    """Jobs asking for more GPUs fail with a message naming spec.resources.gpus."""
    allowed_model_sources: list[str] = Field(default_factory=list)
    """Regular expressions (anchored at the start) a model source must match: the hub id, the
    `s3://` URI or the path. Empty allows every source."""
    report_url: str = "http://127.0.0.1:8081"
    """Base URL at which training pods reach the operator's progress endpoint (the Service)."""
    report_interval_seconds: float = Field(default=5.0, gt=0)
    """How often the trainer posts progress."""
    report_rate_per_second: float = Field(default=10.0, gt=0)
    """Progress requests accepted per second from one source address (after a burst of
    reportBurst); more get 429 before any TokenReview is made."""
    report_burst: int = Field(default=40, ge=1)
    """Progress requests one source address may send at once."""
    report_audience: str = "finetune-operator"
    """Audience of the projected ServiceAccount token pods authenticate with."""
    report_token_expiration_seconds: int = Field(default=600, ge=600)
    """Lifetime of that token (the kubelet renews it; 600 is the API's minimum)."""
    status_write_interval_seconds: float = Field(default=10.0, ge=0)
    """At most one progress write per job this often (checkpoints and phase changes go at once)."""
    termination_grace_margin_seconds: int = Field(default=30, ge=0)
    """Added to the job's checkpoint grace period for terminationGracePeriodSeconds."""
    run_as_user: int = Field(default=1000, ge=1)
    """Non-root UID of the trainer container."""
    resync_seconds: float = Field(default=60.0, gt=0)
    """Periodic re-reconcile of every job: repairs status after lost watch events."""
    secret_missing_grace_seconds: float = Field(default=60.0, ge=0)
    """A training pod that cannot start this long because a Secret (or a key in it) is missing fails
    its job (reason SecretMissing) and the Job is deleted; until then the Secret may still appear."""
    pod_create_grace_seconds: float = Field(default=300.0, ge=0)
    """A Job whose controller cannot create the training pod this long (a PriorityClass or
    ServiceAccount that does not exist, a quota) fails its job with the reason and the spec field;
    until then status says why it waits, and the missing object may still appear."""
    job_ttl_seconds_after_finished: int | None = Field(default=3600, ge=60)
    """ttlSecondsAfterFinished of the training Jobs: a finished Job (and its pods) is deleted this
    long after it ends; the FineTuneJob keeps its final status and artifacts. At least a minute,
    so the operator sees the Job's end before the Job is gone; None keeps them."""
    reconcile_backoff_max_seconds: float = Field(default=300.0, gt=0)
    """A reconcile that keeps failing with an error is retried after 1, 2, 4, ... seconds, at most
    this long apart (not on every event), and its error is logged once per distinct message."""
    max_concurrent_reconciles: int = Field(default=8, ge=1, le=256)
    """Reconciles running at once (each makes a few API calls); further jobs wait their turn in order
    (`finetune_operator_reconcile_queue_seconds`)."""
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty watches the whole cluster."""
    ports: Ports = Field(default_factory=Ports)
    """Listening ports."""
    leader_election: LeaderElection = Field(default_factory=LeaderElection)
    """Leader election for replicas > 1."""
    kueue: KueueSettings = Field(default_factory=KueueSettings)
    """Kueue integration."""

    @model_validator(mode="after")
    def _sts_needs(self) -> OperatorConfig:
        sts = self.storage.sts
        if sts.enabled and not self.storage.uri:
            raise ValueError("storage.sts.enabled needs storage.uri: the session policy is made for it")
        if sts.enabled and sts.renew_before_seconds <= self.resync_seconds:
            raise ValueError(
                f"storage.sts.renewBeforeSeconds ({sts.renew_before_seconds}) must exceed resyncSeconds"
                f" ({self.resync_seconds:g}): the periodic reconcile is what renews"
            )
        return self

    @field_validator("allowed_model_sources")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"allowedModelSources[{i}]: not a regular expression: {e}") from None
        return patterns

    def model_source_allowed(self, source: str) -> bool:
        """Whether `source` (hub id, s3:// URI or path) matches one of allowedModelSources."""
        return not self.allowed_model_sources or any(re.match(p, source) for p in self.allowed_model_sources)


class ConfigFileError(Exception):
    """The configuration file is unreadable or invalid; the message names the key."""


def load_config(path: str | os.PathLike[str] | None = None) -> OperatorConfig:
    """The configuration from `path`, else from `$FINETUNE_OPERATOR_CONFIG`, else the defaults."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return OperatorConfig()
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigFileError(f"{path}: {e}") from None
    try:
        return OperatorConfig.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigFileError(f"{path}: {where}: {first['msg']}") from None
