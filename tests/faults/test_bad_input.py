"""Bad input, table-driven: every malformed FineTuneJob or trainer input ends in a refusal at
`kubectl apply` or in a Failed status with a reason and a message naming the problem, without a
crash loop, and no Secret's value ever shows in a status, an event or a log.

Three tables, by where the problem can first be seen:
- APPLY: the API server refuses the object (schema and CEL). These add to the 18 cases of
  tests/integration/test_crd_apiserver.py::INVALID (not repeated here).
- CLUSTER: only the operator or the pod can tell (operator limits, Secrets that do not exist, the
  trainer exiting 78); the job goes through the operator to Failed.
- TRAINER: only the data, the model or the storage can tell; the trainer runs its preflight (in
  this process: a cluster adds nothing), exits 78 with a summary naming the field, and that
  summary, as a pod's termination message, gives the Failed status the operator writes.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from faults.env import KWOK_JOB, FaultEnv, ftj, secret_values_in, wait
from finetune_operator.config import OperatorConfig
from finetune_operator.jobbuilder import build_job
from finetune_operator.status import derive_status
from finetune_trainer.errors import EXIT_CONFIG_ERROR
from localkube import kwokpods
from trainer_fixtures import job_manifest, write_job, write_jsonl
from trainer_runs import process_env, run_in_process

CANARY = f"canary-{uuid.uuid4().hex}"
"""The value of every Secret (and secret env var) in this module: it must appear nowhere."""


# ---------------------------------------------------------------------------------------------
# refused at apply

APPLY: dict[str, tuple[dict[str, Any], str, str]] = {
    "negative maxSteps": (
        {"training": {"maxSteps": -1}},
        "spec.training.maxSteps",
        "greater than or equal to 1",
    ),
    "dropout of 1": ({"lora": {"dropout": 1.0}}, "spec.lora.dropout", "less than 1"),
    "unknown quantization (capitals)": (
        {"export": {"gguf": ["Q8_0"]}},
        "spec.export.gguf[0]",
        "supported values",
    ),
    "unknown template type": ({"template": {"type": "llama3"}}, "spec.template.type", "supported values"),
    "unknown top-level field": ({"gpus": 1}, "spec.gpus", "unknown field"),
    "nodeSelector value not a string": ({"nodeSelector": {"pool": 1}}, "spec.nodeSelector.pool", "string"),
    "memory not a quantity": ({"resources": {"memory": "lots"}}, "spec.resources.memory", "should match"),
    "learning rate as text": (
        {"training": {"learningRate": "fast"}},
        "spec.training.learningRate",
        "must be of type number",
    ),
    "maxSeqLength too small": ({"model": {"maxSeqLength": 8}}, "spec.model.maxSeqLength", "64"),
    "storage URI of another scheme": (
        {"storage": {"uri": "ftp://host/x"}},
        "spec.storage.uri",
        "use s3://bucket/prefix",
    ),
    "storage URI as a relative path": (
        {"storage": {"uri": "./out"}},
        "spec.storage.uri",
        "an absolute path (/data/out or file:///data/out)",
    ),
}


@pytest.mark.cluster
@pytest.mark.parametrize(("patch", "field", "text"), APPLY.values(), ids=APPLY.keys())
def test_refused_at_apply(faults: FaultEnv, patch: dict[str, Any], field: str, text: str) -> None:
    spec = {**KWOK_JOB}
    for key, value in patch.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    result = faults.cluster.kubectl(
        "apply",
        "--validate=strict",
        "-n",
        "default",
        "-f",
        "-",
        input=yaml.safe_dump(ftj("bad", spec)),
        check=False,
    )
    assert result.returncode != 0, f"accepted: {patch}"
    assert field in result.stderr and text in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# through the operator to Failed

LOCAL = {"nodeSelector": {"type": "local"}, "resources": {"gpus": 0}}
"""Runs on the test kubelet's node: real processes, real Secret lookups."""


@dataclass(frozen=True)
class ClusterCase:
    spec: dict[str, Any]
    reason: str
    says: tuple[str, ...]
    s3_secret: bool = True
    extra_secret: dict[str, Any] | None = None
    pod_exit: tuple[int, str] | None = None
    """For a job on kwok: the pod exits with this code and termination message."""


TEMPLATE_SUMMARY = json.dumps(
    {
        "exitReason": "config-error",
        "message": "spec.template.fields: the data has no column 'Question' (columns: input, output)",
    }
)

HUB_TOKEN = {"name": "hub-token", "key": "token"}
CLUSTER: dict[str, ClusterCase] = {
    "more GPUs than the operator allows": ClusterCase(
        {**KWOK_JOB, "resources": {"gpus": 12}}, "InvalidSpec", ("spec.resources.gpus", "at most 8")
    ),
    "model source not allowed": ClusterCase(
        {**KWOK_JOB, "model": {"hub": "someone/model"}}, "InvalidSpec", ("spec.model.hub", "not an allowed")
    ),
    "S3 credentials Secret missing": ClusterCase(
        {**KWOK_JOB, **LOCAL},
        "SecretMissing",
        ("finetune-s3", "not found", "storage.credentialsSecret"),
        s3_secret=False,
    ),
    "hub token Secret missing": ClusterCase(
        {**KWOK_JOB, **LOCAL, "model": {"hub": "unsloth/Qwen3-8B", "tokenSecretRef": HUB_TOKEN}},
        "SecretMissing",
        ("hub-token", "spec.model.tokenSecretRef"),
    ),
    "key missing in the S3 Secret": ClusterCase(
        {**KWOK_JOB, **LOCAL, "storage": {"credentialsSecret": "partial-s3"}},
        "SecretMissing",
        ("AWS_SECRET_ACCESS_KEY", "partial-s3", "spec.storage.credentialsSecret"),
        extra_secret={"name": "partial-s3", "data": {"AWS_ACCESS_KEY_ID": CANARY}},
    ),
    "trainer exits 78: data file missing (the real trainer)": ClusterCase(
        {
            **KWOK_JOB,
            **LOCAL,
            "model": {"path": "/nonexistent/model"},
            "data": {"path": "/nonexistent/rows.jsonl"},
        },
        "ConfigError",
        ("spec.data.path", "no such file", "/nonexistent/rows.jsonl"),
    ),
    "trainer exits 78: template column missing (reported by the pod)": ClusterCase(
        KWOK_JOB, "ConfigError", ("spec.template.fields", "'Question'"), pod_exit=(78, TEMPLATE_SUMMARY)
    ),
}


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


@pytest.fixture(scope="module")
def cluster_cases(faults: FaultEnv) -> Iterator[dict[str, tuple[str, dict[str, Any]]]]:
    """Every CLUSTER case at once, each in its own namespace: case -> (namespace, final object)."""
    env = faults
    started: dict[str, str] = {}
    for i, (case, c) in enumerate(CLUSTER.items()):
        ns = env.namespace(f"bad-{i}")
        if c.s3_secret:
            env.rest.request(
                "POST",
                f"/api/v1/namespaces/{ns}/secrets",
                secret("finetune-s3", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": CANARY}),
            )
        if c.extra_secret:
            env.rest.request(
                "POST",
                f"/api/v1/namespaces/{ns}/secrets",
                secret(c.extra_secret["name"], c.extra_secret["data"]),
            )
        env.create(ns, [ftj("bad", c.spec)])
        started[case] = ns
    for case, c in CLUSTER.items():
        if c.pod_exit:
            pod = wait(f"{case}: a running pod", lambda ns=started[case]: env.pod_of(ns, "bad"), 60)
            kwokpods.fail(env.rest, pod, *c.pod_exit)
    final: dict[str, tuple[str, dict[str, Any]]] = {}
    deadline = time.monotonic() + 120
    for case, ns in started.items():
        obj = wait(
            f"{case}: Failed",
            lambda ns=ns: (o := env.get(ns, "bad")).get("status", {}).get("phase") == "Failed" and o,
            max(1.0, deadline - time.monotonic()),
        )
        final[case] = (ns, obj)
    time.sleep(3)  # a crash loop would show by now: more pods, a phase flapping back
    yield {case: (ns, env.get(ns, "bad")) for case, (ns, _) in final.items()}


@pytest.mark.cluster
@pytest.mark.parametrize("case", CLUSTER.keys())
def test_fails_through_the_operator(
    faults: FaultEnv, cluster_cases: dict[str, tuple[str, dict[str, Any]]], case: str
) -> None:
    ns, obj = cluster_cases[case]
    status = obj["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["status"] == "True"
    assert failed["reason"] == CLUSTER[case].reason, status["message"]
    for words in CLUSTER[case].says:
        assert words in status["message"], status["message"]
    # No crash loop: at most one pod ever, and no Job left running.
    assert len(faults.pods(ns)) <= 1
    for job in faults.jobs(ns):
        conditions = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions") or []}
        assert conditions.get("Failed") == "True" or job["metadata"].get("deletionTimestamp"), job["status"]
    events = faults.rest.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
    warnings = [
        e for e in events if e.get("type") == "Warning" and e["involvedObject"]["kind"] == "FineTuneJob"
    ]
    assert len(warnings) == 1 and CLUSTER[case].says[0] in warnings[0]["message"]


@pytest.mark.cluster
def test_no_secret_value_in_status_events_or_logs(
    faults: FaultEnv, cluster_cases: dict[str, tuple[str, dict[str, Any]]]
) -> None:
    texts = [faults.operator_log()]
    for ns, _ in cluster_cases.values():
        texts.append(json.dumps(faults.ftjs(ns)))
        texts.append(json.dumps(faults.rest.request("GET", f"/api/v1/namespaces/{ns}/events")))
        texts.append(json.dumps(faults.pods(ns)))
        for log in faults.cluster.kubelet.workdir.glob(f"pods/{ns}_*/**/*"):
            if log.is_file():
                texts.append(log.read_text(errors="replace"))
    assert secret_values_in("\n".join(texts), [CANARY]) == []


# ---------------------------------------------------------------------------------------------
# the trainer's preflight


@dataclass(frozen=True)
class TrainerCase:
    make: Callable[[Path, Path, Path, Any], dict[str, Any]]
    """(tmp, tiny model, alpaca rows, s3) -> the job manifest."""
    field: str
    text: str


def _job(model_path: Path, rows_path: Path, **sections: Any) -> dict[str, Any]:
    """A job that passes preflight but for what `sections` change (rows fit in 1024 tokens)."""
    sections.setdefault("model", {"path": str(model_path), "maxSeqLength": 1024})
    return job_manifest(model_path, rows_path, **sections)


def _rows_file(tmp: Path, name: str, content: str) -> Path:
    path = tmp / name
    path.write_text(content)
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _long_rows(tmp: Path) -> Path:
    rows = [{"instruction": "tell " * 200, "input": "", "output": "ok " * 100} for _ in range(8)]
    return write_jsonl(tmp / "long.jsonl", rows)


def _s3_job(s3: Any, model_path: Path, rows_path: Path, bucket: str = "", **sections: Any) -> dict[str, Any]:
    job = _job(model_path, rows_path, **sections)
    job["spec"]["storage"] = {"uri": f"s3://{bucket or s3.bucket}/bad-input", "endpoint": s3.endpoint_url}
    return job


TRAINER: dict[str, TrainerCase] = {
    "data file missing": TrainerCase(
        lambda t, m, r, s3: _job(m, t / "nope.jsonl"), "spec.data.path", "no such file"
    ),
    "data file empty": TrainerCase(
        lambda t, m, r, s3: _job(m, _rows_file(t, "empty.jsonl", "")), "spec.data.path", "is empty"
    ),
    "data set without rows": TrainerCase(
        lambda t, m, r, s3: _job(m, _rows_file(t, "none.json", "[]")), "spec.data.path", "has no rows"
    ),
    "split slice without rows": TrainerCase(
        lambda t, m, r, s3: _job(m, r, data={"path": str(r), "split": "train[5:5]"}),
        "spec.data",
        "has no rows",
    ),
    "malformed JSON lines": TrainerCase(
        lambda t, m, r, s3: _job(m, _rows_file(t, "bad.jsonl", '{"instruction": "a", "output": \n')),
        "spec.data.path",
        "is not valid JSON: line 1, column 32",
    ),
    "unknown data file extension": TrainerCase(
        lambda t, m, r, s3: _job(m, _rows_file(t, "rows.txt", "x\n")),
        "spec.data.format",
        "cannot tell the format",
    ),
    "template column missing": TrainerCase(
        lambda t, m, r, s3: _job(m, r, template={"type": "r1-reasoning"}),
        "spec.template.fields",
        "'Question'",
    ),
    "unknown field in a custom template": TrainerCase(
        lambda t, m, r, s3: _job(m, r, template={"type": "custom", "format": "Q: {question}\nA: {output}"}),
        "spec.template",
        "question",
    ),
    "every row longer than maxSeqLength": TrainerCase(
        lambda t, m, r, s3: _job(m, _long_rows(t), model={"path": str(m), "maxSeqLength": 64}),
        "spec.model.maxSeqLength",
        "every row is longer than 64 tokens",
    ),
    "model path does not exist": TrainerCase(
        lambda t, m, r, s3: _job(t / "no-model", r), "spec.model.path", "holds no saved model"
    ),
    "model path without a model": TrainerCase(
        lambda t, m, r, s3: _job(_empty_dir(t / "empty-model"), r), "spec.model.path", "no config.json"
    ),
    "model on S3 that does not exist": TrainerCase(
        lambda t, m, r, s3: _s3_job(
            s3, m, r, model={"s3": f"s3://{s3.bucket}/no-model/", "maxSeqLength": 128}
        ),
        "spec.model.s3",
        "holds no saved model",
    ),
    "data object on S3 that does not exist": TrainerCase(
        lambda t, m, r, s3: _s3_job(s3, m, r, data={"s3": f"s3://{s3.bucket}/no-such/rows.jsonl"}),
        "spec.data.s3",
        "no such object",
    ),
    "checkpoint bucket that does not exist": TrainerCase(
        lambda t, m, r, s3: _s3_job(s3, m, r, bucket="no-such-bucket-here"),
        "spec.storage.uri",
        "NoSuchBucket",
    ),
}


SECRETS = {"AWS_SECRET_ACCESS_KEY": CANARY, "HF_TOKEN": CANARY}
"""Secret values every trainer run here sees (moto accepts any key); none may show anywhere."""


def operator_status(manifest: dict[str, Any], summary: str) -> dict[str, Any]:
    """The status the operator writes when the job's pod exits 78 with `summary` as termination
    message and the Job fails by its podFailurePolicy."""
    obj = {**manifest, "metadata": {**manifest["metadata"], "namespace": "ns", "uid": "u", "generation": 1}}
    spec = manifest["spec"]
    storage = spec.get("storage") or {}
    # The platform that ran it: its storage and S3 sources are the ones this job names.
    cfg = OperatorConfig.model_validate(
        {
            "storage": {"uri": storage.get("uri") or "s3://b/p", "endpoint": storage.get("endpoint")},
            "policy": {
                "modelPrefixes": [u for u in [spec["model"].get("s3")] if u],
                "dataPrefixes": [u for u in [spec["data"].get("s3")] if u],
            },
        }
    )
    job = build_job(obj, cfg)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    job["status"] = {
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "lastTransitionTime": stamp}
        ]
    }
    pod = {
        "metadata": {"name": "bad-x", "uid": "p", "creationTimestamp": stamp},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": 78, "message": summary, "startedAt": stamp}},
                }
            ],
        },
    }
    return derive_status(obj, job, [pod], None, datetime.now(UTC))


@pytest.mark.parametrize("case", TRAINER.keys())
def test_trainer_preflight_exits_78_and_the_status_names_the_field(
    case: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    alpaca_jsonl: Path,
    s3: Any,
) -> None:
    c = TRAINER[case]
    manifest = c.make(tmp_path, tiny_model_dir, alpaca_jsonl, s3)
    manifest["metadata"]["name"] = "bad"
    started = time.monotonic()
    run = run_in_process(write_job(tmp_path / "job.yaml", manifest), tmp_path, logging.DEBUG, **SECRETS)
    took = time.monotonic() - started
    summary_text = (tmp_path / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert run.code == EXIT_CONFIG_ERROR, f"exit {run.code}: {summary.get('message')}"
    assert summary["exitReason"] == "config-error"
    assert summary["message"].startswith(c.field) and c.text in summary["message"], summary["message"]
    assert took < 30, f"preflight took {took:.0f}s"

    status = operator_status(manifest, summary_text)
    assert status["phase"] == "Failed"
    assert next(x for x in status["conditions"] if x["type"] == "Failed")["reason"] == "ConfigError"
    assert c.field in status["message"] and c.text in status["message"], status["message"]
    lines = [f"{r.levelname} {r.name}: {r.getMessage()} {getattr(r, 'fields', '')}" for r in run.records]
    assert secret_values_in("\n".join([summary_text, json.dumps(status), *lines]), [CANARY]) == []


MANIFEST = "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: bad}\n"
JOB_FILES: dict[str, tuple[str, str, str]] = {
    "not YAML": ("spec: [unclosed\n", "job", "not valid YAML"),
    "another kind": (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n",
        "apiVersion",
        "",
    ),
    "wrong type": (
        MANIFEST + "spec:\n  model: {hub: unsloth/x}\n  data: {hub: o/d}\n  lora: {r: sixteen}\n",
        "spec.lora.r",
        "integer",
    ),
    "unknown quantization": (
        MANIFEST + "spec:\n  model: {hub: unsloth/x}\n  data: {hub: o/d}\n  export: {gguf: [q2]}\n",
        "spec.export.gguf",
        "q8_0",
    ),
    "hub model that does not exist (offline)": (
        MANIFEST + "spec:\n  model: {hub: nobody-here/no-such-model}\n  data: {path: DATA}\n",
        "spec.model.hub",
        "nobody-here/no-such-model",
    ),
}


@pytest.mark.parametrize(("content", "field", "text"), JOB_FILES.values(), ids=JOB_FILES.keys())
def test_trainer_process_exits_78_with_a_summary(
    tmp_path: Path, alpaca_jsonl: Path, content: str, field: str, text: str
) -> None:
    """`python -m finetune_trainer run`, as in the pod. A bad job file only happens with mismatched
    versions (the operator writes it from a validated spec) or on a workstation; the summary must
    still name the field. The hub case needs a process: the hub's offline switch is read at import."""
    job = tmp_path / "job.yaml"
    job.write_text(content.replace("DATA", str(alpaca_jsonl)))
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "run", str(job), "--log-format", "json"],
        env=process_env(tmp_path, **SECRETS),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_CONFIG_ERROR, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exitReason"] == "config-error"
    assert field in summary["message"] and text in summary["message"], summary["message"]
    assert CANARY not in done.stderr + done.stdout
