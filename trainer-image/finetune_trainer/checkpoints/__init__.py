"""Checkpoints in an object store: background upload, manifest-last completeness, verified resume.

A checkpoint is complete only when its manifest exists, parses, carries this job's config
fingerprint and every file it lists exists with the listed size; resuming also checks every
sha256 after download. Anything else (an upload cut short by preemption, a checkpoint of another
training config, bytes changed after upload) is skipped and an older complete checkpoint is used.

One module per activity; the decisions are pure functions, tested without a store:

- `fingerprint`: which training config a checkpoint belongs to.
- `manifest`: the key layout and the manifest format (build, parse, `manifest_problem`).
- `resume`: the resume decision over a listing and its manifests (`decide`, pure).
- `retention`: which checkpoints to prune (`plan_prune`, pure) and the order deletes go in.
- `history`: the checkpoint history in status and the best checkpoint by eval loss.
- `fetch`: the thin I/O of reading: `survey`, verified `download`, `resolve_resume`.
- `uploader`: the background `CheckpointUploader` and its retry policy.

The names below are the package's API (the trainer uses `checkpoints.<name>`).
"""

from finetune_trainer.checkpoints.fetch import ADAPTER_FILES, download, list_complete, resolve_resume, survey
from finetune_trainer.checkpoints.fingerprint import (
    FINGERPRINT_EXCLUDED,
    FINGERPRINT_LEFT_OUT_WHEN_UNSET,
    FINGERPRINT_SECTIONS,
    FINGERPRINT_VERSION,
    config_fingerprint,
    fingerprint_payload,
)
from finetune_trainer.checkpoints.history import (
    HISTORY_LIMIT,
    best_by_eval_loss,
    eval_loss_of,
    history,
    history_entry,
)
from finetune_trainer.checkpoints.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ROOT,
    CheckpointRef,
    CorruptCheckpoint,
    ManifestError,
    NewerManifestError,
    build_manifest,
    describe_files,
    encode_manifest,
    group_by_step,
    manifest_problem,
    parse_checkpoint_key,
    parse_manifest,
    step_prefix,
)
from finetune_trainer.checkpoints.resume import Skip, Survey, decide
from finetune_trainer.checkpoints.retention import deletion_order, plan_prune
from finetune_trainer.checkpoints.uploader import CHECKPOINT_UPLOAD_RETRY, CheckpointUploader

__all__ = [
    "ADAPTER_FILES",
    "CHECKPOINT_UPLOAD_RETRY",
    "FINGERPRINT_EXCLUDED",
    "FINGERPRINT_LEFT_OUT_WHEN_UNSET",
    "FINGERPRINT_SECTIONS",
    "FINGERPRINT_VERSION",
    "FORMAT_VERSION",
    "HISTORY_LIMIT",
    "MANIFEST_NAME",
    "ROOT",
    "CheckpointRef",
    "CheckpointUploader",
    "CorruptCheckpoint",
    "ManifestError",
    "NewerManifestError",
    "Skip",
    "Survey",
    "best_by_eval_loss",
    "build_manifest",
    "config_fingerprint",
    "decide",
    "deletion_order",
    "describe_files",
    "download",
    "encode_manifest",
    "eval_loss_of",
    "fingerprint_payload",
    "group_by_step",
    "history",
    "history_entry",
    "list_complete",
    "manifest_problem",
    "parse_checkpoint_key",
    "parse_manifest",
    "plan_prune",
    "resolve_resume",
    "step_prefix",
    "survey",
]
