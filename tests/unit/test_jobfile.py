"""Job files: whole manifests and bare specs, Kubernetes-only fields ignored, errors named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from finetune_trainer import jobfile
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import TrainingSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MINIMAL = {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"path": "/data/rows.jsonl"}}


def manifest(spec: dict) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": spec,
    }


def test_bare_spec_gets_the_tutorial_defaults() -> None:
    job = jobfile.parse_job(MINIMAL)
    assert job.name is None
    assert job.spec.lora.r == 16 and job.spec.training.resolved_max_steps == 60
    assert job.spec.template.type == "alpaca"


def test_manifest_keeps_metadata_and_ignores_kubernetes_only_fields() -> None:
    spec = {
        **MINIMAL,
        "image": "trainer:1",
        "resources": {"gpus": 1},
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "priorityClassName": "high",
        "queueName": "gpus",
        "suspend": False,
        "activeDeadlineSeconds": 3600,
        "backoffLimit": 2,
        "serviceAccountName": "trainer",
        "storage": {"uri": "s3://bucket/jobs", "credentialsSecret": "s3", "deleteOnJobDeletion": True},
    }
    job = jobfile.parse_job(manifest(spec))
    assert (job.name, job.namespace) == ("demo", "team-a")
    assert job.spec.storage.uri == "s3://bucket/jobs"


def test_ignored_fields_are_exactly_what_the_operator_adds() -> None:
    from finetune_operator.api import FineTuneJobSpec, JobStorageSpec
    from finetune_trainer.spec import StorageSpec

    def wire(model: type) -> set[str]:
        return {f.alias or name for name, f in model.model_fields.items()}

    assert wire(FineTuneJobSpec) - wire(TrainingSpec) == jobfile.KUBERNETES_ONLY_FIELDS
    assert wire(JobStorageSpec) - wire(StorageSpec) == jobfile.KUBERNETES_ONLY_STORAGE_FIELDS


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"lora": {"r": 0}}, "spec.lora.r", "greater than or equal to 1"),
        ({"training": {"batchSize": 0}}, "spec.training.batchSize", "greater than or equal to 1"),
        ({"training": {"maxSteps": 5, "epochs": 1}}, "spec.training", "only one of maxSteps and epochs"),
        ({"template": {"type": "custom"}}, "spec.template.format", "needs a format string"),
        ({"model": {"hub": "a/b", "path": "/m"}}, "spec.model", "exactly one of hub, s3, path"),
        ({"data": {"path": "/x", "split": "train[0:5"}}, "spec.data.split", "match pattern"),
        ({"lora": {"rank": 8}}, "spec.lora.rank", "unknown field"),
        ({"tolerations": "x", "nodeSelector": 3}, None, None),
    ],
)
def test_validation_errors_name_the_camel_case_field(
    change: dict, field: str | None, words: str | None
) -> None:
    spec = {**MINIMAL, **change}
    if field is None:  # Kubernetes-only fields are not the trainer's to judge
        jobfile.parse_job(manifest(spec))
        return
    with pytest.raises(ConfigError) as e:
        jobfile.parse_job(manifest(spec))
    assert e.value.field == field
    assert words in e.value.message


def test_several_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as e:
        jobfile.parse_job({**MINIMAL, "lora": {"r": 0, "alpha": 0}})
    assert str(e.value).startswith("spec.lora.r: ")
    assert "spec.lora.alpha" in e.value.message


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"apiVersion": "v1", "kind": "FineTuneJob", "spec": MINIMAL}, "apiVersion"),
        ({"apiVersion": "finetune.dev/v1alpha1", "kind": "Job", "spec": MINIMAL}, "kind"),
        ({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob"}, "spec"),
        (["not", "a", "mapping"], "job"),
        ({"data": {"path": "/x"}}, "spec.model"),
    ],
)
def test_malformed_documents(doc: object, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        jobfile.parse_job(doc)
    assert e.value.field == field


def test_load_job_reports_yaml_errors_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        jobfile.load_job(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        jobfile.load_job(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    job = jobfile.load_job(path)
    assert job.name
    assert yaml.safe_load(path.read_text())["kind"] == "FineTuneJob"


SPEC_HINTS = [
    # (spec fragment, field named, text the message must carry)
    # snake_case, as pydantic's Python names would read: refused as the API server refuses them
    ({"lora": {"target_modules": ["q_proj"]}}, "spec.lora.target_modules", "did you mean targetModules?"),
    ({"model": {"hub": "m/x", "max_seq_length": 128}}, "spec.model.max_seq_length", "maxSeqLength?"),
    ({"data": {"validation": {"max_rows": 8}}}, "spec.data.validation.max_rows", "did you mean maxRows?"),
    ({"max_grad_norm": 1.0}, "spec.max_grad_norm", "valid fields are model, data"),
    # a Kubernetes-only key is hinted at too, though the trainer drops it unread
    ({"node_selector": {"gpu": "h100"}}, "spec.node_selector", "did you mean nodeSelector?"),
    ({"storage": {"credentials_secret": "s3"}}, "spec.storage.credentials_secret", "credentialsSecret?"),
    # a snake_case typo is compared in camelCase
    ({"model": {"hub": "m/x", "max_seq_len": 128}}, "spec.model.max_seq_len", "did you mean maxSeqLength?"),
    ({"trainig": {}}, "spec.trainig", "did you mean training or tracking?"),  # closest first
    ({"lora": {"rank": 8}}, "spec.lora.rank", "valid fields are r, alpha"),
    ({"training": {"learningRat": 1e-4}}, "spec.training.learningRat", "did you mean learningRate?"),
    ({"training": {"maxsteps": 5}}, "spec.training.maxsteps", "did you mean maxSteps?"),
    (
        {"export": {"push": {"repo": "a/b", "tokenSecretRef": {"name": "t", "key": "k"}, "privat": True}}},
        "spec.export.push.privat",
        "did you mean private?",
    ),
    ({"data": {"valdation": {"fraction": 0.1}}}, "spec.data.valdation", "did you mean validation?"),
    ({"zzzz": 1}, "spec.zzzz", "valid fields are model, data"),
    # The same words as the CRD's rule at kubectl apply (a relative path, a one-letter bucket).
    ({"storage": {"uri": "./out"}}, "spec.storage.uri", "an absolute path (/data/out or file:///data/out)"),
    ({"storage": {"uri": "s3://b/x"}}, "spec.storage.uri", "a bucket of 3 to 63 lowercase letters"),
]


@pytest.mark.parametrize(("fragment", "field", "hint"), SPEC_HINTS)
def test_unknown_and_snake_case_keys_are_refused_with_the_closest_name(fragment, field, hint):
    spec = {"model": {"hub": "m/x"}, "data": {"path": "/d.jsonl"}}
    for key, value in fragment.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    with pytest.raises(ConfigError) as e:
        jobfile.parse_job(spec)
    assert e.value.field == field
    assert hint in e.value.message


def test_an_unknown_manifest_key_is_refused_with_the_closest_name() -> None:
    doc = {**manifest(MINIMAL), "sepc": {}}
    with pytest.raises(ConfigError) as e:
        jobfile.parse_job(doc)
    assert str(e.value) == "sepc: unknown field; did you mean spec?"
    with pytest.raises(ConfigError) as e:
        jobfile.parse_job({**manifest(MINIMAL), "labels": {}})
    assert str(e.value) == "labels: unknown field; valid fields are apiVersion, kind, metadata, spec, status"


def test_the_crd_spelling_is_accepted_and_means_what_python_names_mean() -> None:
    camel = {**MINIMAL, "model": {"hub": "m/x", "maxSeqLength": 128}, "lora": {"useRslora": True}}
    job = jobfile.parse_job(camel)
    assert job.spec.model.max_seq_length == 128 and job.spec.lora.use_rslora is True
    assert job.spec == TrainingSpec(
        model={"hub": "m/x", "max_seq_length": 128}, data=MINIMAL["data"], lora={"use_rslora": True}
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_a_file_reads_the_same_on_a_workstation_and_in_the_operator(path: Path) -> None:
    """The manifest, its bare spec, and the operator's reading of it (training part) are one spec."""
    from finetune_operator.api import FineTuneJobSpec

    doc = yaml.safe_load(path.read_text())
    job = jobfile.parse_job(doc)
    assert jobfile.parse_job(doc["spec"]).spec == job.spec
    operator = FineTuneJobSpec.model_validate(doc["spec"], by_alias=True, by_name=False)
    wire = jobfile.training_part(operator.model_dump(by_alias=True))
    assert TrainingSpec.model_validate(wire, by_alias=True, by_name=False) == job.spec
