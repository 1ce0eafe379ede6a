"""The checkpoint decisions, without a store: keys, manifests, completeness, pruning, fingerprint."""

from __future__ import annotations

import json

import pytest
from finetune_trainer.checkpoints import (
    FINGERPRINT_EXCLUDED,
    MANIFEST_NAME,
    CheckpointRef,
    ManifestError,
    NewerManifestError,
    best_by_eval_loss,
    build_manifest,
    config_fingerprint,
    deletion_order,
    encode_manifest,
    group_by_step,
    history,
    history_entry,
    manifest_problem,
    parse_checkpoint_key,
    parse_manifest,
    plan_prune,
    step_prefix,
)
from finetune_trainer.spec import TrainingSpec
from finetune_trainer.storage import ObjectInfo

SHA_A = "a" * 64
SHA_B = "b" * 64


def files() -> list[dict]:
    return [
        {"path": "adapter_model.safetensors", "size": 10, "sha256": SHA_A},
        {"path": "optimizer/state.pt", "size": 3, "sha256": SHA_B},
    ]


def test_step_prefix_is_zero_padded_so_keys_sort_by_step() -> None:
    keys = [step_prefix(s) for s in (100, 20, 3)]
    assert sorted(keys) == [step_prefix(3), step_prefix(20), step_prefix(100)]
    assert step_prefix(20) == "checkpoints/step-00000020/"
    with pytest.raises(ValueError, match="step"):
        step_prefix(-1)


def test_parse_checkpoint_key() -> None:
    assert parse_checkpoint_key("checkpoints/step-00000020/a/b.pt") == (20, "a/b.pt")
    assert parse_checkpoint_key("checkpoints/step-123456789/x") == (123456789, "x")
    assert parse_checkpoint_key("checkpoints/step-20/x") is None
    assert parse_checkpoint_key("artifacts/step-00000020/x") is None
    assert parse_checkpoint_key("checkpoints/step-00000020/") is None


def test_group_by_step_ignores_foreign_keys() -> None:
    listing = [
        ObjectInfo("checkpoints/step-00000010/a", 1),
        ObjectInfo("checkpoints/step-00000010/manifest.json", 2),
        ObjectInfo("checkpoints/step-00000020/a", 3),
        ObjectInfo("checkpoints/notes.txt", 4),
        ObjectInfo("adapter/adapter_model.safetensors", 5),
    ]
    assert group_by_step(listing) == {10: {"a": 1, MANIFEST_NAME: 2}, 20: {"a": 3}}


def test_manifest_round_trips() -> None:
    manifest = build_manifest(20, "f" * 64, files()[::-1], {"loss": 1.5}, created_at="2026-01-01T00:00:00Z")
    parsed = parse_manifest(encode_manifest(manifest))
    assert parsed == manifest
    assert [f["path"] for f in parsed["files"]] == ["adapter_model.safetensors", "optimizer/state.pt"]
    assert parsed["trainer_state"] == {"loss": 1.5}
    assert "trainer_state" not in build_manifest(20, "f", files())


def _broken(**changes: object) -> bytes:
    manifest = build_manifest(20, "f" * 64, files())
    manifest.update(changes)
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (_broken(format_version=0), "format_version"),
        (_broken(format_version="1"), "format_version"),
        (_broken(step="20"), "manifest.step"),
        (_broken(step=True), "manifest.step"),
        (_broken(fingerprint=None), "manifest.fingerprint"),
        (_broken(files={}), "manifest.files"),
        (_broken(trainer_state=[1]), "manifest.trainer_state"),
        (_broken(files=[{"path": "../escape", "size": 1, "sha256": SHA_A}]), r"files\[0\].path"),
        (_broken(files=[{"path": "/abs", "size": 1, "sha256": SHA_A}]), r"files\[0\].path"),
        (_broken(files=[{"path": MANIFEST_NAME, "size": 1, "sha256": SHA_A}]), r"files\[0\].path"),
        (_broken(files=[files()[0], files()[0]]), r"files\[1\].path"),
        (_broken(files=[{"path": "a", "size": -1, "sha256": SHA_A}]), r"files\[0\].size"),
        (_broken(files=[{"path": "a", "size": 1, "sha256": "A" * 64}]), r"files\[0\].sha256"),
    ],
)
def test_parse_manifest_names_the_field_at_fault(data: bytes, field: str) -> None:
    with pytest.raises(ManifestError, match=field):
        parse_manifest(data)


def test_a_newer_manifest_format_is_recognised_as_such() -> None:
    """A newer trainer's checkpoints are not this one's to read, nor to prune as garbage."""
    with pytest.raises(NewerManifestError, match="newer"):
        parse_manifest(_broken(format_version=2))


def test_manifest_problem() -> None:
    manifest = build_manifest(20, "fp", files())
    present = {"adapter_model.safetensors": 10, "optimizer/state.pt": 3, MANIFEST_NAME: 99}
    assert manifest_problem(manifest, step=20, fingerprint="fp", present=present) is None
    assert "another training config" in manifest_problem(
        manifest, step=20, fingerprint="other", present=present
    )
    assert "step 20" in manifest_problem(manifest, step=30, fingerprint="fp", present=present)
    missing = {k: v for k, v in present.items() if k != "optimizer/state.pt"}
    assert "optimizer/state.pt is missing" in manifest_problem(
        manifest, step=20, fingerprint="fp", present=missing
    )
    short = {**present, "adapter_model.safetensors": 9}
    assert "9 bytes" in manifest_problem(manifest, step=20, fingerprint="fp", present=short)


def test_prune_keeps_the_newest_complete() -> None:
    assert plan_prune([10, 20, 30, 40], [10, 20, 30, 40], [], keep_last=2, current=40) == [10, 20]
    assert plan_prune([10, 20], [10, 20], [], keep_last=1, current=20) == [10]
    assert plan_prune([40], [40], [], keep_last=1, current=40) == []


def test_prune_removes_partial_checkpoints_older_than_the_current_one_only() -> None:
    # 15 and 25: uploads cut short; 50: partial, newer than what was just written.
    assert plan_prune([15, 20, 25, 30, 50], [20, 30], [], keep_last=2, current=30) == [15, 25]


def test_prune_never_touches_other_configs_checkpoints() -> None:
    assert plan_prune([5, 10, 20, 30], [20, 30], [5, 10], keep_last=1, current=30) == [20]


def test_prune_leaves_checkpoints_newer_than_the_current_one() -> None:
    """A run that resumed from 20 because 40 was corrupt writes 30: the old 40 must not count
    toward keep_last, or the checkpoint just written would be deleted."""
    assert plan_prune([10, 20, 30, 40], [10, 20, 30, 40], [], keep_last=1, current=30) == [10, 20]
    assert plan_prune([10, 20, 30, 40], [10, 20, 30, 40], [], keep_last=2, current=30) == [10]


def test_prune_rejects_keep_last_zero() -> None:
    with pytest.raises(ValueError, match="keep_last"):
        plan_prune([1], [1], [], keep_last=0, current=1)


def test_manifests_are_deleted_before_files() -> None:
    manifests, rest = deletion_order(
        [
            "checkpoints/step-00000010/a",
            "checkpoints/step-00000010/manifest.json",
            "checkpoints/step-00000020/b",
        ]
    )
    assert manifests == ["checkpoints/step-00000010/manifest.json"]
    assert rest == ["checkpoints/step-00000010/a", "checkpoints/step-00000020/b"]


# ---------------------------------------------------------------------------------------------
# Fingerprint

MINIMAL = {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"path": "/data/train.jsonl"}}


def spec(**sections: dict) -> TrainingSpec:
    doc = {**MINIMAL}
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return TrainingSpec.model_validate(doc)


def test_fingerprint_is_stable_and_spelling_independent() -> None:
    base = config_fingerprint(spec())
    assert base == config_fingerprint(spec())
    assert len(base) == 64
    # Defaults written out, camelCase or snake_case: the same config.
    assert base == config_fingerprint(spec(lora={"r": 16}, training={"learningRate": 2e-4}))
    assert base == config_fingerprint(spec(training={"learning_rate": 2e-4, "maxSteps": None}))


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"hub": "unsloth/Meta-Llama-3.1-8B"}},
        {"model": {"revision": "abc123"}},
        {"model": {"maxSeqLength": 1024}},
        {"model": {"loadIn4Bit": False}},
        {"data": {"split": "train[0:500]"}},
        {"data": {"config": "zh"}},
        {"template": {"type": "r1-reasoning"}},
        {"template": {"systemPrompt": "Be brief."}},
        {"template": {"addEos": False}},
        {"lora": {"r": 32}},
        {"lora": {"targetModules": ["q_proj"]}},
        {"lora": {"useRslora": True}},
        {"training": {"learningRate": 1e-4}},
        {"training": {"maxSteps": 61}},
        {"training": {"epochs": 1}},
        {"training": {"seed": 1}},
        {"training": {"gradientAccumulationSteps": 8}},
        {"training": {"packing": True}},
        {"training": {"precision": "bf16"}},
    ],
)
def test_fingerprint_changes_with_what_training_computes(change: dict) -> None:
    assert config_fingerprint(spec(**change)) != config_fingerprint(spec())


@pytest.mark.parametrize(
    "change",
    [
        {"training": {"loggingSteps": 10}},
        {"lora": {"gradientCheckpointing": "true"}},
        {"model": {"tokenSecretRef": {"name": "hf", "key": "token"}}},
        {"data": {"tokenSecretRef": {"name": "hf", "key": "token"}}},
        {"data": {"maxTruncatedFraction": 0.5, "incompleteRows": "skip"}},
        {"checkpoint": {"everySteps": 5, "keepLast": 7, "gracePeriodSeconds": 30}},
        {"export": {"gguf": ["f16"], "merged16Bit": True}},
        {"samples": {"prompts": ["hi"]}},
        {"tracking": {"type": "wandb", "project": "p"}},
        {"storage": {"uri": "s3://bucket/other", "endpoint": "http://minio:9000"}},
    ],
)
def test_fingerprint_ignores_what_does_not_change_the_math(change: dict) -> None:
    assert config_fingerprint(spec(**change)) == config_fingerprint(spec())


def test_fingerprint_exclusions_name_real_fields() -> None:
    """A renamed spec field would silently re-enter the fingerprint; fail here instead."""
    for section, names in FINGERPRINT_EXCLUDED.items():
        model = TrainingSpec.model_fields[section].annotation
        assert names <= set(model.model_fields), section


def test_a_job_without_validation_keeps_the_fingerprint_it_had() -> None:
    """Checkpoints written before spec.data.validation existed stay resumable: the value was
    computed by the trainer before the field was added. A held-out fraction changes the rows
    trained on, so it changes the fingerprint."""
    assert config_fingerprint(spec()) == "14aa91c30bd45a71f2c35cc149cc81624baa041780712bd7213370f4412630bf"
    assert config_fingerprint(spec(data={"validation": {"fraction": 0.1}})) != config_fingerprint(spec())


def test_fingerprint_extra_facts_count() -> None:
    assert config_fingerprint(spec(), {"world_size": 2}) != config_fingerprint(spec(), {"world_size": 1})
    assert config_fingerprint(spec(), {}) == config_fingerprint(spec())


def ref(step: int, eval_loss: float | None) -> CheckpointRef:
    state = {"loss": 1.0} if eval_loss is None else {"loss": 1.0, "evalLoss": eval_loss}
    manifest = {"step": step, "created_at": "2025-01-01T00:00:00Z", "files": [], "trainer_state": state}
    return CheckpointRef(step, step_prefix(step), f"s3://b/{step_prefix(step)}", manifest)


def test_the_best_checkpoint_survives_pruning() -> None:
    assert plan_prune([10, 20, 30, 40], [10, 20, 30, 40], [], keep_last=1, current=40, protected=[20]) == [
        10,
        30,
    ]


def test_best_by_eval_loss_is_the_lowest_and_the_earliest_of_equals() -> None:
    refs = [ref(40, 1.5), ref(30, 1.2), ref(20, 1.2), ref(10, None)]
    assert best_by_eval_loss(refs).step == 20
    assert best_by_eval_loss([ref(10, None)]) is None
    assert [h["step"] for h in history(refs, limit=2)] == [40, 30]
    assert history_entry(ref(10, None)) == {
        "step": 10,
        "trainLoss": 1.0,
        "evalLoss": None,
        "time": "2025-01-01T00:00:00Z",
        "uri": "s3://b/checkpoints/step-00000010/",
    }
