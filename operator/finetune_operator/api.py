"""The `FineTuneJob` resource: the trainer's spec plus what only Kubernetes needs, and the status.

The training part (`finetune_trainer.spec.TrainingSpec`) is embedded field for field, so the same
job.yaml trains on a workstation and on the cluster, and the CRD in crds/ is generated from these
models (`python -m finetune_operator crds`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from finetune_trainer.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    TRAINING_RULES,
    SecretKeyRef,
    Spec,
    StorageSpec,
    TrainingSpec,
    cel,
    validations,
)
from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

__all__ = ["API_GROUP", "API_VERSION", "KIND", "PLURAL", "SHORT_NAME", "SecretKeyRef"]

PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAME = "ftj"


# Kubernetes' own grammars (apimachinery's validation): label keys and values, DNS subdomain names,
# resource quantities. Go's regexp (the API server) and Rust's (pydantic) both read these.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_NAME_PART}$"
LABEL_VALUE = rf"^({_NAME_PART})?$"
EXTENDED_RESOURCE = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})+/{_NAME_PART}$"
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"
"""A non-negative resource.Quantity: `8`, `500m`, `64Gi`, `1Ei`, `1e9`, `0.5`."""
_POSITIVE = "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))"
_SUFFIXES = {
    **{s: 1024**i for i, s in enumerate(("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18},
}


def quantity_value(text: str) -> float:
    """The value of a quantity matching QUANTITY (floating point: for comparisons, not arithmetic)."""
    match = re.fullmatch(r"([0-9.]+)([eE][-+]?[0-9]+)?([A-Za-z]*)", text)
    if match is None:
        raise ValueError(f"{text!r} is not a quantity")
    number, exponent, suffix = match.groups()
    return float(number + (exponent or "")) * _SUFFIXES[suffix]


def _positive_quantity(value: str | None) -> str | None:
    if value is not None and quantity_value(value) <= 0:
        raise ValueError(
            f"{value!r}: expected a quantity above 0 (a limit of 0 is no limit a pod can run in)"
        )
    return value


def _label_keys(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if len(key) > 316 or not re.fullmatch(LABEL_KEY, key):
            raise ValueError(
                f"{key!r} is not a label key: `name` or `prefix/name`, name up to 63 of [A-Za-z0-9_.-] "
                "(starting and ending alphanumeric), prefix a DNS subdomain"
            )
    return value


Quantity = Annotated[
    str,
    Field(
        max_length=32,
        pattern=QUANTITY,
        json_schema_extra=validations(
            cel(_POSITIVE, "must be a quantity above 0, for example 8, 500m or 64Gi")
        ),
    ),
    AfterValidator(_positive_quantity),
]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)]
_TOLERATION_RULES = validations(
    cel(
        "self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "value must be empty with operator Exists",
        ".value",
    ),
    cel(
        "self.operator == 'Exists' || (has(self.key) && self.key != '')",
        "key is required with operator Equal (an empty key with operator Exists tolerates every taint)",
        ".key",
    ),
    cel(
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "tolerationSeconds is only for effect NoExecute",
        ".tolerationSeconds",
    ),
)


class Toleration(Spec):
    """A pod toleration (core/v1 Toleration)."""

    model_config = ConfigDict(json_schema_extra=_TOLERATION_RULES)

    key: str | None = Field(default=None, max_length=316, pattern=LABEL_KEY)
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """How key and value are compared."""
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE)
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; every effect when unset."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty with operator Exists")
        if self.operator == "Equal" and not self.key:
            raise ValueError(
                "key is required with operator Equal "
                "(an empty key with operator Exists tolerates every taint)"
            )
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds is only for effect NoExecute")
        return self


MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
_MIG_DATA_PARALLEL = (
    "gpus > 1 needs whole GPUs: with MIG slices (gpuResource nvidia.com/mig-...) a CUDA process sees"
    " one slice, so the data-parallel ranks (one process per GPU) cannot use the others; ask for 1"
    " slice, or whole GPUs (nvidia.com/gpu)"
)


class ResourceSpec(Spec):
    """Compute for the training pod."""

    model_config = {
        "json_schema_extra": validations(
            cel(
                f"self.gpus <= 1 || !self.gpuResource.startsWith('{MIG_RESOURCE_PREFIX}')",
                _MIG_DATA_PARALLEL,
                ".gpus",
            )
        )
    }

    gpus: int = Field(default=1, ge=0, le=16)
    """GPUs for the pod (requests = limits). 0 trains on the CPU (tiny models, tests); more than 1
    trains data-parallel, one trainer process per GPU (rows per optimizer step = batchSize x
    gradientAccumulationSteps x gpus)."""
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=EXTENDED_RESOURCE,
        json_schema_extra=validations(
            cel(
                "!self.split('/')[0].endsWith('kubernetes.io')",
                "must be an extended resource outside the kubernetes.io domain, such as nvidia.com/gpu",
            )
        ),
    )
    """Extended resource name of the GPU, `domain/name` such as `nvidia.com/gpu` or `amd.com/gpu`
    (never cpu or memory)."""
    cpu: Quantity | None = None
    """CPU request, for example `8` or `500m`; operator default when unset."""
    memory: Quantity | None = None
    """Memory request and limit, for example `64Gi`; operator default when unset."""

    @field_validator("gpu_resource")
    @classmethod
    def _extended(cls, value: str) -> str:
        if value.split("/", maxsplit=1)[0].endswith("kubernetes.io"):
            raise ValueError(
                "must be an extended resource outside the kubernetes.io domain, such as nvidia.com/gpu"
            )
        return value

    @model_validator(mode="after")
    def _data_parallel_needs_whole_gpus(self) -> ResourceSpec:
        if self.gpus > 1 and self.gpu_resource.startswith(MIG_RESOURCE_PREFIX):
            raise ValueError(_MIG_DATA_PARALLEL)
        return self


class JobStorageSpec(StorageSpec):
    """Checkpoint and artifact storage, with the Secret holding S3 credentials."""

    credentials_secret: str | None = Field(default=None, min_length=1, max_length=253)
    """Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN),
    passed to the trainer as environment variables; operator default when unset."""
    delete_on_job_deletion: bool = False
    """Delete the job's checkpoints and artifacts when the FineTuneJob is deleted. Kept by default."""


IMMUTABLE_FIELDS = ("model", "data", "template", "lora", "training")
"""The training spec: a running job's checkpoints are only valid for these values."""
FIXED_FIELDS = (
    "checkpoint",
    "evaluation",
    "export",
    "samples",
    "tracking",
    "storage",
    "image",
    "resources",
    "nodeSelector",
    "tolerations",
    "priorityClassName",
    "queueName",
    "workloadPriorityClassName",
    "backoffLimit",
    "serviceAccountName",
)
"""Everything else but `suspend` and `activeDeadlineSeconds`: a batch/v1 Job's pod template cannot
change, so a change here could never reach the running pod nor the next one."""
MUTABLE_FIELDS = ("suspend", "activeDeadlineSeconds")
"""Applied to the running Job at once."""

# The training spec's rules across sections, then the transition rules: those (oldSelf) run on
# update only; spec is required, so oldSelf always exists. One rule per field, so the API server's
# error names the field that changed.
_SPEC_RULES = validations(
    *TRAINING_RULES,
    *(
        cel(
            f"self.{name} == oldSelf.{name}",
            f"{name} is immutable: the training spec (model, data, template, lora, training) cannot"
            " change once created; create a new FineTuneJob",
            f".{name}",
        )
        for name in IMMUTABLE_FIELDS
    ),
    *(
        cel(
            f"has(self.{name}) == has(oldSelf.{name})"
            f" && (!has(self.{name}) || self.{name} == oldSelf.{name})",
            f"{name} is immutable: the training Job's pod template cannot change; only suspend and "
            "activeDeadlineSeconds can be changed on a created job (create a new FineTuneJob, it "
            "resumes from nothing: checkpoints are per job)",
            f".{name}",
        )
        for name in FIXED_FIELDS
    ),
)


class FineTuneJobSpec(TrainingSpec):
    """Desired state of a FineTuneJob: the training spec plus scheduling, storage and limits."""

    model_config = {"json_schema_extra": _SPEC_RULES}

    storage: JobStorageSpec = Field(default_factory=JobStorageSpec)  # type: ignore[assignment]
    """Checkpoint and artifact storage."""
    image: str | None = Field(default=None, max_length=512)
    """Trainer image; the operator's default when unset."""
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    """GPUs, CPU and memory."""
    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]], AfterValidator(_label_keys)
    ] = Field(
        default_factory=dict,
        max_length=32,
        json_schema_extra=validations(
            cel(
                f"self.all(k, size(k) <= 316 && k.matches(r'{LABEL_KEY}'))",
                "every key must be a label key: `name` or `prefix/name`, name up to 63 of [A-Za-z0-9_.-] "
                "(starting and ending alphanumeric), prefix a DNS subdomain",
            )
        ),
    )
    """Node labels the pod must match (merged over the operator's default)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations, for example for tainted GPU nodes."""
    priority_class_name: ObjectName | None = None
    """PriorityClass of the training pod."""
    queue_name: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Kueue LocalQueue: the Job is created suspended with the `kueue.x-k8s.io/queue-name` label
    (the operator's kueue.defaultQueues name one per namespace when unset)."""
    workload_priority_class_name: str | None = Field(
        default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """Kueue WorkloadPriorityClass: the Job's `kueue.x-k8s.io/priority-class` label (queueing and
    preemption order within Kueue, independent of the pod's priorityClassName)."""
    suspend: bool = False
    """Stop the training pod (it checkpoints first); false again resumes from the checkpoint.
    Mutable: applied to the running Job at once, whatever else is wrong with the job."""
    active_deadline_seconds: int | None = Field(default=None, ge=60)
    """Wall-clock limit for the whole job, preemptions included. Mutable: applied to the running
    Job at once. Every other field is immutable once the job is created."""
    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Failed attempts allowed before the job fails. Preemptions and evictions do not count."""
    service_account_name: ObjectName | None = None
    """ServiceAccount of the training pod (for cloud IAM); it needs no Kubernetes API access."""


class Condition(Spec):
    """A status condition (metav1.Condition)."""

    type: str
    """Condition type: Ready, Running, Succeeded, Failed, Suspended, CheckpointsFailing."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str
    """CamelCase reason."""
    message: str = ""
    """Human message."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class Progress(Spec):
    """Live training progress, reported by the trainer and relayed by the operator."""

    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    percent: float | None = None
    """step / totalSteps x 100."""
    loss: float | None = None
    """Latest logged training loss (the last finite one while `diverged`)."""
    diverged: bool | None = None
    """The latest loss was NaN or infinite; the trainer stops after
    spec.training.maxNonFiniteSteps such steps in a row."""
    learning_rate: float | None = None
    """Latest learning rate."""
    tokens_per_second: float | None = None
    """Real (non-padding) tokens per second."""
    eta_seconds: float | None = None
    """Estimated seconds until training ends."""
    gpu_memory_gib: float | None = None
    """Peak GPU memory reserved (the largest of the ranks' with several GPUs)."""
    gpu_memory_per_rank_gib: list[float] | None = Field(default=None, max_length=16)
    """Peak GPU memory reserved by each rank (one trainer process per GPU), by rank."""
    ranks: int | None = Field(default=None, ge=1)
    """Trainer processes training data-parallel, one per GPU."""
    phase: str | None = Field(default=None, max_length=64)
    """The trainer's own stage: Preflight, Loading, Training, Exporting, ..."""
    batch_size: int | None = Field(default=None, ge=1)
    """Rows per micro-batch the trainer executes (spec.training.microBatches: `auto` may run a
    step's rows in fewer, larger micro-batches than the spec's batchSize)."""
    gradient_accumulation_steps: int | None = Field(default=None, ge=1)
    """Micro-batches per optimizer step the trainer executes; batchSize x this is always the
    spec's rows per step."""
    batch_plan: str | None = Field(default=None, max_length=512)
    """The step split and why: the spec's rows per step, the split chosen and the memory bound."""
    checkpoint_failures: int | None = Field(default=None, ge=0)
    """Checkpoint uploads that failed in the current pod (the trainer retries; see CheckpointsFailing)."""
    eval_loss: float | None = None
    """Latest loss on the validation rows (spec.data.validation)."""
    eval_token_accuracy: float | None = None
    """Latest share of validation tokens the model predicts first."""
    eval_step: int | None = Field(default=None, ge=0)
    """Step of the latest evaluation (0: the base model, before training)."""
    best_eval_loss: float | None = None
    """Lowest eval loss so far."""
    best_eval_step: int | None = Field(default=None, ge=0)
    """Step of the lowest eval loss."""
    evals_since_best: int | None = Field(default=None, ge=0)
    """Evaluations since the best one that did not improve on it (spec.evaluation.patience)."""
    updated_at: str | None = None
    """When the trainer reported this (RFC 3339); older reports never replace newer ones."""


class CheckpointStatus(Spec):
    """The newest complete checkpoint."""

    uri: str
    """Where it is stored."""
    step: int
    """Optimizer step it holds."""
    time: str
    """When it became complete (RFC 3339)."""


class CheckpointRecord(Spec):
    """A kept checkpoint with its losses."""

    step: int
    """Optimizer step it holds."""
    train_loss: float | None = None
    """Training loss logged at that step."""
    eval_loss: float | None = None
    """Loss on the validation rows at that step (none when the checkpoint was not evaluated: the
    SIGTERM checkpoint, or no validation data)."""
    time: str | None = None
    """When it became complete (RFC 3339)."""
    uri: str
    """Where it is stored."""


class SampleAnswers(Spec):
    """The first line of one sample prompt's answers (all of them: artifacts samples.json and .md)."""

    prompt: str | None = None
    """The prompt."""
    before: str | None = None
    """The base model's answer, before training."""
    after: str | None = None
    """The fine-tuned (merged) model's answer."""
    gguf: dict[str, str | None] = Field(default_factory=dict, max_length=6)
    """Each exported GGUF's answer in llama.cpp, by quantization."""


class Artifact(Spec):
    """An exported file or folder."""

    name: str
    """What it is: adapter, merged_16bit, gguf-q8_0, samples, ..."""
    uri: str
    """Where it is stored."""
    size_bytes: int
    """Size in bytes."""
    sha256: str
    """SHA-256 of the file (of the manifest for folders)."""


Phase = Literal["Pending", "Queued", "Running", "Preempted", "Suspended", "Succeeded", "Failed"]


class Usage(Spec):
    """What the job has used so far, for charging teams (also the operator's counters)."""

    gpu_seconds: float = 0.0
    """GPUs x seconds in phase Running, up to accountedAt."""
    queued_seconds: float = 0.0
    """Seconds in phase Queued (waiting for Kueue to admit it), up to accountedAt."""
    accounted_at: str | None = None
    """Until when the figures count; the current phase has lasted since."""


class FineTuneJobStatus(Spec):
    """Observed state, written only by the operator."""

    model_config = {"extra": "ignore"}

    phase: Phase | None = None
    """Pending, Queued (waiting for Kueue), Running, Preempted (Kueue evicted it: it checkpoints,
    then queues again), Suspended, Succeeded or Failed."""
    message: str | None = None
    """What is happening, or on failure what to fix."""
    observed_generation: int | None = None
    """metadata.generation this status reflects."""
    job_name: str | None = None
    """The batch/v1 Job running the trainer."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Conditions per Kubernetes API conventions."""
    progress: Progress | None = None
    """Live training progress."""
    checkpoint: CheckpointStatus | None = None
    """Newest complete checkpoint."""
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, max_length=10)
    """The kept checkpoints, newest first (at most 10), with train and eval loss."""
    best_checkpoint: CheckpointRecord | None = None
    """The kept checkpoint with the lowest eval loss (kept beyond keepLast; spec.export.fromCheckpoint
    best exports it)."""
    samples: list[SampleAnswers] = Field(default_factory=list, max_length=3)
    """First lines of the before/after answers to the first sample prompts, once exported."""
    preemptions: int = 0
    """Times the training pod was evicted or preempted and replaced."""
    last_eviction_time: str | None = None
    """When Kueue last evicted the job's Workload (each eviction counts once in preemptions)."""
    preempted_pods: list[str] = Field(default_factory=list, max_length=50)
    """UIDs of the pods already counted in preemptions (the newest 50), so no pod is counted twice."""
    artifacts: list[Artifact] = Field(default_factory=list)
    """Exported artifacts."""
    usage: Usage | None = None
    """GPU-seconds and time queued."""
    start_time: str | None = None
    """When training first started."""
    completion_time: str | None = None
    """When the job succeeded or failed."""
    summary: dict[str, str | int | float | bool | None] | None = None
    """The trainer's final summary (from the pod's termination message)."""


class FineTuneJob(Spec):
    """A LoRA fine-tuning job: base model + data in, adapter and GGUF in S3 out."""

    model_config = {"extra": "ignore"}

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
