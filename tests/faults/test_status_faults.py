"""Every accepted FineTuneJob ends in a state that says what to fix; no report freezes status.

Table-driven, on the fault tests' own API server and operator (faults.env); each row is an input,
where it is refused, the field and the words expected:
- APPLY: refused by the API server (schema, CEL) at `kubectl apply`; ACCEPTED: valid quantities
  the schema once refused.
- EDITS: changes to a created job: immutable fields refused by CEL transition rules, suspend and
  activeDeadlineSeconds accepted.
- OPERATOR: accepted by the API server, refused by the operator before any Job (format strings,
  the manifest's size) or by the API server's Job validation (422), ending Failed/InvalidSpec
  naming the spec field within one resync.
- PODS: the Job exists but cannot make pods (PriorityClass, ServiceAccount, quota): Pending with
  the reason while it waits, Failed after the operator's podCreateGraceSeconds.
- REPORTS: poisoned progress reports to the operator's real endpoint (with a real pod-bound
  token): 400 naming the field, status moving on with the next good report and with suspend.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest
from faults.env import KWOK_JOB, POD_CREATE_GRACE_SECONDS, RESYNC_SECONDS, FaultEnv, ftj, wait

ONE_RESYNC = RESYNC_SECONDS + 10  # a resync period, and the reconcile it starts


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def apply(env: FaultEnv, ns: str, obj: dict[str, Any], *extra: str) -> Any:
    # JSON, so that a string such as "1e9" stays a string: PyYAML writes it bare, and kubectl's YAML
    # 1.2 reader takes a bare 1e9 for a number.
    return env.cluster.kubectl(
        "apply", "--validate=strict", *extra, "-n", ns, "-f", "-", input=json.dumps(obj), check=False
    )


# ---------------------------------------------------------------------------------------------
# refused at apply

APPLY: dict[str, tuple[dict[str, Any], str, str]] = {
    "nodeSelector key with a space": ({"nodeSelector": {"bad key": "x"}}, "spec.nodeSelector", "label key"),
    "nodeSelector key with two slashes": ({"nodeSelector": {"a/b/c": "x"}}, "spec.nodeSelector", "label key"),
    "nodeSelector value with a space": (
        {"nodeSelector": {"pool": "a b"}},
        "spec.nodeSelector.pool",
        "should match",
    ),
    "toleration Exists with a value": (
        {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        "spec.tolerations[0].value",
        "value must be empty with operator Exists",
    ),
    "toleration Equal without a key": (
        {"tolerations": [{"operator": "Equal", "value": "v"}]},
        "spec.tolerations[0].key",
        "key is required",
    ),
    "tolerationSeconds without NoExecute": (
        {"tolerations": [{"key": "k", "operator": "Exists", "tolerationSeconds": 5}]},
        "spec.tolerations[0].tolerationSeconds",
        "only for effect NoExecute",
    ),
    "toleration key not a label key": (
        {"tolerations": [{"key": "bad key", "operator": "Exists"}]},
        "spec.tolerations[0].key",
        "should match",
    ),
    "gpuResource memory": (
        {"resources": {"gpuResource": "memory"}},
        "spec.resources.gpuResource",
        "should match",
    ),
    "gpuResource cpu": ({"resources": {"gpuResource": "cpu"}}, "spec.resources.gpuResource", "should match"),
    "gpuResource in kubernetes.io": (
        {"resources": {"gpuResource": "kubernetes.io/gpu"}},
        "spec.resources.gpuResource",
        "extended resource",
    ),
    "memory 0": ({"resources": {"memory": "0"}}, "spec.resources.memory", "above 0"),
    "cpu 0": ({"resources": {"cpu": "0"}}, "spec.resources.cpu", "above 0"),
    "cpu 0m": ({"resources": {"cpu": "0m"}}, "spec.resources.cpu", "above 0"),
    "negative memory": ({"resources": {"memory": "-1Gi"}}, "spec.resources.memory", "should match"),
    "memory with a bad suffix": ({"resources": {"memory": "1Xi"}}, "spec.resources.memory", "should match"),
    "serviceAccountName with capitals": (
        {"serviceAccountName": "Trainer"},
        "spec.serviceAccountName",
        "should match",
    ),
    "priorityClassName with an underscore": (
        {"priorityClassName": "high_prio"},
        "spec.priorityClassName",
        "should match",
    ),
    "seed 2**40": ({"training": {"seed": 2**40}}, "spec.training.seed", "4294967295"),
    "lora randomState 2**40": ({"lora": {"randomState": 2**40}}, "spec.lora.randomState", "4294967295"),
    "model hub id ..": ({"model": {"hub": ".."}}, "spec.model.hub", "`.` and `..` are not names"),
    "data hub id ../etc": (
        {"data": {"hub": "../etc", "split": "train"}},
        "spec.data.hub",
        "`.` and `..` are not names",
    ),
    "data hub id owner/..": ({"data": {"hub": "owner/.."}}, "spec.data.hub", "`.` and `..` are not names"),
    "split slice with a step": ({"data": {"split": "train[::-1]"}}, "spec.data.split", "should match"),
    "split with empty brackets": ({"data": {"split": "train[]"}}, "spec.data.split", "should match"),
    "maxNonFiniteSteps 0": (
        {"training": {"maxNonFiniteSteps": 0}},
        "spec.training.maxNonFiniteSteps",
        "greater than or equal to 1",
    ),
}


@pytest.mark.cluster
@pytest.mark.parametrize(("patch", "field", "text"), APPLY.values(), ids=APPLY.keys())
def test_refused_at_apply(faults: FaultEnv, patch: dict[str, Any], field: str, text: str) -> None:
    result = apply(faults, "default", ftj("bad", merged(KWOK_JOB, patch)), "--dry-run=server")
    assert result.returncode != 0, f"accepted: {patch}"
    assert field in result.stderr and text in result.stderr, result.stderr


ACCEPTED: dict[str, dict[str, Any]] = {
    "memory 1Ei": {"resources": {"memory": "1Ei"}},
    "cpu 1e9": {"resources": {"cpu": "1e9"}},
    "cpu 500m and memory 0.5Gi": {"resources": {"cpu": "500m", "memory": "0.5Gi"}},
    "split train[-100:]": {"data": {"split": "train[-100:]"}},
    "split train[:10%]": {"data": {"split": "train[:10%]"}},
    "gpuResource amd.com/gpu": {"resources": {"gpuResource": "amd.com/gpu"}},
    "toleration Exists without key": {"tolerations": [{"operator": "Exists"}]},
}


@pytest.mark.cluster
@pytest.mark.parametrize("patch", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_valid_values_are_accepted(faults: FaultEnv, patch: dict[str, Any]) -> None:
    result = apply(faults, "default", ftj("good", merged(KWOK_JOB, patch)), "--dry-run=server")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# edits of a created job

EDITS: dict[str, tuple[dict[str, Any], str | None]] = {
    "image": ({"image": "other:1"}, "spec.image"),
    "resources.memory": ({"resources": {"memory": "16Gi"}}, "spec.resources"),
    "resources.gpus": ({"resources": {"gpus": 12}}, "spec.resources"),
    "storage": ({"storage": {"uri": "s3://other-bucket/x"}}, "spec.storage"),
    "export": ({"export": {"gguf": ["f16"]}}, "spec.export"),
    "checkpoint": ({"checkpoint": {"everySteps": 5}}, "spec.checkpoint"),
    "samples": ({"samples": {"prompts": ["hi"]}}, "spec.samples"),
    "nodeSelector": ({"nodeSelector": {"pool": "b"}}, "spec.nodeSelector"),
    "tolerations": ({"tolerations": [{"operator": "Exists"}]}, "spec.tolerations"),
    "priorityClassName": ({"priorityClassName": "high"}, "spec.priorityClassName"),
    "suspend": ({"suspend": True}, None),
    "activeDeadlineSeconds": ({"activeDeadlineSeconds": 7200}, None),
}


@pytest.fixture(scope="module")
def edit_ns(faults: FaultEnv) -> str:
    return faults.namespace("edits")


@pytest.mark.cluster
@pytest.mark.parametrize(("patch", "field"), EDITS.values(), ids=EDITS.keys())
def test_edits(faults: FaultEnv, edit_ns: str, patch: dict[str, Any], field: str | None) -> None:
    name = f"edit-{abs(hash(json.dumps(patch, sort_keys=True))) % 10**8}"
    assert apply(faults, edit_ns, ftj(name, KWOK_JOB)).returncode == 0
    result = apply(faults, edit_ns, ftj(name, merged(KWOK_JOB, patch)))
    if field is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"edit accepted: {patch}"
    assert field in result.stderr and "is immutable" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# accepted, refused by the operator or the Job's validation: Failed (InvalidSpec) naming the field

BIG_PROMPTS = {"samples": {"prompts": ["x" * 8192] * 32}, "template": {"systemPrompt": "y" * 16384}}
OPERATOR: dict[str, tuple[dict[str, Any], str, str]] = {
    "format with attribute access": (
        {"template": {"type": "custom", "format": "Q: {row.question}"}},
        "spec.template",
        "no positions, indexes or attributes",
    ),
    "format with index access": (
        {"template": {"type": "custom", "format": "Q: {row[0]}"}},
        "spec.template",
        "no positions, indexes or attributes",
    ),
    "format with unbalanced braces": (
        {"template": {"type": "custom", "format": "Q: {question"}},
        "spec.template",
        "not a valid format string",
    ),
    "format without placeholders": (
        {"template": {"type": "custom", "format": "just text"}},
        "spec.template",
        "at least one {placeholder}",
    ),
    "fields naming no placeholder": (
        {"template": {"type": "custom", "format": "Q: {q}", "fields": {"answer": "output"}}},
        "spec.template",
        "answer is not a placeholder",
    ),
    "manifest over the annotation limit": (BIG_PROMPTS, "spec:", "Kubernetes allows"),
}


@pytest.fixture(scope="module")
def operator_cases(faults: FaultEnv) -> dict[str, tuple[str, float]]:
    """Every OPERATOR case created at once: case -> (namespace, seconds to Failed)."""
    created: dict[str, tuple[str, float]] = {}
    for i, (case, (patch, _, _)) in enumerate(OPERATOR.items()):
        ns = faults.namespace(f"op-{i}")
        faults.create(ns, [ftj("bad", merged(KWOK_JOB, patch))])
        created[case] = (ns, time.monotonic())
    done: dict[str, tuple[str, float]] = {}
    for case, (ns, started) in created.items():
        wait(f"{case}: Failed", lambda ns=ns: faults.phases(ns).get("bad") == "Failed", ONE_RESYNC)
        done[case] = (ns, time.monotonic() - started)
    return done


@pytest.mark.cluster
@pytest.mark.parametrize("case", OPERATOR.keys())
def test_refused_by_the_operator(
    faults: FaultEnv, operator_cases: dict[str, tuple[str, float]], case: str
) -> None:
    _, field, text = OPERATOR[case]
    ns, seconds = operator_cases[case]
    status = faults.get(ns, "bad")["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec", status
    assert field in status["message"] and text in status["message"], status["message"]
    assert seconds <= ONE_RESYNC
    assert faults.jobs(ns) == []  # refused before a Job, or the Job never got made


# ---------------------------------------------------------------------------------------------
# the Job cannot make pods


def _quota(name: str, hard: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}}


PODS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, str, str]] = {
    "PriorityClass missing": (
        {"priorityClassName": "no-such-class"},
        None,
        "PriorityClassNotFound",
        "spec.priorityClassName",
    ),
    "ServiceAccount missing": (
        {"serviceAccountName": "no-such-sa"},
        None,
        "ServiceAccountNotFound",
        "spec.serviceAccountName",
    ),
    "quota of pods exhausted": ({}, _quota("no-pods", {"pods": "0"}), "QuotaExceeded", "spec.resources"),
    # A quota on the GPU names the extended resource's requests (quotas take no limits of one);
    # the job asks for one GPU, the default.
    "quota of GPUs exhausted": (
        {},
        _quota("no-gpus", {"requests.nvidia.com/gpu": "0"}),
        "QuotaExceeded",
        "spec.resources",
    ),
    "quota of GPUs too small": (
        {"resources": {"gpus": 2}},
        _quota("one-gpu", {"requests.nvidia.com/gpu": "1"}),
        "QuotaExceeded",
        "spec.resources",
    ),
}


@pytest.fixture(scope="module")
def pod_cases(faults: FaultEnv) -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """case -> (namespace, status while waiting, final status)."""
    created: dict[str, str] = {}
    for i, (case, (patch, quota, _, _)) in enumerate(PODS.items()):
        ns = faults.namespace(f"pods-{i}")
        if quota:
            faults.rest.request("POST", f"/api/v1/namespaces/{ns}/resourcequotas", quota)
        faults.create(ns, [ftj("stuck", merged(KWOK_JOB, patch))])
        created[case] = ns
    out: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {}
    for case, ns in created.items():
        reason = PODS[case][2]

        def waiting(ns: str = ns, reason: str = reason) -> dict[str, Any] | None:
            status = faults.get(ns, "stuck").get("status") or {}
            conditions = status.get("conditions") or [{}]
            return status if conditions[0].get("reason") == reason else None

        try:
            first = wait(f"{case}: waiting with reason {reason}", waiting, ONE_RESYNC + 10)
        except AssertionError as e:
            events = faults.rest.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
            seen = [(ev.get("reason"), ev.get("message")) for ev in events]
            status = faults.get(ns, "stuck").get("status")
            raise AssertionError(f"{e}; status {status}; the namespace's events {seen}") from None
        out[case] = (ns, first, {})
    for case, (ns, first, _) in out.items():
        final = wait(
            f"{case}: Failed",
            lambda ns=ns: (s := faults.get(ns, "stuck").get("status") or {}).get("phase") == "Failed" and s,
            POD_CREATE_GRACE_SECONDS + ONE_RESYNC + 10,
        )
        out[case] = (ns, first, final)
    # A resync after the last one failed: time for a failed job to come back to life, if it could
    # (the tests below count the Jobs made).
    time.sleep(ONE_RESYNC)
    return out


@pytest.mark.cluster
@pytest.mark.parametrize("case", PODS.keys())
def test_pods_that_cannot_be_created(
    faults: FaultEnv, pod_cases: dict[str, tuple[str, dict[str, Any], dict[str, Any]]], case: str
) -> None:
    _, _, reason, field = PODS[case]
    ns, first, final = pod_cases[case]
    assert field in first["message"] and "fails if this lasts" in first["message"], first
    failed = next(c for c in final["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == reason and field in final["message"], final
    try:
        wait("the Job deleted", lambda: faults.jobs(ns) == [], 30)
    except AssertionError as e:
        lines = [line for line in faults.operator_log().splitlines() if ns in line]
        raise AssertionError(f"{e}; the operator's lines about {ns}: {lines[-20:]}") from None
    # Failed stays Failed: one Job only, never a second after the first was deleted (a reconcile
    # seeing the deleted Job still in its cache once read it as Pending, then made a new one).
    lines = [line for line in faults.operator_log().splitlines() if ns in line]
    assert sum("created Job" in line for line in lines) == 1, lines[-20:]
    assert not any("phase Failed ->" in line for line in lines), lines[-20:]
    assert faults.get(ns, "stuck")["status"]["phase"] == "Failed"


@pytest.mark.cluster
def test_a_job_create_refused_by_quota_waits_with_backoff_and_a_bounded_log(faults: FaultEnv) -> None:
    """A quota of 0 Jobs: the create is refused (403) on every try, forever. Status says why at
    once; the operator retries with backoff and logs the error once. Measured over 90 s."""
    ns = faults.namespace("no-jobs")
    faults.rest.request(
        "POST", f"/api/v1/namespaces/{ns}/resourcequotas", _quota("no-jobs", {"count/jobs.batch": "0"})
    )
    errors_before = faults.metric("finetune_operator_reconcile_errors_total")
    lines_before = len(faults.operator_log().splitlines())
    faults.create(ns, [ftj("refused", KWOK_JOB)])
    status = wait(
        "Pending, JobCreateRefused",
        lambda: (
            (s := faults.get(ns, "refused").get("status") or {}).get("phase") == "Pending"
            and (s.get("conditions") or [{}])[0].get("reason") == "JobCreateRefused"
            and s
        ),
        ONE_RESYNC,
    )
    assert "exceeded quota" in status["message"] and "metadata.namespace" in status["message"], status
    window = 90.0
    time.sleep(window)
    lines = [line for line in faults.operator_log().splitlines()[lines_before:] if ns in line]
    retries = faults.metric("finetune_operator_reconcile_errors_total") - errors_before
    # With the backoff (1, 2, 4, ... s, at most reconcileBackoffMaxSeconds=300): 7 tries in the
    # first 90 s, then one each 5 minutes: ~18 an hour, each logged only when its error changes.
    per_hour = len(lines) + max(0.0, (3600 - window) / 300)
    print(
        f"\nquota-refused job: {len(lines)} log lines and {retries:.0f} retries in {window:.0f}s; "
        f"at most {per_hour:.0f} lines an hour"
    )
    # Without backoff it would retry about once a second (90); with it 7 in 90 s, a few more when
    # watch events land while two CPUs are busy.
    assert retries <= 12, retries
    assert len(lines) <= 3, lines


# ---------------------------------------------------------------------------------------------
# poisoned progress reports


def now_text() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


REPORTS: dict[str, tuple[dict[str, Any] | bytes, str, str]] = {
    "NaN loss": ({"loss": float("nan")}, "loss", "finite"),
    "Infinity loss": ({"loss": float("inf")}, "loss", "finite"),
    "-Infinity learning rate": ({"learningRate": float("-inf")}, "learningRate", "finite"),
    "step 2**70": ({"step": 2**70}, "step", "less than or equal"),
    "true as a step": ({"step": True}, "step", "valid integer"),
    "string totalSteps": ({"totalSteps": "60"}, "totalSteps", "valid integer"),
    "5,000-character phase": ({"phase": "P" * 5000}, "phase", "should match"),
    "reportedAt 9999-12-31": ({"reportedAt": "9999-12-31T00:00:00Z"}, "reportedAt", "clock"),
    "reportedAt without a zone": ({"reportedAt": "2026-01-01T00:00:00"}, "reportedAt", "timezone"),
    "step beyond totalSteps": ({"step": 61, "totalSteps": 60}, "step", "beyond totalSteps"),
    "negative tokens": ({"tokens": -1}, "tokens", "greater than or equal"),
    "token accuracy 1.5": ({"evalTokenAccuracy": 1.5}, "evalTokenAccuracy", "less than or equal"),
    "checkpoint step as text": (
        {"checkpoint": {"uri": "s3://b/k", "step": "10", "time": "2026-01-01T00:00:00Z"}},
        "checkpoint.step",
        "valid integer",
    ),
    "eleven checkpoints": (
        {"checkpoints": [{"step": i, "uri": f"s3://b/{i}"} for i in range(11)]},
        "checkpoints",
        "at most 10",
    ),
    "four samples": ({"samples": [{"prompt": "p"}] * 4}, "samples", "at most 3"),
    "sample of 5,000 characters": ({"samples": [{"after": "a" * 5000}]}, "samples.0.after", "at most 200"),
    "a list as the body": (b"[1, 2]", "body", "object"),
    "not JSON": (b"{step: 1", "body", "Invalid JSON"),
    "no sequence": ({"sequence": None}, "sequence", "valid integer"),
}


class Trainer:
    """Posts reports as the job's pod would: to the operator's endpoint, with a token bound to the
    running kwok pod (TokenRequest, audience finetune-operator)."""

    def __init__(self, env: FaultEnv, ns: str, name: str) -> None:
        self.env, self.ns, self.name = env, ns, name
        self.pod = wait("a running pod", lambda: env.pod_of(ns, name), 60)
        meta = self.pod["metadata"]
        spec = {
            "audiences": ["finetune-operator"],
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
        }
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        self.token = env.rest.request(
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )["status"]["token"]
        self.sequence = 0

    def good(self, step: int) -> dict[str, Any]:
        self.sequence += 1
        return {
            "phase": "Training",
            "step": step,
            "totalSteps": 60,
            "loss": 1.25,
            "sequence": self.sequence,
            "reportedAt": now_text(),
        }

    def post(self, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN as the old trainer sent
        url = self.env.operator.url("progress", f"/v1/namespaces/{self.ns}/finetunejobs/{self.name}/progress")
        request = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def progress(self) -> dict[str, Any]:
        return (self.env.get(self.ns, self.name).get("status") or {}).get("progress") or {}


@pytest.fixture(scope="module")
def trainer(faults: FaultEnv) -> Trainer:
    ns = faults.namespace("reports")
    faults.create(ns, [ftj("rep", KWOK_JOB)])
    trainer = Trainer(faults, ns, "rep")
    code, _ = trainer.post(trainer.good(3))
    assert code == 202
    wait("step 3 in status", lambda: trainer.progress().get("step") == 3, 15)
    return trainer


@pytest.mark.cluster
@pytest.mark.parametrize(("change", "field", "text"), REPORTS.values(), ids=REPORTS.keys())
def test_poisoned_report_is_refused_naming_the_field(
    trainer: Trainer, change: dict[str, Any] | bytes, field: str, text: str
) -> None:
    body = change if isinstance(change, bytes) else {**trainer.good(4), **change}
    code, answer = trainer.post(body)
    assert code == 400, answer
    assert answer.get("field") == field and text in answer["error"], answer
    assert trainer.progress().get("step") == 3  # touched nothing


@pytest.mark.cluster
def test_status_moves_on_after_poison_with_the_next_report_and_with_suspend(
    faults: FaultEnv, trainer: Trainer
) -> None:
    for _ in range(3):  # the same bad report again and again: logged once
        trainer.post({**trainer.good(4), "loss": float("nan")})
    code, _ = trainer.post(trainer.good(7))
    assert code == 202
    wait("step 7 in status", lambda: trainer.progress().get("step") == 7, 15)
    refusals = [
        line
        for line in faults.operator_log().splitlines()
        if "progress report refused" in line and trainer.ns in line
    ]
    assert len([line for line in refusals if '"field": "loss"' in line]) == 1, refusals
    # Logged once per job and field: cases that break the same field share one line.
    assert len(refusals) == len({field for _, field, _ in REPORTS.values()}), refusals
    # A future updatedAt already in status (written before reports were checked) holds nothing back.
    faults.patch_status(trainer.ns, "rep", {"progress": {"updatedAt": "9999-12-31T00:00:00Z"}})
    trainer.post(trainer.good(9))
    wait("step 9 in status despite the future updatedAt", lambda: trainer.progress().get("step") == 9, 15)
    # And suspend still works: the phase follows.
    faults.rest.request(
        "PATCH",
        f"/apis/finetune.dev/v1alpha1/namespaces/{trainer.ns}/finetunejobs/rep",
        {"spec": {"suspend": True}},
        content_type="application/merge-patch+json",
    )
    wait("Suspended", lambda: faults.phases(trainer.ns).get("rep") == "Suspended", ONE_RESYNC)
