"""The generated CRD on a real kube-apiserver: installed with the built kubectl, explained with our
descriptions, examples accepted, invalid jobs refused at `kubectl apply` with the field named.

Every refusal here happens before any controller runs: schema, CEL and transition rules are the API
server's own, generated from the pydantic models (crds/ is `python -m finetune_operator crds`).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api import FineTuneJobSpec
from finetune_trainer.errors import ConfigError
from finetune_trainer.jobfile import parse_job
from kubernetes import client

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"

MINIMAL: dict[str, Any] = {
    "model": {"hub": "unsloth/Qwen3-8B"},
    "data": {"hub": "FreedomIntelligence/medical-o1-reasoning-SFT", "config": "zh", "split": "train[0:500]"},
}


DROP = "<drop>"
"""A patch value that deletes the key (None stays: it is an explicit null on the wire)."""


def manifest(name: str, patch: dict[str, Any] | None = None) -> dict[str, Any]:
    """A FineTuneJob with the minimal spec and `patch` merged in."""

    def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value == DROP:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": merge(MINIMAL, patch or {}),
    }


@pytest.fixture(scope="module")
def kube(cluster: Any) -> Any:
    """The cluster with the CRD applied and Established, and its OpenAPI published."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.finetune.dev")
    # The aggregated OpenAPI (what explain reads) follows the CRD by a moment.
    deadline = time.monotonic() + 60
    while cluster.kubectl("explain", "ftj.spec", check=False).returncode != 0:
        assert time.monotonic() < deadline, "kubectl explain ftj.spec never succeeded"
        time.sleep(0.5)
    return cluster


def apply(kube: Any, obj: dict[str, Any], *extra: str) -> Any:
    return kube.kubectl(
        "apply",
        "--validate=strict",
        "-n",
        kube.namespace,
        "-f",
        "-",
        *extra,
        input=yaml.safe_dump(obj),
        check=False,
    )


def test_explain_prints_the_model_docstrings(kube: Any) -> None:
    spec = kube.kubectl("explain", "ftj.spec").stdout
    assert "Desired state of a FineTuneJob" in spec
    assert "lora <Object> LoRA adapter shape (PEFT)." in " ".join(spec.split())
    r = " ".join(kube.kubectl("explain", "ftj.spec.lora.r").stdout.split())
    assert "FIELD: r <integer>" in r
    assert "Rank of the low-rank update." in r
    batch = " ".join(kube.kubectl("explain", "ftj.spec.training.batchSize").stdout.split())
    assert "FIELD: batchSize <integer>" in batch and "microBatches: auto" in batch


def explain(kube: Any, field: str) -> str:
    return " ".join(kube.kubectl("explain", f"ftj.{field}").stdout.split())


@pytest.mark.parametrize(
    ("field", "facts"),
    [
        ("spec.model.maxSeqLength", "Default `2048`; >= 64, <= 131072."),
        ("spec.lora.r", "Default `16`; >= 1, <= 1024."),
        ("spec.model.hub", "Length >= 1; length <= 256;"),
        ("spec.training.learningRate", "Default `0.0002`; > 0"),
        ("spec.checkpoint.everySteps", "null allowed"),
    ],
)
def test_explain_shows_defaults_and_ranges(kube: Any, field: str, facts: str) -> None:
    assert facts in explain(kube, field)


def _objects(node: dict[str, Any], path: str) -> list[str]:
    found = []
    for name, prop in node.get("properties", {}).items():
        item = prop.get("items", prop)
        if "properties" in item:
            found += [f"{path}.{name}", *_objects(item, f"{path}.{name}")]
    return found


def test_explain_descriptions_do_not_repeat_themselves(kube: Any) -> None:
    """Each object field's DESCRIPTION, as kubectl prints it: no paragraph restating another."""
    root = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = _objects(root["properties"]["spec"], "spec") + _objects(root["properties"]["status"], "status")
    assert len(fields) > 20
    for field in fields:
        out = kube.kubectl("explain", f"ftj.{field}").stdout
        description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0]
        paragraphs = [" ".join(p.split()).lower() for p in description.split("\n\n") if p.strip()]
        for i, a in enumerate(paragraphs):
            for b in paragraphs[i + 1 :]:
                words_a, words_b = set(a.rstrip(".").split()), set(b.rstrip(".").split())
                overlap = len(words_a & words_b) / min(len(words_a), len(words_b))
                assert overlap < 0.6, f"{field}: {a!r} restates {b!r}"


def examples() -> list[Path]:
    found = sorted(p for p in (REPO / "examples").rglob("*.yaml") if "FineTuneJob" in p.read_text())
    assert found, "examples/ holds no FineTuneJob"
    return found


@pytest.mark.parametrize("path", examples(), ids=lambda p: str(p.relative_to(REPO)))
def test_examples_are_accepted(kube: Any, path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "FineTuneJob":
            result = apply(kube, doc, "--dry-run=server")
            assert result.returncode == 0, result.stderr


# name -> (patch, field the error names, text of the message)
INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    # schema
    "wrong type": ({"lora": {"r": "sixteen"}}, "spec.lora.r", "must be of type integer"),
    "out of range": ({"lora": {"r": 0}}, "spec.lora.r", "should be greater than or equal to 1"),
    "exclusive minimum": (
        {"training": {"learningRate": 0}},
        "spec.training.learningRate",
        "should be greater than 0",
    ),
    "bad enum": (
        {"lora": {"bias": "some"}},
        "spec.lora.bias",
        'supported values: "none", "all", "lora_only"',
    ),
    "bad enum in a list": ({"export": {"gguf": ["q2"]}}, "spec.export.gguf[0]", "supported values"),
    "unknown field": ({"lora": {"rank": 8}}, "spec.lora.rank", "unknown field"),
    "pattern": ({"data": {"split": "train[0:500"}}, "spec.data.split", "should match"),
    "hub id pattern": ({"model": {"hub": "unsloth/Qwen3 8B"}}, "spec.model.hub", "should match"),
    "required": ({"data": DROP}, "spec.data", "Required value"),
    "too many GPUs": ({"resources": {"gpus": 17}}, "spec.resources.gpus", "less than or equal to 16"),
    "truncation share above 1": (
        {"data": {"maxTruncatedFraction": 1.5}},
        "spec.data.maxTruncatedFraction",
        "less than or equal to 1",
    ),
    "incomplete rows rule unknown": (
        {"data": {"incompleteRows": "drop"}},
        "spec.data.incompleteRows",
        'supported values: "fail", "skip"',
    ),
    # CEL
    "two model sources": (
        {"model": {"s3": "s3://models/x/"}},
        "spec.model",
        "set exactly one of hub, s3, path",
    ),
    "no data source": ({"data": {"hub": DROP}}, "spec.data", "set exactly one of hub, s3, path"),
    "maxSteps and epochs": (
        {"training": {"maxSteps": 10, "epochs": 1}},
        "spec.training",
        "set only one of maxSteps and epochs",
    ),
    "custom template without format": (
        {"template": {"type": "custom"}},
        "spec.template.format",
        "type custom needs format",
    ),
    "format without custom": (
        {"template": {"format": "{q}"}},
        "spec.template.format",
        "format is only used with type custom",
    ),
    "batchSize auto (removed)": (
        {"training": {"batchSize": "auto"}},
        "spec.training.batchSize",
        "must be of type integer",
    ),
    "batchSize zero": (
        {"training": {"batchSize": 0}},
        "spec.training.batchSize",
        "should be greater than or equal to 1",
    ),
    "microBatches unknown": (
        {"training": {"microBatches": "max"}},
        "spec.training.microBatches",
        'supported values: "auto", "literal"',
    ),
    "checkpoint with neither trigger": (
        {"checkpoint": {"everySteps": 0, "everyMinutes": 0}},
        "spec.checkpoint",
        "set everySteps, everyMinutes or both to more than 0",
    ),
    # validation data, evaluation, tracking
    "validation fraction above 0.5": (
        {"data": {"validation": {"fraction": 0.7}}},
        "spec.data.validation.fraction",
        "should be less than or equal to 0.5",
    ),
    "validation fraction zero": (
        {"data": {"validation": {"fraction": 0}}},
        "spec.data.validation.fraction",
        "should be greater than 0",
    ),
    "two validation sources": (
        {"data": {"validation": {"fraction": 0.1, "path": "/data/validation.jsonl"}}},
        "spec.data.validation",
        "set exactly one of fraction, hub, s3, path",
    ),
    "early stopping without validation": (
        {"evaluation": {"earlyStopping": True}},
        "spec.evaluation",
        "evaluation.earlyStopping needs data.validation",
    ),
    "export from best without validation": (
        {"export": {"fromCheckpoint": "best"}},
        "spec.export",
        "export.fromCheckpoint best needs data.validation",
    ),
    "mlflow without a uri": ({"tracking": {"type": "mlflow"}}, "spec.tracking.uri", "type mlflow needs uri"),
    "credentials in the tracking uri": (
        {"tracking": {"type": "mlflow", "uri": "https://user:secret@mlflow.example.com"}},
        "spec.tracking.uri",
        "should match",
    ),
}


@pytest.mark.parametrize(("patch", "field", "message"), INVALID.values(), ids=INVALID.keys())
def test_invalid_jobs_are_refused_naming_the_field(kube: Any, patch: dict, field: str, message: str) -> None:
    result = apply(kube, manifest("invalid", patch))
    assert result.returncode != 0, f"accepted: {patch}"
    assert field in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


# name -> (patch, the unknown field's path as both sides name it, the trainer's hint)
UNKNOWN_KEYS: dict[str, tuple[dict[str, Any], str, str]] = {
    "snake_case nested": (
        {"model": {"max_seq_length": 128}},
        "spec.model.max_seq_length",
        "did you mean maxSeqLength?",
    ),
    "snake_case top level": (
        {"active_deadline_seconds": 60},
        "spec.active_deadline_seconds",
        "did you mean activeDeadlineSeconds?",
    ),
    "typo": ({"model": {"maxSeqLen": 128}}, "spec.model.maxSeqLen", "did you mean maxSeqLength?"),
}


@pytest.mark.parametrize(("patch", "field", "hint"), UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
def test_unknown_keys_are_refused_by_the_api_server_and_the_trainer_alike(
    kube: Any, patch: dict, field: str, hint: str
) -> None:
    """Strict field validation (kubectl's default) refuses the key naming its path, but without a
    hint: only the trainer's parser (`python -m finetune_trainer preflight`) says what was meant.
    A client that does not ask for strict validation gets the job with the key dropped."""
    obj = manifest("unknown-key", patch)
    strict = apply(kube, obj, "--dry-run=server")
    assert strict.returncode != 0
    assert f'unknown field "{field}"' in strict.stderr, strict.stderr
    with pytest.raises(ConfigError) as e:
        parse_job(obj)
    assert e.value.field == field
    assert hint in e.value.message, str(e.value)

    # The API server's own default (a client that sends no fieldValidation) drops the key.
    with kube.api_client() as api:
        created = client.CustomObjectsApi(api).create_namespaced_custom_object(
            "finetune.dev", "v1alpha1", kube.namespace, "finetunejobs", obj, dry_run="All"
        )
    assert parse_job(created).spec == parse_job(manifest("unknown-key")).spec


def test_server_defaults_equal_the_model_defaults(kube: Any) -> None:
    """A minimal job as stored by the API server is the minimal job as the trainer reads it."""
    assert apply(kube, manifest("defaults")).returncode == 0
    stored = json.loads(kube.kubectl("get", "ftj", "defaults", "-n", kube.namespace, "-o", "json").stdout)
    expected = FineTuneJobSpec.model_validate(MINIMAL).model_dump(
        by_alias=True, mode="json", exclude_none=True
    )
    assert stored["spec"] == expected


def test_training_spec_is_immutable_but_suspend_is_not(kube: Any) -> None:
    assert apply(kube, manifest("immutable")).returncode == 0

    changed = apply(kube, manifest("immutable", {"lora": {"r": 32}}))
    assert changed.returncode != 0
    assert "spec.lora" in changed.stderr and "lora is immutable" in changed.stderr, changed.stderr

    suspended = apply(kube, manifest("immutable", {"suspend": True}))
    assert suspended.returncode == 0, suspended.stderr
    got = kube.kubectl("get", "ftj", "immutable", "-n", kube.namespace, "-o", "jsonpath={.spec.suspend}")
    assert got.stdout == "true"


def test_printer_columns(kube: Any) -> None:
    assert apply(kube, manifest("columns")).returncode == 0
    progress = {"step": 25, "totalSteps": 60, "percent": 41.7, "loss": 1.234, "evalLoss": 1.5}
    status = {"phase": "Running", "progress": progress}
    kube.kubectl(
        "patch",
        "ftj",
        "columns",
        "-n",
        kube.namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {**status, "preemptions": 1}}),
    )
    lines = kube.kubectl("get", "ftj", "columns", "-n", kube.namespace).stdout.splitlines()
    header = ["NAME", "PHASE", "PROGRESS", "%", "LOSS", "EVAL", "LOSS", "PREEMPTIONS", "AGE"]
    assert lines[0].split() == header
    assert lines[1].split()[:6] == ["columns", "Running", "41", "1.234", "1.5", "1"]
    wide = kube.kubectl("get", "ftj", "columns", "-n", kube.namespace, "-o", "wide").stdout.splitlines()
    header = ["NAME", "PHASE", "PROGRESS", "%", "STEP", "LOSS", "EVAL", "LOSS", "PREEMPTIONS", "MODEL", "AGE"]
    assert wide[0].split() == header
    assert "unsloth/Qwen3-8B" in wide[1]
    # Short name and category: `kubectl get all` lists FineTuneJobs too.
    assert "finetunejob.finetune.dev/columns" in kube.kubectl("get", "all", "-n", kube.namespace).stdout


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ({"path": "/models/qwen3-8b"}, "/models/qwen3-8b"),
        ({"s3": "s3://models/qwen3-8b/"}, "s3://models/qwen3-8b/"),
    ],
    ids=["path", "s3"],
)
def test_model_column_shows_path_and_s3_models(kube: Any, source: dict[str, str], shown: str) -> None:
    name = f"model-{next(iter(source))}"
    result = apply(kube, manifest(name, {"model": {"hub": DROP, **source}}))
    assert result.returncode == 0, result.stderr
    wide = kube.kubectl("get", "ftj", name, "-n", kube.namespace, "-o", "wide").stdout.splitlines()
    start = wide[0].index("MODEL")  # columns are aligned; empty cells (no status yet) print nothing
    assert wide[1][start:].split()[0] == shown
