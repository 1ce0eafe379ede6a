"""Optional push of the exported artifacts to a Hugging Face-compatible hub.

The write token comes from the environment (the operator maps `spec.export.push.tokenSecretRef` to
`HF_PUSH_TOKEN`); it is passed to the client only, and scrubbed from any error message.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from finetune_trainer.errors import ConfigError
from finetune_trainer.gguf import ExportError
from finetune_trainer.spec import HubPush

PUSH_TOKEN_ENV = "HF_PUSH_TOKEN"
"""Keep in step with operator/finetune_operator/jobbuilder.py's ENV_PUSH_TOKEN."""


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def push_folder(folder: Path, push: HubPush, env: Mapping[str, str]) -> str:
    """Create (if needed) `push.repo` and upload `folder` to it; returns the commit URL.
    `env` supplies the token and, for tests or a private hub, `HF_ENDPOINT`."""
    token = env.get(PUSH_TOKEN_ENV, "")
    if not token:
        raise ConfigError(
            "spec.export.push.tokenSecretRef",
            f"expected a hub token in the environment variable {PUSH_TOKEN_ENV}",
        )
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ExportError("spec.export.push: huggingface_hub is not installed in the trainer image") from None
    api = HfApi(endpoint=env.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(push.repo, private=push.private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=push.repo, commit_message="finetune-operator export"
        )
    except Exception as e:  # the client raises many types; none may carry the token out
        raise ExportError(
            f"push to {push.repo} failed: {type(e).__name__}: {redact(str(e), token)}"
        ) from None
    return str(info)
