"""The FineTuneJob -> Job builder: the properties the cluster relies on."""

from __future__ import annotations

import json

import pytest
from finetune_operator.config import OperatorConfig
from finetune_operator.jobbuilder import (
    ANNOTATION_JOB_MANIFEST,
    InvalidJobError,
    build_job,
    is_owned_by,
    job_spec_patch,
    secret_fields,
)
from finetune_operator.naming import job_name
from finetune_trainer.errors import EXIT_CONFIG_ERROR
from finetune_trainer.jobfile import parse_job

CFG = OperatorConfig.model_validate(
    {
        "defaultImage": "registry.example/trainer:1",
        "storage": {"uri": "s3://ckpts/base", "endpoint": "http://s3:9000", "credentialsSecret": "s3-creds"},
        "defaultNodeSelector": {"gpu": "true", "pool": "default"},
        "defaultTolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "maxGpusPerJob": 4,
        "allowedModelSources": [r"unsloth/", r"s3://models/"],
        "reportUrl": "http://finetune-operator.system.svc:8081",
    }
)


def ftj(name: str = "qwen-medical", **spec: object) -> dict:
    base = {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "org/data"}}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1234", "generation": 1},
        "spec": {**base, **spec},
    }


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def trainer(job: dict) -> dict:
    return pod_spec(job)["containers"][0]


def test_pod_failure_policy_ignores_disruption_and_fails_fast_on_config_errors() -> None:
    job = build_job(ftj(backoffLimit=5), CFG)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail[0]["onExitCodes"]["values"] == [EXIT_CONFIG_ERROR]
    assert fail[0]["onExitCodes"]["containerName"] == trainer(job)["name"]
    assert job["spec"]["backoffLimit"] == 5
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    assert pod_spec(job)["restartPolicy"] == "Never"  # podFailurePolicy requires it


def test_restricted_pod_security() -> None:
    job = build_job(ftj(), CFG)
    pod = pod_spec(job)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = trainer(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in trainer(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", trainer(job)["workingDir"]):
        assert "emptyDir" in volumes[mounts[path]], f"{path} must be writable with a read-only root"


def test_resources_gpus_and_defaults() -> None:
    job = build_job(ftj(resources={"gpus": 2, "memory": "64Gi"}), CFG)
    res = trainer(job)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "2"
    assert res["requests"]["memory"] == res["limits"]["memory"] == "64Gi"
    assert res["requests"]["cpu"] == CFG.default_cpu
    cpu_job = build_job(ftj(resources={"gpus": 0}), CFG)
    assert not any("gpu" in k for k in trainer(cpu_job)["resources"]["requests"])


def test_scheduling_merges_over_operator_defaults() -> None:
    job = build_job(
        ftj(
            nodeSelector={"pool": "a100"},
            tolerations=[{"key": "spot", "operator": "Exists"}],
            priorityClassName="training-low",
        ),
        CFG,
    )
    pod = pod_spec(job)
    assert pod["nodeSelector"] == {"gpu": "true", "pool": "a100"}
    assert pod["tolerations"] == [*CFG.default_tolerations, {"key": "spot", "operator": "Exists"}]
    assert pod["priorityClassName"] == "training-low"


def test_secrets_only_by_reference() -> None:
    ref = {"name": "hub", "key": "token"}
    job = build_job(
        ftj(
            model={"hub": "unsloth/Qwen3-8B", "tokenSecretRef": ref},
            export={"push": {"repo": "me/adapter", "tokenSecretRef": {"name": "push", "key": "t"}}},
            tracking={"type": "wandb", "apiKeySecretRef": {"name": "wandb", "key": "k"}},
        ),
        CFG,
    )
    env = {e["name"]: e for e in trainer(job)["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == ref
    assert env["HF_PUSH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "push", "key": "t"}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "k"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    for e in trainer(job)["env"]:
        if e["name"].startswith(("AWS_", "HF_TOKEN", "HF_PUSH", "WANDB")):
            assert "value" not in e, f"{e['name']} must come from a Secret"


def test_mlflow_credentials_only_by_reference() -> None:
    refs = {k: {"name": "mlflow", "key": k} for k in ("token", "user", "password")}
    tracking = {
        "type": "mlflow",
        "uri": "https://mlflow.example.com",
        "apiKeySecretRef": refs["token"],
        "usernameSecretRef": refs["user"],
        "passwordSecretRef": refs["password"],
    }
    env = {e["name"]: e for e in trainer(build_job(ftj(tracking=tracking), CFG))["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == refs["token"]
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == refs["user"]
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == refs["password"]
    assert "WANDB_API_KEY" not in env
    assert all("value" not in e for name, e in env.items() if name.startswith("MLFLOW_"))


def test_trainer_gets_the_whole_spec_with_storage_resolved() -> None:
    spec = {
        "template": {"type": "custom", "format": "Q: {q}\nA: {a}", "fields": {"q": "question"}},
        "lora": {"r": 8, "alpha": 32, "useRslora": True},
        "training": {"maxSteps": 12, "learningRate": 1e-4},
        "checkpoint": {"everySteps": 3, "gracePeriodSeconds": 40},
    }
    source = ftj(**spec)
    job = build_job(source, CFG)
    manifest = json.loads(job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_JOB_MANIFEST])
    for key, value in spec.items():
        assert manifest["spec"][key] == value
    assert manifest["spec"]["storage"]["uri"] == "s3://ckpts/base/team-a/qwen-medical"
    assert manifest["spec"]["storage"]["endpoint"] == "http://s3:9000"
    loaded = parse_job(manifest)  # the trainer's own reader accepts it
    assert (loaded.name, loaded.namespace) == ("qwen-medical", "team-a")
    assert loaded.spec.training.max_steps == 12
    assert pod_spec(job)["terminationGracePeriodSeconds"] == 40 + CFG.termination_grace_margin_seconds
    volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == "finetune")
    token = next(
        s["serviceAccountToken"] for s in volume["projected"]["sources"] if "serviceAccountToken" in s
    )
    assert token["audience"] == CFG.report_audience


def test_progress_reporting_env() -> None:
    env = {e["name"]: e.get("value") for e in trainer(build_job(ftj(), CFG))["env"]}
    assert env["FINETUNE_SUMMARY_PATH"] == "/dev/termination-log"
    assert env["FINETUNE_REPORT_URL"] == (
        "http://finetune-operator.system.svc:8081/v1/namespaces/team-a/finetunejobs/qwen-medical/progress"
    )
    assert env["FINETUNE_REPORT_TOKEN_FILE"].startswith("/etc/finetune/")


def test_cpu_threads_follow_the_cpu_request() -> None:
    container = trainer(build_job(ftj(resources={"gpus": 1, "cpu": "1500m"}), CFG))
    [omp] = [e for e in container["env"] if e["name"] == "OMP_NUM_THREADS"]
    ref = omp["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "trainer", "resource": "requests.cpu", "divisor": "1"}  # 2 threads
    assert container["resources"]["requests"]["cpu"] == "1500m"


def test_owner_reference_and_labels() -> None:
    job = build_job(ftj(), CFG)
    (ref,) = job["metadata"]["ownerReferences"]
    assert ref["uid"] == "uid-1234" and ref["controller"] is True and ref["blockOwnerDeletion"] is True
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "finetune-trainer"
        assert labels["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert labels["finetune.dev/job"] == "qwen-medical"
    assert is_owned_by(job, ftj())
    other = ftj()
    other["metadata"]["uid"] = "uid-of-an-earlier-namesake"
    assert not is_owned_by(job, other)


def test_deterministic_names_and_long_names() -> None:
    assert build_job(ftj(), CFG) == build_job(ftj(), CFG)
    assert build_job(ftj(), CFG)["metadata"]["name"] == "qwen-medical"
    long_a, long_b = "x" * 70 + "-a", "x" * 70 + "-b"
    name_a, name_b = job_name(long_a), job_name(long_b)
    assert len(name_a) <= 63 and len(name_b) <= 63 and name_a != name_b
    assert job_name(long_a) == name_a
    job = build_job(ftj(long_a), CFG)
    assert job["metadata"]["name"] == name_a
    assert len(job["metadata"]["labels"]["finetune.dev/job"]) <= 63


def test_suspend_and_kueue() -> None:
    assert build_job(ftj(), CFG)["spec"]["suspend"] is False
    assert build_job(ftj(suspend=True), CFG)["spec"]["suspend"] is True
    queued = build_job(ftj(queueName="gpu-queue"), CFG)
    assert queued["spec"]["suspend"] is True
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Kueue unsuspended it: the operator leaves suspend alone...
    admitted = {**queued, "spec": {**queued["spec"], "suspend": False}}
    assert job_spec_patch(ftj(queueName="gpu-queue"), admitted) is None
    # ...unless the user asks to suspend.
    assert job_spec_patch(ftj(queueName="gpu-queue", suspend=True), admitted) == {"spec": {"suspend": True}}


def test_platform_default_queue_and_priorities() -> None:
    cfg = CFG.model_copy(
        update={"kueue": CFG.kueue.model_copy(update={"default_queues": {"ml": "team-ml", "*": "shared"}})}
    )
    labels = lambda job: job["metadata"]["labels"]  # noqa: E731
    # The namespace's default queue, else the catch-all; the job's own queueName wins.
    other = build_job(ftj(), cfg)
    assert labels(other)["kueue.x-k8s.io/queue-name"] == "shared" and other["spec"]["suspend"] is True
    in_ml = ftj()
    in_ml["metadata"]["namespace"] = "ml"
    assert labels(build_job(in_ml, cfg))["kueue.x-k8s.io/queue-name"] == "team-ml"
    assert labels(build_job(ftj(queueName="mine"), cfg))["kueue.x-k8s.io/queue-name"] == "mine"
    # Without defaults nothing is queued.
    assert "kueue.x-k8s.io/queue-name" not in labels(build_job(ftj(), CFG))
    # A default-queued Job, admitted by Kueue: suspend stays Kueue's (the Job's label says so).
    admitted = {**other, "spec": {**other["spec"], "suspend": False}}
    assert job_spec_patch(ftj(), admitted) is None
    # Both priorities pass through: the pod's PriorityClass and Kueue's WorkloadPriorityClass.
    job = build_job(ftj(queueName="q", priorityClassName="high", workloadPriorityClassName="urgent"), CFG)
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "high"
    assert labels(job)["kueue.x-k8s.io/priority-class"] == "urgent"
    assert "kueue.x-k8s.io/priority-class" not in labels(build_job(ftj(queueName="q"), CFG))


def test_spec_patch_follows_suspend_and_deadline() -> None:
    job = build_job(ftj(), CFG)
    assert job_spec_patch(ftj(), job) is None
    assert job_spec_patch(ftj(suspend=True), job) == {"spec": {"suspend": True}}
    assert job_spec_patch(ftj(activeDeadlineSeconds=3600), job) == {"spec": {"activeDeadlineSeconds": 3600}}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"resources": {"gpus": 5}}, "spec.resources.gpus"),
        ({"model": {"hub": "evil/model"}}, "spec.model.hub"),
        ({"model": {"s3": "s3://elsewhere/m/"}}, "spec.model.s3"),
        ({"lora": {"r": 0}}, "spec.lora.r"),
    ],
)
def test_limits_refuse_naming_the_field(spec: dict, field: str) -> None:
    with pytest.raises(InvalidJobError) as e:
        build_job(ftj(**spec), CFG)
    assert e.value.field == field


def test_storage_required_somewhere() -> None:
    cfg = OperatorConfig()
    with pytest.raises(InvalidJobError) as e:
        build_job(ftj(), cfg)
    assert e.value.field == "spec.storage.uri"
    with pytest.raises(InvalidJobError) as e:
        build_job(ftj(storage={"uri": "s3://own-bucket/x"}), cfg)
    assert (e.value.field, e.value.reason) == ("spec.storage.uri", "NotAllowed")
    cfg = OperatorConfig.model_validate(
        {"policy": {"namespaces": {"team-a": {"storageUris": ["s3://own-bucket"]}}}}
    )
    job = build_job(ftj(storage={"uri": "s3://own-bucket/x"}), cfg)
    manifest = json.loads(job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_JOB_MANIFEST])
    assert manifest["spec"]["storage"]["uri"] == "s3://own-bucket/x/team-a/qwen-medical"


def test_secret_fields_name_the_spec_field_of_each_secret() -> None:
    job = {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
        "spec": {
            "model": {"hub": "unsloth/x", "tokenSecretRef": {"name": "hub", "key": "token"}},
            "data": {"hub": "o/d"},
        },
    }
    assert secret_fields(job, OperatorConfig()) == {
        "hub": "spec.model.tokenSecretRef",
        "finetune-s3": "the operator's storage.credentialsSecret",
    }


def test_multi_gpu_pod_gets_what_data_parallel_training_needs() -> None:
    job = build_job(ftj(resources={"gpus": 4, "cpu": "16"}), CFG)
    container, pod = trainer(job), pod_spec(job)
    env = {e["name"]: e for e in container["env"]}
    # One trainer process per GPU (finetune_trainer/launch.py reads it).
    assert env["FINETUNE_NPROC_PER_NODE"]["value"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # The requested CPUs shared among the 4 processes: 16 / 4 = 4 OpenMP threads each.
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": "4"}
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    # A memory-backed /dev/shm, bounded (the runtime's default is 64 MiB; NCCL needs more).
    [shm] = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "4096Mi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


@pytest.mark.parametrize(
    ("cpu", "gpus", "threads"),
    [("16", 4, "4"), ("6", 3, "2"), ("3", 2, "2"), ("1500m", 2, "1"), ("100m", 2, "1"), (None, 4, "1")],
)
def test_multi_gpu_threads_are_the_cpu_request_shared_and_rounded_up(
    cpu: str | None, gpus: int, threads: str
) -> None:
    # A literal: the API server refuses a resourceFieldRef divisor of a CPU request other than 1
    # and 1m (such a Job could never be created).
    resources: dict[str, object] = {"gpus": gpus} | ({"cpu": cpu} if cpu else {})
    env = {e["name"]: e for e in trainer(build_job(ftj(resources=resources), CFG))["env"]}
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": threads}


@pytest.mark.parametrize("gpus", [0, 1])
def test_single_gpu_and_cpu_pods_stay_one_process_without_shm(gpus: int) -> None:
    job = build_job(ftj(resources={"gpus": gpus}), CFG)
    names = {e["name"] for e in trainer(job)["env"]}
    assert "FINETUNE_NPROC_PER_NODE" not in names and "NCCL_DEBUG" not in names
    assert all(v["name"] != "shm" for v in pod_spec(job)["volumes"])


def test_several_mig_slices_are_refused_naming_the_field() -> None:
    spec = {"resources": {"gpus": 2, "gpuResource": "nvidia.com/mig-3g.40gb"}}
    with pytest.raises(InvalidJobError) as e:
        build_job(ftj(**spec), CFG)
    assert e.value.field.startswith("spec.resources")
    assert "gpus > 1 needs whole GPUs" in e.value.message
    build_job(ftj(resources={"gpus": 1, "gpuResource": "nvidia.com/mig-3g.40gb"}), CFG)  # one slice is fine
