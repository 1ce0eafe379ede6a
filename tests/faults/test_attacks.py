"""A hostile tenant against the operator and its progress endpoint, on the real API server: each
attack is refused, and the victim's status is what it was before.

Two groups:
- SPEC: a FineTuneJob naming what the platform does not allow (an image, a ServiceAccount, a
  storage prefix, an S3 source or endpoint). The operator fails it (reason NotAllowed, the field
  named) before any Job exists: no Job, no pod, nothing ran.
- PROGRESS: requests to the progress endpoint with real ServiceAccount tokens from the TokenRequest
  API, bound to real pods as the kubelet's projected tokens are (kwok runs the pods, so this test
  acts as their kubelet): a forged pod copying a training pod's labels, a replayed token of a
  finished pod, a report for a finished job, another job's pod, another namespace's pod, a
  checkpoint URI in another tenant's prefix, and a flood of garbage tokens. One legitimate report
  is accepted first, so the refusals are not the endpoint refusing everything.

Secrets a job names are checked by the chart's admission policy at apply (tests/integration/
test_chart_admission.py), not by the operator.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from e2e.harness import HOST_PROCESS_IMAGE
from faults.env import BASE_MODELS, DATASETS, KWOK_JOB, SUMMARY, FaultEnv, ftj, wait
from localkube import kwokpods
from localkube.rest import HttpError

pytestmark = pytest.mark.cluster

AUDIENCE = "finetune-operator"
FINISHED = ("Succeeded", "Failed")


# ---------------------------------------------------------------------------------------------
# the spec: refused before any Job exists


def spec_attacks(bucket: str, endpoint: str) -> dict[str, tuple[dict[str, Any], str, str]]:
    """case -> (spec fields, the field named, text of what is allowed)."""
    return {
        "foreign image": (
            {"image": "busybox:1.36"},
            "spec.image",
            HOST_PROCESS_IMAGE,  # the faults operator's defaultImage, the only one allowed
        ),
        "foreign ServiceAccount": ({"serviceAccountName": "admin"}, "spec.serviceAccountName", "default"),
        "storage in another namespace's prefix": (
            {"storage": {"uri": f"s3://{bucket}/jobs/team-b"}},
            "spec.storage.uri",
            f"s3://{bucket}/jobs",
        ),
        "storage in an unlisted bucket": (
            {"storage": {"uri": "s3://other-bucket/x"}},
            "spec.storage.uri",
            "not allowed",
        ),
        "model of another namespace": (
            {"model": {"s3": f"s3://{bucket}/jobs/team-b/merged/"}},
            "spec.model.s3",
            f"s3://{bucket}/{BASE_MODELS}/",
        ),
        "model in an unlisted bucket": (
            {"model": {"s3": "s3://other-bucket/m/"}},
            "spec.model.s3",
            "not under",
        ),
        "data outside the allowlist": (
            {"data": {"s3": f"s3://{bucket}/private/rows.jsonl"}},
            "spec.data.s3",
            f"s3://{bucket}/{DATASETS}/",
        ),
        "unlisted endpoint": (
            {"storage": {"endpoint": "http://203.0.113.9:9000"}},
            "spec.storage.endpoint",
            endpoint,
        ),
        "a credentials Secret of its own": (
            {"storage": {"credentialsSecret": "admin-keys"}},
            "spec.storage.credentialsSecret",
            "finetune-s3",
        ),
    }


@pytest.fixture(scope="module")
def refused(faults: FaultEnv, s3: Any) -> tuple[str, dict[str, tuple[dict[str, Any], str, str]]]:
    """Every SPEC attack at once in one namespace, as `attack-<i>`; the namespace and the table."""
    ns = faults.namespace("attack-spec")
    table = spec_attacks(s3.bucket, s3.endpoint_url)
    faults.create(
        ns, [ftj(f"attack-{i}", {**KWOK_JOB, **fields}) for i, (fields, _, _) in enumerate(table.values())]
    )
    wait("every attack Failed", lambda: faults.all_in(ns, "Failed", len(table)), 60)
    return ns, table


@pytest.mark.parametrize("case", list(spec_attacks("b", "e")))
def test_spec_attack_refused_before_any_pod(faults: FaultEnv, refused: Any, case: str) -> None:
    ns, table = refused
    i = list(table).index(case)
    _, field, allowed = table[case]
    status = faults.get(ns, f"attack-{i}")["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "NotAllowed")
    assert status["message"].startswith(f"{field}:") and allowed in status["message"], status["message"]
    assert status.get("jobName") is None and "progress" not in status and "startTime" not in status
    assert not [j for j in faults.jobs(ns) if j["metadata"]["name"] == f"attack-{i}"], "a Job was created"
    assert not [p for p in faults.pods(ns) if p["metadata"]["name"].startswith(f"attack-{i}-")]


def test_an_allowed_s3_source_is_not_refused(faults: FaultEnv, s3: Any) -> None:
    """The control: a base model under the listed prefix gets its Job."""
    ns = faults.namespace("attack-ok")
    faults.create(ns, [ftj("fine", {**KWOK_JOB, "model": {"s3": f"s3://{s3.bucket}/{BASE_MODELS}/qwen/"}})])
    wait("its Job", lambda: [j for j in faults.jobs(ns) if j["metadata"]["name"] == "fine"], 60)

    # The Job is created before the status that names it is written: wait for that status too.
    def phased() -> dict[str, Any] | None:
        status = faults.get(ns, "fine").get("status") or {}
        return status if status.get("phase") else None

    status = wait("its status", phased, 30)
    assert status["phase"] != "Failed", status


# ---------------------------------------------------------------------------------------------
# the progress endpoint


def bound_token(faults: FaultEnv, pod: dict[str, Any], audience: str = AUDIENCE) -> str:
    """A ServiceAccount token bound to `pod`, as the kubelet's projected token is (TokenRequest)."""
    meta = pod["metadata"]
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience],
            "expirationSeconds": 600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        },
    }
    sa = pod["spec"].get("serviceAccountName") or "default"
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token"
    return faults.rest.request("POST", path, request)["status"]["token"]


def post(faults: FaultEnv, ns: str, name: str, token: str, report: dict[str, Any]) -> tuple[int, str]:
    url = faults.operator.url("progress", f"/v1/namespaces/{ns}/finetunejobs/{name}/progress")
    request = urllib.request.Request(
        url,
        data=json.dumps(report).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


_sequence = iter(range(1, 1_000_000))


def report(step: int, **extra: Any) -> dict[str, Any]:
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "step": step,
        "totalSteps": 100,
        "phase": "Training",
        "reportedAt": stamp,
        "sequence": next(_sequence),
        **extra,
    }


def status_of(faults: FaultEnv, ns: str, name: str) -> dict[str, Any]:
    return faults.get(ns, name).get("status") or {}


REPORTED = ("progress", "checkpoint", "checkpoints")
"""What a progress report writes into status."""


def unchanged(
    faults: FaultEnv,
    ns: str,
    name: str,
    before: dict[str, Any],
    *,
    seconds: float = 3.0,
    keys: tuple[str, ...] = (*REPORTED, "phase"),
) -> None:
    """status's `keys` stay as `before` had them for `seconds` (more than the operator's status
    write interval of 1 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = status_of(faults, ns, name)
        for key in keys:
            assert now.get(key) == before.get(key), (key, before.get(key), now.get(key))
        time.sleep(0.5)


def running_pod(faults: FaultEnv, ns: str, name: str) -> dict[str, Any]:
    return wait(f"a running pod of {name}", lambda: faults.pod_of(ns, name), 60)


@pytest.fixture(scope="module")
def tenant(faults: FaultEnv, s3: Any) -> dict[str, Any]:
    """A namespace with a running job (`victim`) whose live pod reported step 5, a second running
    job (`other`), a job whose first pod was preempted and replaced (`replaced`), and a Succeeded
    job (`done`); plus a running job in a second namespace (`outsider`)."""
    ns = faults.namespace("tenant")
    foreign = faults.namespace("foreign")
    faults.create(ns, [ftj(n) for n in ("victim", "other", "replaced", "done")])
    faults.create(foreign, [ftj("outsider")])
    pods = {n: running_pod(faults, ns, n) for n in ("victim", "other", "replaced", "done")}
    outsider = running_pod(faults, foreign, "outsider")
    tokens = {n: bound_token(faults, p) for n, p in pods.items()}
    code, body = post(faults, ns, "victim", tokens["victim"], report(5))
    assert code == 202, body
    wait(
        "victim's step 5 in status",
        lambda: (status_of(faults, ns, "victim").get("progress") or {}).get("step") == 5,
        30,
    )

    kwokpods.preempt(faults.rest, pods["replaced"])
    wait(
        "a replacement pod",
        lambda: (
            (p := faults.pod_of(ns, "replaced")) is not None
            and p["metadata"]["uid"] != pods["replaced"]["metadata"]["uid"]
        ),
        60,
    )
    kwokpods.complete(faults.rest, pods["done"], SUMMARY)
    wait("done Succeeded", lambda: status_of(faults, ns, "done").get("phase") == "Succeeded", 60)
    return {
        "ns": ns,
        "foreign": foreign,
        "pods": pods,
        "tokens": tokens,
        "outsider": outsider,
        "bucket": s3.bucket,
    }


def test_the_live_pod_is_accepted(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """The control for everything below: the same endpoint accepts the job's own live pod."""
    ns = tenant["ns"]
    ckpt = {
        "uri": f"s3://{tenant['bucket']}/jobs/{ns}/victim/checkpoints/step-00000006/",
        "step": 6,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    code, body = post(faults, ns, "victim", tenant["tokens"]["victim"], report(6, checkpoint=ckpt))
    assert code == 202, body
    wait(
        "checkpoint 6 in status",
        lambda: (status_of(faults, ns, "victim").get("checkpoint") or {}).get("step") == 6,
        30,
    )


def forged_pod(
    faults: FaultEnv, ns: str, owner: str, owner_uid: str, labels: dict[str, str]
) -> dict[str, Any]:
    """A pod the tenant makes by hand (it never runs: no node matches)."""
    return faults.rest.request(
        "POST",
        f"/api/v1/namespaces/{ns}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"victim-{uuid.uuid4().hex[:5]}",
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": owner,
                        "uid": owner_uid,
                        "controller": True,
                    }
                ],
            },
            "spec": {
                "nodeSelector": {"nowhere": "true"},
                "containers": [{"name": "trainer", "image": "busybox:1.36"}],
            },
        },
    )


def victim_labels(tenant: dict[str, Any]) -> dict[str, str]:
    """Every label of the victim's training pod, the Job controller's (job-name, controller-uid)
    included: labels are anyone's to copy."""
    return dict(tenant["pods"]["victim"]["metadata"]["labels"])


def test_forged_pod_owned_by_a_decoy_job(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """A hand-made pod with all the victim pod's labels, controlled by a real Job the tenant made
    (so the garbage collector keeps it): its token is real and bound to it, and refused, because
    its controller is not, by uid, the Job the operator made."""
    ns = tenant["ns"]
    decoy = faults.rest.request(
        "POST",
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "decoy"},
            "spec": {
                "suspend": True,
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox:1.36"}]}
                },
            },
        },
    )
    pod = forged_pod(faults, ns, "decoy", decoy["metadata"]["uid"], victim_labels(tenant))
    before = status_of(faults, ns, "victim")
    code, body = post(faults, ns, "victim", bound_token(faults, pod), report(999))
    assert code == 403 and "does not belong to this job's Job" in body, (code, body)
    unchanged(faults, ns, "victim", before)


def test_forged_pod_naming_the_victims_job_with_a_fake_uid(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """The issue's attack: the victim Job's name with a made-up uid, posted at once (the garbage
    collector deletes such a pod soon, which revokes its token; until then only the uid check
    stands between it and the status)."""
    ns = tenant["ns"]
    pod = forged_pod(faults, ns, "victim", str(uuid.uuid4()), victim_labels(tenant))
    before = status_of(faults, ns, "victim")
    try:
        token = bound_token(faults, pod)
    except HttpError as e:
        pytest.skip(f"the garbage collector deleted the forged pod before a token was issued: {e}")
    code, body = post(faults, ns, "victim", token, report(998))
    assert code in (401, 403), (code, body)
    unchanged(faults, ns, "victim", before)


def test_replayed_token_of_a_preempted_pod(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """The first pod of `replaced` was preempted (Failed, still there); its token is still valid to
    the API server, and refused here: only the live pod reports."""
    ns = tenant["ns"]
    before = status_of(faults, ns, "replaced")
    code, body = post(faults, ns, "replaced", tenant["tokens"]["replaced"], report(500))
    assert code == 403 and "has finished" in body, (code, body)
    unchanged(faults, ns, "replaced", before)


def test_report_for_a_succeeded_job(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    ns = tenant["ns"]
    before = status_of(faults, ns, "done")
    assert before["phase"] == "Succeeded"
    code, body = post(faults, ns, "done", tenant["tokens"]["done"], report(1, phase="Training"))
    assert code == 403, (code, body)
    unchanged(faults, ns, "done", before)


def test_another_jobs_live_pod(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    ns = tenant["ns"]
    before = status_of(faults, ns, "victim")
    code, body = post(faults, ns, "victim", tenant["tokens"]["other"], report(997))
    assert code == 403 and "does not belong" in body, (code, body)
    unchanged(faults, ns, "victim", before)


def test_a_pod_of_another_namespace(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    ns = tenant["ns"]
    before = status_of(faults, ns, "victim")
    code, body = post(faults, ns, "victim", bound_token(faults, tenant["outsider"]), report(997))
    assert code == 401, (code, body)
    unchanged(faults, ns, "victim", before)


def test_a_token_bound_to_no_pod(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """A ServiceAccount token from the TokenRequest API without a bound pod (what anyone who may
    create tokens for the namespace's default ServiceAccount gets)."""
    ns = tenant["ns"]
    token = faults.rest.request(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts/default/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": [AUDIENCE]}},
    )["status"]["token"]
    before = status_of(faults, ns, "victim")
    code, body = post(faults, ns, "victim", token, report(996))
    assert code == 401, (code, body)
    unchanged(faults, ns, "victim", before)


def test_a_token_for_another_audience(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    ns = tenant["ns"]
    before = status_of(faults, ns, "victim")
    token = bound_token(faults, tenant["pods"]["victim"], audience="https://kubernetes.default.svc")
    code, body = post(faults, ns, "victim", token, report(995))
    assert code == 401, (code, body)
    unchanged(faults, ns, "victim", before)


@pytest.mark.parametrize(
    "where",
    ["checkpoint", "checkpoints", "bestCheckpoint"],
)
def test_a_uri_in_another_tenants_prefix(faults: FaultEnv, tenant: dict[str, Any], where: str) -> None:
    """The job's own live pod, claiming a checkpoint in the foreign namespace's prefix."""
    ns = tenant["ns"]
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    entry = {
        "uri": f"s3://{tenant['bucket']}/jobs/{tenant['foreign']}/outsider/checkpoints/step-00000050/",
        "step": 50,
        "time": stamp,
    }
    fields = {"checkpoint": entry, "checkpoints": [entry], "bestCheckpoint": entry}
    before = status_of(faults, ns, "victim")
    code, body = post(faults, ns, "victim", tenant["tokens"]["victim"], report(50, **{where: fields[where]}))
    assert code == 403 and "not under the job's storage prefix" in body, (code, body)
    unchanged(faults, ns, "victim", before)


def test_a_uri_escaping_the_prefix_with_dot_dot(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    ns = tenant["ns"]
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    uri = f"s3://{tenant['bucket']}/jobs/{ns}/victim/../../{tenant['foreign']}/outsider/checkpoints/step-00000051/"
    before = status_of(faults, ns, "victim")
    code, body = post(
        faults,
        ns,
        "victim",
        tenant["tokens"]["victim"],
        report(51, checkpoint={"uri": uri, "step": 51, "time": stamp}),
    )
    assert code == 403, (code, body)
    unchanged(faults, ns, "victim", before)


def test_a_flood_of_garbage_tokens_costs_few_token_reviews(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """300 distinct garbage tokens from one address as fast as possible: all refused, and the
    TokenReviews they cost bounded by the address's budget (burst 40 + 10/s), then the same garbage
    token again costs none (the negative verdict is cached). Last in the module: it spends this
    address's budget, so it waits for the budget to refill before returning."""
    ns = tenant["ns"]
    before = status_of(faults, ns, "victim")
    reviews = faults.metric("finetune_operator_token_reviews_total")
    start = time.monotonic()
    codes = [post(faults, ns, "victim", f"garbage-{uuid.uuid4().hex}", report(994))[0] for _ in range(300)]
    seconds = time.monotonic() - start
    made = faults.metric("finetune_operator_token_reviews_total") - reviews
    print(
        f"\n300 garbage tokens in {seconds:.1f}s: {codes.count(401)} x 401, {codes.count(429)} x 429,"
        f" {made:.0f} TokenReviews"
    )
    assert set(codes) <= {401, 429} and codes.count(429) > 0
    assert made <= 40 + 10 * seconds + 1
    time.sleep(5)  # the budget refills
    same = "garbage-repeated"
    assert post(faults, ns, "victim", same, report(993))[0] == 401
    reviews = faults.metric("finetune_operator_token_reviews_total")
    assert [post(faults, ns, "victim", same, report(993))[0] for _ in range(10)] == [401] * 10
    assert faults.metric("finetune_operator_token_reviews_total") == reviews
    unchanged(faults, ns, "victim", before)
    time.sleep(5)


def test_deleting_the_pod_revokes_its_token(faults: FaultEnv, tenant: dict[str, Any]) -> None:
    """The token of `other`'s pod once the pod is gone: the API server itself no longer accepts it
    (a bound token dies with its pod), so the cached verdict is of no use to an attacker either
    way: the endpoint refuses."""
    ns = tenant["ns"]
    pod = tenant["pods"]["other"]
    faults.rest.request(
        "DELETE", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}", {"gracePeriodSeconds": 0}
    )

    def gone() -> bool:
        try:
            faults.rest.request("GET", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
        except HttpError as e:
            return e.status == 404
        return False

    wait("the pod gone", gone, 60)
    before = status_of(faults, ns, "other")
    code, body = post(faults, ns, "other", tenant["tokens"]["other"], report(7))
    assert code in (401, 403), (code, body)
    # The phase moves on by itself here (the Job controller makes a new pod); the report's fields don't.
    unchanged(faults, ns, "other", copy.deepcopy(before), keys=REPORTED)
