"""The pydantic models accept the specs the CRD accepts and refuse, naming the field, what it refuses.

The same rules run on the API server as schema + CEL (tests/integration/test_crd_apiserver.py); here
they run where the trainer runs them, on a workstation, with no cluster.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from finetune_operator.api import FineTuneJob, FineTuneJobSpec
from finetune_trainer.spec import TrainingSpec
from pydantic import ValidationError

MINIMAL: dict[str, Any] = {
    "model": {"hub": "unsloth/Qwen3-8B"},
    "data": {"hub": "FreedomIntelligence/medical-o1-reasoning-SFT", "config": "zh", "split": "train[0:500]"},
}


def locations(error: ValidationError) -> set[str]:
    """Dotted field paths of every error; a union also reports each member under the field's path."""
    paths = {".".join(str(part) for part in e["loc"]) for e in error.errors()}
    return paths | {p.rsplit(".", 1)[0] for p in paths if "constrained-" in p or "literal[" in p}


def merged(patch: dict[str, Any], base: dict[str, Any] = MINIMAL) -> dict[str, Any]:
    """`base` with `patch` merged in, objects recursively; a None value deletes the key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(value, out[key])
        else:
            out[key] = value
    return out


VALID: dict[str, dict[str, Any]] = {
    "minimal": {},
    "s3 model and local data": {
        "model": {"hub": None, "s3": "s3://models/qwen3-8b/"},
        "data": {"hub": None, "path": "/data/rows.jsonl", "format": "jsonl"},
    },
    "custom template": {
        "template": {"type": "custom", "format": "Q: {q}\nA: {a}", "fields": {"q": "question"}}
    },
    "r1 template with system prompt": {"template": {"type": "r1-reasoning", "systemPrompt": "Think first."}},
    "epochs instead of steps": {"training": {"epochs": 1.5}},
    "literal micro-batches": {"training": {"microBatches": "literal"}},
    "timed checkpoints only": {"checkpoint": {"everySteps": None, "everyMinutes": 5}},
    "explicit null turns step checkpoints off": {"checkpoint": {"everySteps": None}},
    "zero turns step checkpoints off": {"checkpoint": {"everySteps": 0}},
    "gguf off, hub push": {
        "export": {
            "gguf": [],
            "push": {"repo": "me/adapter", "tokenSecretRef": {"name": "hf", "key": "token"}},
        }
    },
    "held-out validation, early stopping, export from best": {
        "data": {"validation": {"fraction": 0.1, "maxRows": 100}},
        "evaluation": {"everySteps": 10, "patience": 2, "earlyStopping": True},
        "export": {"fromCheckpoint": "best"},
    },
    "validation file of its own": {"data": {"validation": {"path": "/data/val.jsonl", "split": "train"}}},
    "incomplete rows skipped, truncation allowed": {
        "data": {"incompleteRows": "skip", "maxTruncatedFraction": 1}
    },
    "mlflow tracking": {
        "tracking": {
            "type": "mlflow",
            "uri": "https://mlflow.example.com",
            "project": "team-a",
            "usernameSecretRef": {"name": "mlflow", "key": "user"},
            "passwordSecretRef": {"name": "mlflow", "key": "password"},
        }
    },
    "wandb offline": {"tracking": {"type": "wandb", "project": "p", "runName": "r"}},
    "kubernetes knobs": {
        "resources": {"gpus": 2, "memory": "64Gi", "cpu": "500m"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "queueName": "team-a",
        "suspend": True,
        "storage": {"uri": "s3://ckpt/jobs", "endpoint": "http://127.0.0.1:9000", "credentialsSecret": "s3"},
    },
}


@pytest.mark.parametrize("patch", VALID.values(), ids=VALID.keys())
def test_valid_specs_are_accepted(patch: dict[str, Any]) -> None:
    spec = FineTuneJobSpec.model_validate(merged(patch))
    # The wire form reads back to the same spec: aliases and defaults survive a round trip.
    again = FineTuneJobSpec.model_validate(spec.model_dump(by_alias=True, mode="json"))
    assert again == spec


# (patch, where the error is reported, text the message must contain)
INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    "two model sources": ({"model": {"s3": "s3://models/x/"}}, "model", "exactly one of hub, s3, path"),
    "no data source": ({"data": {"hub": None}}, "data", "exactly one of hub, s3, path"),
    "maxSteps and epochs": ({"training": {"maxSteps": 10, "epochs": 1}}, "training", "maxSteps and epochs"),
    "custom template without format": ({"template": {"type": "custom"}}, "template", "template.format"),
    "format without custom": ({"template": {"format": "{q}"}}, "template", "template.format"),
    "checkpoint with neither trigger": (
        {"checkpoint": {"everySteps": 0, "everyMinutes": None}},
        "checkpoint",
        "everySteps, everyMinutes",
    ),
    "batchSize auto (removed)": ({"training": {"batchSize": "auto"}}, "training.batchSize", "valid integer"),
    "microBatches unknown": ({"training": {"microBatches": "max"}}, "training.microBatches", "'literal'"),
    "batchSize zero": ({"training": {"batchSize": 0}}, "training.batchSize", "greater than or equal to 1"),
    "lora.r wrong type": ({"lora": {"r": "sixteen"}}, "lora.r", "valid integer"),
    "lora.r out of range": ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
    "lora.dropout is 1": ({"lora": {"dropout": 1.0}}, "lora.dropout", "less than 1"),
    "bad enum": ({"lora": {"bias": "some"}}, "lora.bias", "'none', 'all' or 'lora_only'"),
    "unknown field": ({"lora": {"rank": 8}}, "lora.rank", "Extra inputs are not permitted"),
    "split pattern": ({"data": {"split": "train[0:500"}}, "data.split", "pattern"),
    "hub id with a space": ({"model": {"hub": "unsloth/Qwen3 8B"}}, "model.hub", "pattern"),
    "non-ASCII hub id": ({"model": {"hub": "ünsloth/Qwen3-8B"}}, "model.hub", "pattern"),
    "learning rate zero": ({"training": {"learningRate": 0}}, "training.learningRate", "greater than 0"),
    "unknown gguf quantization": ({"export": {"gguf": ["q2"]}}, "export.gguf.0", "'q8_0'"),
    "too many GPUs": ({"resources": {"gpus": 17}}, "resources.gpus", "less than or equal to 16"),
    "queue name with capitals": ({"queueName": "Team-A"}, "queueName", "pattern"),
    "s3 model without bucket": ({"model": {"hub": None, "s3": "s3:/models"}}, "model.s3", "pattern"),
    "missing data": ({"data": None}, "data", "Field required"),
    "validation fraction above 0.5": (
        {"data": {"validation": {"fraction": 0.7}}},
        "data.validation.fraction",
        "less than or equal to 0.5",
    ),
    "validation fraction zero": (
        {"data": {"validation": {"fraction": 0}}},
        "data.validation.fraction",
        "greater than 0",
    ),
    "two validation sources": (
        {"data": {"validation": {"fraction": 0.1, "path": "/v.jsonl"}}},
        "data.validation",
        "exactly one of fraction, hub, s3, path",
    ),
    "early stopping without validation": (
        {"evaluation": {"earlyStopping": True}},
        "",
        "needs data.validation",
    ),
    "export from best without validation": (
        {"export": {"fromCheckpoint": "best"}},
        "",
        "needs data.validation",
    ),
    "truncation share above 1": (
        {"data": {"maxTruncatedFraction": 1.5}},
        "data.maxTruncatedFraction",
        "less than or equal to 1",
    ),
    "incomplete rows rule unknown": (
        {"data": {"incompleteRows": "drop"}},
        "data.incompleteRows",
        "'fail' or 'skip'",
    ),
    "mlflow without a uri": ({"tracking": {"type": "mlflow"}}, "tracking", "needs the tracking server's uri"),
    "credentials in the tracking uri": (
        {"tracking": {"type": "mlflow", "uri": "https://u:p@mlflow.example.com"}},
        "tracking.uri",
        "pattern",
    ),
}


@pytest.mark.parametrize(("patch", "where", "text"), INVALID.values(), ids=INVALID.keys())
def test_invalid_specs_name_the_field(patch: dict[str, Any], where: str, text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate(merged(patch))
    errors = caught.value.errors()
    assert where in locations(caught.value), errors
    assert any(text in e["msg"] for e in errors), errors


TRAINING_FIELDS = {k for k in INVALID if k not in {"too many GPUs", "queue name with capitals"}}


@pytest.mark.parametrize("case", sorted(TRAINING_FIELDS))
def test_trainer_refuses_the_same_specs(case: str) -> None:
    """The trainer's own model (no Kubernetes fields) refuses exactly the training-spec errors."""
    patch, where, _ = INVALID[case]
    with pytest.raises(ValidationError) as caught:
        TrainingSpec.model_validate(merged(patch))
    assert where in locations(caught.value)


def test_zero_turns_a_checkpoint_trigger_off() -> None:
    """0 and null both mean off; the trainer sees None either way."""
    spec = FineTuneJobSpec.model_validate(merged({"checkpoint": {"everySteps": 0, "everyMinutes": 5}}))
    assert (spec.checkpoint.every_steps, spec.checkpoint.every_minutes) == (None, 5)


def test_a_whole_manifest_reads_as_a_job() -> None:
    """The trainer and the operator read the same manifest that goes to the cluster."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "medical", "namespace": "ml"},
            "spec": merged({"training": {"maxSteps": 60}}),
            "status": {"phase": "Running", "progress": {"step": 3, "totalSteps": 60}, "kopf": {"x": 1}},
        }
    )
    assert job.spec.training.resolved_max_steps == 60
    assert job.spec.lora.r == 16
    assert job.status is not None and job.status.progress is not None and job.status.progress.step == 3
