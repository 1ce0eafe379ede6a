"""FineTuneJob -> batch/v1 Job manifest: pure functions, no API calls.

How the trainer gets its spec: the whole job (apiVersion, kind, name, namespace and the spec as the
user wrote it, with storage filled from the operator's defaults) is a JSON annotation on the pod
template; a projected downward-API volume writes it to `/etc/finetune/job.json`, which the trainer
command reads (`python -m finetune_trainer run /etc/finetune/job.json`). Nothing is re-serialised
through a model, so no field is lost, and the root filesystem stays read-only. The same projected
volume holds the short-lived ServiceAccount token the trainer authenticates its progress reports
with; the pod gets no other Kubernetes credentials.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED
from pydantic import ValidationError

from finetune_operator import admission, credentials
from finetune_operator.api import API_GROUP, API_VERSION, KIND, FineTuneJobSpec, quantity_value
from finetune_operator.config import OperatorConfig
from finetune_operator.naming import (
    ANNOTATION_JOB_MANIFEST,
    LABEL_KUEUE_PRIORITY,
    LABEL_KUEUE_QUEUE,
    job_labels,
    job_name,
    owner_reference,
)

CONTAINER = "trainer"
SPEC_DIR = "/etc/finetune"
SPEC_FILE = "job.json"
TOKEN_FILE = "token"
WORK_DIR = "/work"
TERMINATION_LOG = "/dev/termination-log"
PROGRESS_PORT = 9090
MAX_MANIFEST_BYTES = 256 * 1024 - 1024
"""The API server's limit on a pod's annotations (256 KiB, keys and values), less room for
annotations that admission controllers add."""
SHM_DIR = "/dev/shm"
SHM_MIB_PER_GPU = 1024
"""Memory-backed /dev/shm for a multi-GPU pod, per GPU. The container runtime's default is 64 MiB;
NCCL's shared-memory transport between the ranks of one pod (used where GPUs have no P2P path,
and for its host-side buffers) needs more than that at 4 ranks and fails at init ("unable to
allocate shared memory"). It counts against the pod's memory limit, so it is bounded."""
DATA_PARALLEL_ENV = {
    # A rank that dies makes the others' pending NCCL operations fail within seconds, instead of
    # hanging until the collective timeout (10 minutes): the attempt fails and the Job retries it.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # NCCL's own warnings (a transport that fell back, a topology problem) in the pod's log.
    "NCCL_DEBUG": "WARN",
}
"""Environment of a multi-GPU trainer besides FINETUNE_NPROC_PER_NODE."""

ENV_HUB_TOKEN = "HF_TOKEN"
ENV_DATA_HUB_TOKEN = "HF_DATA_TOKEN"
ENV_PUSH_TOKEN = "HF_PUSH_TOKEN"
ENV_WANDB_KEY = "WANDB_API_KEY"
ENV_MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
ENV_MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
ENV_MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
S3_SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
"""(key, optional): env var name = key in the credentials Secret."""


class InvalidJobError(Exception):
    """The FineTuneJob cannot run under this operator's limits; `field` names what to change."""

    def __init__(self, field: str, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


def parse_spec(ftj: dict[str, Any]) -> FineTuneJobSpec:
    """The spec as a model (defaults applied); a problem becomes InvalidJobError naming the field."""
    try:
        return FineTuneJobSpec.model_validate(ftj.get("spec") or {})
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(["spec", *(str(p) for p in first["loc"])])
        raise InvalidJobError(field, str(first["msg"]).removeprefix("Value error, ")) from None


def validate_limits(spec: FineTuneJobSpec, namespace: str, cfg: OperatorConfig) -> None:
    """Refuse what the schema allows but this installation does not (InvalidJobError names the
    field): the operator's limits (reason InvalidSpec), then the platform's policy for `namespace`
    (admission.refusal, reason NotAllowed)."""
    if spec.resources.gpus > cfg.max_gpus_per_job:
        raise InvalidJobError(
            "spec.resources.gpus",
            f"{spec.resources.gpus} GPUs requested; at most {cfg.max_gpus_per_job} per job allowed here",
        )
    model = spec.model
    for field, source in (("hub", model.hub), ("s3", model.s3), ("path", model.path)):
        if source is not None and not cfg.model_source_allowed(source):
            raise InvalidJobError(
                f"spec.model.{field}",
                f"{source!r} is not an allowed model source; allowed: {', '.join(cfg.allowed_model_sources)}",
            )
    if not (spec.storage.uri or cfg.storage.uri):
        raise InvalidJobError(
            "spec.storage.uri", "no storage: set it, or have the operator's storage.uri default set"
        )
    refused = admission.refusal(spec, namespace, cfg)
    if refused is not None:
        raise InvalidJobError(refused.field, refused.message, admission.REASON)


def resolved_storage(ftj: dict[str, Any], cfg: OperatorConfig) -> dict[str, Any]:
    """spec.storage with the operator's defaults filled in and `<namespace>/<name>` appended to the
    URI, so jobs never share a checkpoint prefix. A job with scoped credentials (storage.sts) gets
    no credentialsSecret: its pod reads the operator's per-job Secret instead."""
    meta = ftj["metadata"]
    storage = dict((ftj.get("spec") or {}).get("storage") or {})
    base = storage.get("uri") or cfg.storage.uri or ""
    storage["uri"] = f"{base.rstrip('/')}/{meta['namespace']}/{meta['name']}"
    scoped = credentials.uses_sts(storage.get("credentialsSecret"), cfg)
    for key, default in (
        ("endpoint", cfg.storage.endpoint),
        ("region", cfg.storage.region),
        ("credentialsSecret", None if scoped else cfg.storage.credentials_secret),
    ):
        if storage.get(key) is None and default is not None:
            storage[key] = default
    return storage


def trainer_manifest(ftj: dict[str, Any], cfg: OperatorConfig) -> dict[str, Any]:
    """The document the trainer reads: the user's spec verbatim, storage resolved."""
    meta = ftj["metadata"]
    spec = copy.deepcopy(ftj.get("spec") or {})
    spec["storage"] = resolved_storage(ftj, cfg)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
        "spec": spec,
    }


def report_url(ftj: dict[str, Any], cfg: OperatorConfig) -> str:
    """Where this job's trainer POSTs progress."""
    meta = ftj["metadata"]
    return (
        f"{cfg.report_url.rstrip('/')}/v1/namespaces/{meta['namespace']}/finetunejobs/{meta['name']}/progress"
    )


def _secret_env(name: str, ref: Any, optional: bool = False) -> dict[str, Any]:
    selector: dict[str, Any] = {"name": ref.name, "key": ref.key}
    if optional:
        selector["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": selector}}


def _env(ftj: dict[str, Any], spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "FINETUNE_SUMMARY_PATH", "value": TERMINATION_LOG},
        {"name": "FINETUNE_PROGRESS_PORT", "value": str(PROGRESS_PORT)},
        {"name": "FINETUNE_REPORT_URL", "value": report_url(ftj, cfg)},
        {"name": "FINETUNE_REPORT_INTERVAL", "value": f"{cfg.report_interval_seconds:g}"},
        {"name": "FINETUNE_REPORT_TOKEN_FILE", "value": f"{SPEC_DIR}/{TOKEN_FILE}"},
        {"name": "HOME", "value": WORK_DIR},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/.cache/huggingface"},
        # torch (OpenMP) starts one thread per core of the *node*; pods sharing a node then
        # oversubscribe it, and spinning OpenMP threads slow training many times over (15x measured
        # with four tiny trainers on two cores). One thread per requested CPU, rounded up; with one
        # process per GPU, the requested CPUs divided among them.
        _omp_threads(spec, cfg),
    ]
    if spec.resources.gpus > 1:
        # The trainer starts one process per GPU (finetune_trainer/launch.py, through torchrun).
        env.append({"name": "FINETUNE_NPROC_PER_NODE", "value": str(spec.resources.gpus)})
        env += [{"name": name, "value": value} for name, value in DATA_PARALLEL_ENV.items()]
    storage = resolved_storage(ftj, cfg)
    secret = storage.get("credentialsSecret")
    if credentials.uses_sts(secret, cfg):
        env.append(
            {
                "name": credentials.ENV_CREDENTIALS_FILE,
                "value": f"{credentials.MOUNT_DIR}/{credentials.CREDENTIALS_KEY}",
            }
        )
    elif secret:
        for key, optional in S3_SECRET_KEYS:
            selector = {"name": secret, "key": key, **({"optional": True} if optional else {})}
            env.append({"name": key, "valueFrom": {"secretKeyRef": selector}})
    if spec.model.token_secret_ref:
        env.append(_secret_env(ENV_HUB_TOKEN, spec.model.token_secret_ref))
    data_ref = spec.data.token_secret_ref
    if data_ref and data_ref != spec.model.token_secret_ref:
        # One hub token serves both when only the data set is gated.
        env.append(
            _secret_env(ENV_HUB_TOKEN if not spec.model.token_secret_ref else ENV_DATA_HUB_TOKEN, data_ref)
        )
    if spec.export.push:
        env.append(_secret_env(ENV_PUSH_TOKEN, spec.export.push.token_secret_ref))
    tracking = spec.tracking
    if tracking.api_key_secret_ref:
        name = ENV_MLFLOW_TOKEN if tracking.type == "mlflow" else ENV_WANDB_KEY
        env.append(_secret_env(name, tracking.api_key_secret_ref))
    if tracking.username_secret_ref:
        env.append(_secret_env(ENV_MLFLOW_USERNAME, tracking.username_secret_ref))
    if tracking.password_secret_ref:
        env.append(_secret_env(ENV_MLFLOW_PASSWORD, tracking.password_secret_ref))
    return env


def secret_fields(ftj: dict[str, Any], cfg: OperatorConfig) -> dict[str, str]:
    """Secret name -> the spec field naming it (for messages when a Secret is missing)."""
    spec = parse_spec(ftj)
    refs = [
        ("spec.tracking.apiKeySecretRef", spec.tracking.api_key_secret_ref),
        ("spec.tracking.usernameSecretRef", spec.tracking.username_secret_ref),
        ("spec.tracking.passwordSecretRef", spec.tracking.password_secret_ref),
        ("spec.export.push.tokenSecretRef", spec.export.push.token_secret_ref if spec.export.push else None),
        ("spec.data.tokenSecretRef", spec.data.token_secret_ref),
        ("spec.model.tokenSecretRef", spec.model.token_secret_ref),
    ]
    out = {ref.name: field for field, ref in refs if ref is not None}
    storage = resolved_storage(ftj, cfg).get("credentialsSecret")
    if credentials.uses_sts(storage, cfg):
        out[credentials.secret_name(ftj["metadata"]["name"])] = "the operator's scoped storage credentials"
    elif storage:
        own = ((ftj.get("spec") or {}).get("storage") or {}).get("credentialsSecret")
        out[storage] = "spec.storage.credentialsSecret" if own else "the operator's storage.credentialsSecret"
    return out


def _omp_threads(spec: FineTuneJobSpec, cfg: OperatorConfig) -> dict[str, Any]:
    """OMP_NUM_THREADS: the CPU request in whole cores (rounded up, by the kubelet), or with one
    process per GPU the request divided among them, worked out here: the API server takes no
    divisor of a CPU request but 1 and 1m (a Job with divisor "2" is refused with 422)."""
    if spec.resources.gpus <= 1:
        ref = {"containerName": CONTAINER, "resource": "requests.cpu", "divisor": "1"}
        return {"name": "OMP_NUM_THREADS", "valueFrom": {"resourceFieldRef": ref}}
    cores = quantity_value(spec.resources.cpu or cfg.default_cpu)
    # rounded first: quantity_value is floating point, and 6 / 3 must stay 2, not become 3
    threads = max(1, math.ceil(round(cores / spec.resources.gpus, 6)))
    return {"name": "OMP_NUM_THREADS", "value": str(threads)}


def _resources(spec: FineTuneJobSpec, cfg: OperatorConfig) -> dict[str, Any]:
    memory = spec.resources.memory or cfg.default_memory
    requests = {"cpu": spec.resources.cpu or cfg.default_cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if spec.resources.gpus:
        requests[spec.resources.gpu_resource] = str(spec.resources.gpus)
        limits[spec.resources.gpu_resource] = str(spec.resources.gpus)
    return {"requests": requests, "limits": limits}


def _shm_size(spec: FineTuneJobSpec) -> str:
    return f"{SHM_MIB_PER_GPU * spec.resources.gpus}Mi"


def _tolerations(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[dict[str, Any]]:
    own = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    return [*(t for t in cfg.default_tolerations if t not in own), *own]


def queue_name(spec: FineTuneJobSpec, namespace: str, cfg: OperatorConfig) -> str | None:
    """The job's Kueue LocalQueue: its own spec.queueName, else the platform's default for the namespace."""
    return spec.queue_name or cfg.kueue.queue_for(namespace)


def desired_suspend(spec: FineTuneJobSpec, queue: str | None) -> bool:
    """`suspend` for a new Job: the user's, or true while Kueue has not admitted it (Kueue unsuspends)."""
    return spec.suspend or queue is not None


def build_job(ftj: dict[str, Any], cfg: OperatorConfig) -> dict[str, Any]:
    """The batch/v1 Job for `ftj`. Raises InvalidJobError when the spec breaks the operator's limits."""
    spec = parse_spec(ftj)
    meta = ftj["metadata"]
    validate_limits(spec, meta["namespace"], cfg)
    name = meta["name"]
    labels = job_labels(name)
    job_meta_labels = dict(labels)
    queue = queue_name(spec, meta["namespace"], cfg)
    if queue:
        job_meta_labels[LABEL_KUEUE_QUEUE] = queue
    if spec.workload_priority_class_name:
        job_meta_labels[LABEL_KUEUE_PRIORITY] = spec.workload_priority_class_name
    scoped = credentials.uses_sts(resolved_storage(ftj, cfg).get("credentialsSecret"), cfg)
    manifest = json.dumps(trainer_manifest(ftj, cfg), separators=(",", ":"), sort_keys=True)
    size = len(ANNOTATION_JOB_MANIFEST) + len(manifest.encode())
    if size > MAX_MANIFEST_BYTES:
        raise InvalidJobError(
            "spec",
            f"the job's manifest is {size} bytes; the pod gets it as an annotation, and Kubernetes "
            f"allows {MAX_MANIFEST_BYTES} bytes of annotations: shorten the longest texts "
            "(template.systemPrompt, template.format, samples.prompts)",
        )
    container = {
        "name": CONTAINER,
        "image": spec.image or cfg.default_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": list(cfg.trainer_command),
        "workingDir": WORK_DIR,
        "env": _env(ftj, spec, cfg),
        "ports": [{"name": "progress", "containerPort": PROGRESS_PORT, "protocol": "TCP"}],
        "resources": _resources(spec, cfg),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "finetune", "mountPath": SPEC_DIR, "readOnly": True},
            *([{"name": "shm", "mountPath": SHM_DIR}] if spec.resources.gpus > 1 else []),
            *([{"name": "storage", "mountPath": credentials.MOUNT_DIR, "readOnly": True}] if scoped else []),
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.checkpoint.grace_period_seconds
        + cfg.termination_grace_margin_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "fsGroup": cfg.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "work", "emptyDir": {}},
            *(
                [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(spec)}}]
                if spec.resources.gpus > 1
                else []
            ),
            *([_credentials_volume(name)] if scoped else []),
            {
                "name": "finetune",
                "projected": {
                    "defaultMode": 0o440,
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": cfg.report_audience,
                                "expirationSeconds": cfg.report_token_expiration_seconds,
                                "path": TOKEN_FILE,
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": SPEC_FILE,
                                        "fieldRef": {
                                            "fieldPath": f"metadata.annotations['{ANNOTATION_JOB_MANIFEST}']"
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                },
            },
        ],
    }
    node_selector = {**cfg.default_node_selector, **spec.node_selector}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = _tolerations(spec, cfg)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    service_account = spec.service_account_name or cfg.trainer_service_account
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    job_spec: dict[str, Any] = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": spec.backoff_limit,
        "suspend": desired_suspend(spec, queue),
        # Never two trainers writing one checkpoint prefix: a replacement starts only once the old
        # pod is fully gone (after its emergency checkpoint).
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_CONFIG_ERROR],
                    },
                },
                # Stopped by SIGTERM after a checkpoint (drain, plain pod delete): resumable, no retry burnt.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_INTERRUPTED],
                    },
                },
            ]
        },
        "template": {
            "metadata": {"labels": labels, "annotations": {ANNOTATION_JOB_MANIFEST: manifest}},
            "spec": pod_spec,
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if cfg.job_ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = cfg.job_ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": meta["namespace"],
            "labels": job_meta_labels,
            "ownerReferences": [owner_reference(ftj)],
        },
        "spec": job_spec,
    }


def _credentials_volume(ftj_name: str) -> dict[str, Any]:
    """The job's scoped storage credentials as a file; mounted whole (not by subPath), so the
    kubelet's refresh of a renewed Secret reaches the running pod."""
    return {
        "name": "storage",
        "secret": {
            "secretName": credentials.secret_name(ftj_name),
            "defaultMode": 0o440,
            "items": [{"key": credentials.CREDENTIALS_KEY, "path": credentials.CREDENTIALS_KEY}],
        },
    }


def is_owned_by(job: dict[str, Any], ftj: dict[str, Any]) -> bool:
    """Whether `job` is controlled by this very FineTuneJob (same uid: not an earlier namesake)."""
    uid = ftj["metadata"]["uid"]
    return any(
        ref.get("controller") and ref.get("uid") == uid
        for ref in job.get("metadata", {}).get("ownerReferences") or []
    )


def job_spec_patch(
    ftj: dict[str, Any], job: dict[str, Any], spec: FineTuneJobSpec | None = None
) -> dict[str, Any] | None:
    """A merge patch bringing an existing Job's mutable fields (suspend, activeDeadlineSeconds) in line
    with the FineTuneJob, or None. With a Kueue queue (the Job's label, set at creation), Kueue owns
    `suspend` (it unsuspends on admission), so the operator only ever sets it to true on the user's
    request. `spec`: the FineTuneJob's spec already parsed; without it the fields are read as they
    stand, so suspend applies even to a spec that no longer parses (suspend works whatever else is
    wrong)."""
    if spec is not None:
        suspend, deadline = spec.suspend, spec.active_deadline_seconds
    else:
        raw = ftj.get("spec") or {}
        suspend = raw.get("suspend") is True
        deadline = raw.get("activeDeadlineSeconds")
        deadline = deadline if isinstance(deadline, int) and deadline >= 60 else None
    current = job.get("spec") or {}
    patch: dict[str, Any] = {}
    if not (job.get("metadata", {}).get("labels") or {}).get(LABEL_KUEUE_QUEUE):
        if bool(current.get("suspend")) != suspend:
            patch["suspend"] = suspend
    elif suspend and not current.get("suspend"):
        patch["suspend"] = True
    if current.get("activeDeadlineSeconds") != deadline:
        patch["activeDeadlineSeconds"] = deadline
    return {"spec": patch} if patch else None
