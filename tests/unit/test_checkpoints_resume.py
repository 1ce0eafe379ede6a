"""The resume decision as a pure function over listings and manifests: complete, partial, corrupt,
foreign, vanished, newer-format and mixed stores, without a store."""

from __future__ import annotations

import json

from finetune_trainer.checkpoints import MANIFEST_NAME, build_manifest, decide, encode_manifest, step_prefix
from finetune_trainer.checkpoints.resume import manifest_steps
from finetune_trainer.storage import ObjectInfo

OURS = "f" * 64
THEIRS = "e" * 64
FILES = {"adapter_model.safetensors": 10, "optimizer/state.pt": 3}


def uri(prefix: str) -> str:
    return f"s3://bucket/jobs/ns/job/{prefix}"


def listing_of(step: int, files: dict[str, int] = FILES, manifest: bool = True) -> list[ObjectInfo]:
    objects = [ObjectInfo(step_prefix(step) + path, size) for path, size in files.items()]
    return objects + ([ObjectInfo(step_prefix(step) + MANIFEST_NAME, 300)] if manifest else [])


def manifest_of(step: int, fingerprint: str = OURS, files: dict[str, int] = FILES) -> bytes:
    entries = [{"path": p, "size": s, "sha256": "a" * 64} for p, s in files.items()]
    return encode_manifest(build_manifest(step, fingerprint, entries, {"loss": 1.0 / step}))


def test_an_empty_store_has_nothing_to_resume() -> None:
    found = decide([], {}, OURS, uri)
    assert (found.steps, found.complete, found.skipped, found.foreign) == ({}, [], {}, set())


def test_complete_checkpoints_come_newest_first_with_their_manifest_and_uri() -> None:
    listing = listing_of(10) + listing_of(30) + listing_of(20)
    found = decide(listing, {s: manifest_of(s) for s in (10, 20, 30)}, OURS, uri)
    assert [r.step for r in found.complete] == [30, 20, 10]
    newest = found.complete[0]
    assert newest.prefix == "checkpoints/step-00000030/"
    assert newest.uri == "s3://bucket/jobs/ns/job/checkpoints/step-00000030/"
    assert newest.trainer_state == {"loss": 1.0 / 30}
    assert newest.size == 13
    assert found.skipped == {}


def test_a_partial_upload_is_skipped_and_an_older_complete_one_resumed() -> None:
    """Files of step 20 stored, its manifest never written (preempted mid-upload)."""
    listing = listing_of(10) + listing_of(20, manifest=False)
    found = decide(listing, {10: manifest_of(10)}, OURS, uri)
    assert [r.step for r in found.complete] == [10]
    assert found.skipped[20].kind == "partial"
    assert 20 not in found.foreign  # ours to prune
    assert manifest_steps(listing) == [10]


def test_a_manifest_whose_files_are_missing_or_short_is_incomplete() -> None:
    missing = {"adapter_model.safetensors": 10}
    short = {"adapter_model.safetensors": 10, "optimizer/state.pt": 2}
    listing = listing_of(10) + listing_of(20, files=missing) + listing_of(30, files=short)
    found = decide(listing, {s: manifest_of(s) for s in (10, 20, 30)}, OURS, uri)
    assert [r.step for r in found.complete] == [10]
    assert found.skipped[20].kind == found.skipped[30].kind == "incomplete"
    assert "optimizer/state.pt is missing" in found.skipped[20].reason
    assert "optimizer/state.pt has 2 bytes, manifest says 3" in found.skipped[30].reason


def test_corrupt_manifests_are_skipped_never_taken_for_complete() -> None:
    not_json = b'{"format_version": 1, "step": 2'
    bad_digest = json.loads(manifest_of(30))
    bad_digest["files"][0]["sha256"] = "not-hex"
    listing = listing_of(10) + listing_of(20) + listing_of(30)
    manifests = {10: manifest_of(10), 20: not_json, 30: json.dumps(bad_digest).encode()}
    found = decide(listing, manifests, OURS, uri)
    assert [r.step for r in found.complete] == [10]
    assert found.skipped[20].kind == found.skipped[30].kind == "unreadable"
    assert "not JSON" in found.skipped[20].reason
    assert "manifest.files[0].sha256" in found.skipped[30].reason
    assert found.foreign == set()


def test_a_manifest_stored_under_another_step_is_incomplete() -> None:
    found = decide(listing_of(20), {20: manifest_of(10)}, OURS, uri)
    assert found.complete == []
    assert found.skipped[20].kind == "incomplete"
    assert "manifest says step 10" in found.skipped[20].reason


def test_another_configs_checkpoints_are_foreign_and_never_resumed() -> None:
    listing = listing_of(10) + listing_of(20)
    found = decide(listing, {10: manifest_of(10), 20: manifest_of(20, THEIRS)}, OURS, uri)
    assert [r.step for r in found.complete] == [10]
    assert found.skipped[20].kind == "foreign"
    assert found.foreign == {20}
    # The other config sees it the other way round.
    theirs = decide(listing, {10: manifest_of(10), 20: manifest_of(20, THEIRS)}, THEIRS, uri)
    assert [r.step for r in theirs.complete] == [20] and theirs.foreign == {10}


def test_a_foreign_manifest_with_missing_files_stays_foreign() -> None:
    """Not ours to judge: a checkpoint of another config is left alone whatever its state."""
    listing = listing_of(20, files={"adapter_model.safetensors": 10})
    found = decide(listing, {20: manifest_of(20, THEIRS)}, OURS, uri)
    assert found.foreign == {20} and found.complete == []


def test_a_newer_manifest_format_is_foreign() -> None:
    newer = json.loads(manifest_of(20))
    newer["format_version"] = 99
    found = decide(listing_of(20), {20: json.dumps(newer).encode()}, OURS, uri)
    assert found.complete == [] and found.skipped[20].kind == "newer-format" and found.foreign == {20}


def test_a_manifest_deleted_between_listing_and_reading_is_skipped() -> None:
    listing = listing_of(10) + listing_of(20) + listing_of(30)
    found = decide(listing, {10: manifest_of(10), 20: None}, OURS, uri)  # 30: not read at all
    assert [r.step for r in found.complete] == [10]
    assert found.skipped[20].kind == found.skipped[30].kind == "vanished"


def test_keys_outside_the_layout_are_ignored() -> None:
    listing = [
        *listing_of(10),
        ObjectInfo("checkpoints/notes.txt", 4),
        ObjectInfo("checkpoints/step-20/manifest.json", 5),  # not zero-padded: not a checkpoint
    ]
    found = decide(listing, {10: manifest_of(10)}, OURS, uri)
    assert list(found.steps) == [10] and [r.step for r in found.complete] == [10]
    assert manifest_steps(listing) == [10]
