"""The platform's policy (finetune_operator.admission), table-driven: what a job may name, and the
field and the allowed values each refusal names."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.admission import image_allowed, refusal, s3_segments, under
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.config import OperatorConfig

CFG = OperatorConfig.model_validate(
    {
        "defaultImage": "ghcr.io/finetune-dev/finetune-trainer:0.1.0",
        "trainerServiceAccount": "finetune-trainer",
        "storage": {"uri": "s3://platform/jobs", "endpoint": "http://minio:9000"},
        "policy": {
            "images": ["ghcr.io/finetune-dev/finetune-trainer:*"],
            "modelPrefixes": ["s3://platform/base-models/"],
            "dataPrefixes": ["s3://platform/datasets"],
            "namespaces": {
                "team-a": {
                    "images": ["registry.team-a/trainer@sha256:abc"],
                    "serviceAccounts": ["team-a-iam"],
                    "storageUris": ["s3://team-a-private/ft"],
                    "endpoints": ["https://s3.team-a.example"],
                    "credentialsSecrets": ["team-a-s3"],
                }
            },
        },
    }
)

BASE: dict[str, Any] = {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "org/data"}}


def spec(**fields: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({**BASE, **fields})


ALLOWED: dict[str, tuple[str, dict[str, Any]]] = {
    "nothing named": ("team-b", {}),
    "the default image": ("team-b", {"image": "ghcr.io/finetune-dev/finetune-trainer:0.1.0"}),
    "another tag of the trainer": ("team-b", {"image": "ghcr.io/finetune-dev/finetune-trainer:0.2.0"}),
    "a digest of the trainer": ("team-b", {"image": "ghcr.io/finetune-dev/finetune-trainer@sha256:1"}),
    "the namespace's own image": ("team-a", {"image": "registry.team-a/trainer@sha256:abc"}),
    "the platform's ServiceAccount": ("team-b", {"serviceAccountName": "finetune-trainer"}),
    "the namespace's listed ServiceAccount": ("team-a", {"serviceAccountName": "team-a-iam"}),
    "the platform's storage uri spelled out": ("team-b", {"storage": {"uri": "s3://platform/jobs/"}}),
    "a listed storage override": ("team-a", {"storage": {"uri": "s3://team-a-private/ft/run1"}}),
    "the platform's endpoint": ("team-b", {"storage": {"endpoint": "http://minio:9000/"}}),
    "a listed endpoint": ("team-a", {"storage": {"endpoint": "https://s3.team-a.example"}}),
    "a listed credentials Secret": ("team-a", {"storage": {"credentialsSecret": "team-a-s3"}}),
    "a base model": ("team-b", {"model": {"s3": "s3://platform/base-models/qwen3-8b/"}}),
    "the namespace's own earlier output": (
        "team-b",
        {"model": {"s3": "s3://platform/jobs/team-b/j1/merged/"}},
    ),
    "a model in the team's private bucket": ("team-a", {"model": {"s3": "s3://team-a-private/ft/m/"}}),
    "a listed data set": ("team-b", {"data": {"s3": "s3://platform/datasets/med/rows.jsonl"}}),
    "validation rows of the namespace": (
        "team-b",
        {"data": {"hub": "org/d", "validation": {"s3": "s3://platform/jobs/team-b/val.jsonl"}}},
    ),
}

REFUSED: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "a foreign image": (
        "team-b",
        {"image": "busybox:1.36"},
        "spec.image",
        "ghcr.io/finetune-dev/finetune-trainer:0.1.0",
    ),
    "a look-alike repository": (
        "team-b",
        {"image": "ghcr.io/finetune-dev/finetune-trainer-evil:1"},
        "spec.image",
        "not an allowed image",
    ),
    "a tag with a path": (
        "team-b",
        {"image": "ghcr.io/finetune-dev/finetune-trainer:x/../evil"},
        "spec.image",
        "not an allowed image",
    ),
    "another namespace's image": (
        "team-b",
        {"image": "registry.team-a/trainer@sha256:abc"},
        "spec.image",
        "not an allowed",
    ),
    "a foreign ServiceAccount": (
        "team-b",
        {"serviceAccountName": "admin"},
        "spec.serviceAccountName",
        "finetune-trainer",
    ),
    "another namespace's ServiceAccount": (
        "team-b",
        {"serviceAccountName": "team-a-iam"},
        "spec.serviceAccountName",
        "not an allowed ServiceAccount",
    ),
    "storage in another namespace's prefix": (
        "team-a",
        {"storage": {"uri": "s3://platform/jobs/team-b"}},
        "spec.storage.uri",
        "<namespace>/<name>/",
    ),
    "storage in an unlisted bucket": (
        "team-b",
        {"storage": {"uri": "s3://elsewhere/x"}},
        "spec.storage.uri",
        "s3://platform/jobs",
    ),
    "storage beside an override": (
        "team-a",
        {"storage": {"uri": "s3://team-a-private/ft-other"}},
        "spec.storage.uri",
        "s3://team-a-private/ft",
    ),
    "storage on a local path": (
        "team-b",
        {"storage": {"uri": "/tmp/ckpt"}},
        "spec.storage.uri",
        "not allowed",
    ),
    "storage with dot-dot": (
        "team-a",
        {"storage": {"uri": "s3://team-a-private/ft/../../platform/jobs/team-b"}},
        "spec.storage.uri",
        "not allowed",
    ),
    "another namespace's storage override": (
        "team-b",
        {"storage": {"uri": "s3://team-a-private/ft"}},
        "spec.storage.uri",
        "not allowed",
    ),
    "an unlisted endpoint": (
        "team-b",
        {"storage": {"endpoint": "http://attacker:9000"}},
        "spec.storage.endpoint",
        "http://minio:9000",
    ),
    "a credentials Secret of its own choosing": (
        "team-b",
        {"storage": {"credentialsSecret": "admin-keys"}},
        "spec.storage.credentialsSecret",
        "not an allowed credentials Secret",
    ),
    "another namespace's model output": (
        "team-a",
        {"model": {"s3": "s3://platform/jobs/team-b/j1/merged/"}},
        "spec.model.s3",
        "s3://platform/jobs/team-a/",
    ),
    "a model in an unlisted bucket": (
        "team-b",
        {"model": {"s3": "s3://other-bucket/m/"}},
        "spec.model.s3",
        "base-models",
    ),
    "a model beside the base models": (
        "team-b",
        {"model": {"s3": "s3://platform/base-models-private/m/"}},
        "spec.model.s3",
        "not under an allowed prefix",
    ),
    "a model with dot-dot": (
        "team-b",
        {"model": {"s3": "s3://platform/base-models/../jobs/team-a/x/"}},
        "spec.model.s3",
        "'..' segment",
    ),
    "data of another namespace": (
        "team-a",
        {"data": {"s3": "s3://platform/jobs/team-b/private.jsonl"}},
        "spec.data.s3",
        "s3://platform/datasets",
    ),
    "data from the model prefix": (
        "team-b",
        {"data": {"s3": "s3://platform/base-models/rows.jsonl"}},
        "spec.data.s3",
        "not under an allowed prefix",
    ),
    "validation rows of another namespace": (
        "team-a",
        {"data": {"hub": "org/d", "validation": {"s3": "s3://platform/jobs/team-b/val.jsonl"}}},
        "spec.data.validation.s3",
        "not under",
    ),
}


@pytest.mark.parametrize(("namespace", "fields"), ALLOWED.values(), ids=ALLOWED.keys())
def test_allowed(namespace: str, fields: dict[str, Any]) -> None:
    assert refusal(spec(**fields), namespace, CFG) is None


@pytest.mark.parametrize(("namespace", "fields", "field", "text"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_naming_the_field_and_what_is_allowed(
    namespace: str, fields: dict[str, Any], field: str, text: str
) -> None:
    found = refusal(spec(**fields), namespace, CFG)
    assert found is not None
    assert found.field == field
    assert text in found.message


def test_defaults_allow_only_the_default_image_and_service_account() -> None:
    cfg = OperatorConfig.model_validate({"storage": {"uri": "s3://b/jobs"}})
    assert refusal(spec(), "ns", cfg) is None
    assert refusal(spec(image=cfg.default_image), "ns", cfg) is None
    found = refusal(spec(image="ghcr.io/finetune-dev/finetune-trainer:0.2.0"), "ns", cfg)
    assert found is not None and found.field == "spec.image"
    found = refusal(spec(serviceAccountName="default"), "ns", cfg)
    assert found is not None and "leave the field unset" in found.message


@pytest.mark.parametrize(
    ("uri", "prefix", "expected"),
    [
        ("s3://b/jobs/a/x", "s3://b/jobs", True),
        ("s3://b/jobs", "s3://b/jobs/", True),
        ("s3://b/jobs-x/a", "s3://b/jobs", False),
        ("s3://b2/jobs/a", "s3://b/jobs", False),
        ("s3://b/anything", "s3://b", True),
        ("s3://b/jobs//a", "s3://b/jobs", False),
        ("s3://b/jobs/./a", "s3://b/jobs", False),
        ("/b/jobs/a", "s3://b/jobs", False),
    ],
)
def test_under_compares_whole_segments(uri: str, prefix: str, expected: bool) -> None:
    assert under(uri, prefix) is expected


def test_s3_segments() -> None:
    assert s3_segments("s3://b/a/b/") == ("b", ["a", "b"])
    assert s3_segments("s3://b") == ("b", [])
    assert s3_segments("s3://b/a/../c") is None


def test_image_patterns() -> None:
    assert image_allowed("r/t:1", ["r/t:*"])
    assert image_allowed("r/t@sha256:ab", ["r/t:*"])
    assert not image_allowed("r/t", ["r/t:*"])
    assert not image_allowed("r/t:", ["r/t:*"])
    assert not image_allowed("r/tx:1", ["r/t:*"])
    assert not image_allowed("r/t:1", ["r/t:2"])


def test_config_refuses_a_prefix_that_is_not_s3() -> None:
    with pytest.raises(ValueError, match="modelPrefixes"):
        OperatorConfig.model_validate({"policy": {"modelPrefixes": ["/models"]}})
