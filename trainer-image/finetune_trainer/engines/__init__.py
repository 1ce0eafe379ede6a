"""Model engines: Unsloth on CUDA, transformers + PEFT + bitsandbytes on the CPU.

Both return a PEFT model with the same LoRA knobs, so checkpoints (HF Trainer checkpoints of a
PEFT model) look the same. Unsloth is imported only on the CUDA path: importing it needs a GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import ModelSource, StorageSpec, TrainingSpec

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]


def detect_device(requested: str = "auto") -> Device:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cuda` without a GPU is a ConfigError."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError("--device", f"expected auto, cpu or cuda, got {requested!r}")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ConfigError("--device", "cuda requested but torch sees no GPU")
    if requested == "cpu" or not has_cuda:
        return "cpu"
    return "cuda"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Endings of model weight files: what a tokenizer-only download skips, what a merge does not copy
from the base model's folder, what the 4-bit weight cache stores."""


def resolve_model_source(
    model: ModelSource, storage: StorageSpec, workdir: Path, tokenizer_only: bool = False
) -> str:
    """What `from_pretrained` gets: the hub id, the local folder, or the S3 prefix downloaded to
    workdir (without the weights when only the tokenizer is needed, as in preflight)."""
    if model.hub:
        return model.hub
    if model.path:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError("spec.model.path", f"{path} holds no saved model (no config.json)")
        return str(path)
    return str(_download_model(model.s3 or "", storage, workdir / "base-model", tokenizer_only))


def _download_model(uri: str, storage: StorageSpec, target: Path, tokenizer_only: bool) -> Path:
    from finetune_trainer.storage import S3Store, config_errors

    store = S3Store(uri.rstrip("/"), endpoint=storage.endpoint, region=storage.region)
    with config_errors("spec.model.s3"):
        objects = store.list("")
    if not any(o.key == "config.json" for o in objects):
        raise ConfigError("spec.model.s3", f"{uri} holds no saved model (no config.json)")
    for obj in objects:
        if tokenizer_only and obj.key.endswith(WEIGHT_SUFFIXES):
            continue
        dest = target / obj.key
        if not (dest.is_file() and dest.stat().st_size == obj.size):
            store.get_file(obj.key, dest)
    log.info("base model downloaded from %s (%d files)", uri, len(objects))
    return target


def local_model_dir(source: str, revision: str | None) -> Path:
    """The folder holding the base model's 16-bit files: `source` itself, or the hub cache's
    snapshot: filled by loading the model, or downloaded now when the 4-bit weights came from the
    job's weight cache instead."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, revision=revision, token=hub_token()))


def hub_token() -> str | None:
    """A hub token the operator passes from the job's Secret (`HF_TOKEN`); never logged."""
    return os.environ.get("HF_TOKEN") or None


def pretrained_options(spec: TrainingSpec) -> dict[str, Any]:
    """What every transformers `from_pretrained` of the base model takes from the spec."""
    return {
        "revision": spec.model.revision,
        "trust_remote_code": spec.model.trust_remote_code,
        "token": hub_token(),
    }


def load_tokenizer(spec: TrainingSpec, source: str) -> Any:
    """The base model's tokenizer, with a pad token (Llama tokenizers have none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **pretrained_options(spec))
    except OSError as e:
        raise ConfigError(_model_field(spec.model), f"cannot load the tokenizer from {source}: {e}") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


ADAPTABLE_TYPES = (
    "Linear",
    "Linear4bit",
    "Linear8bitLt",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Conv1D",
)
"""Class names of the modules PEFT's LoRA can wrap (torch's, bitsandbytes' and GPT-2's Conv1D)."""
MAX_NAMES_LISTED = 40


def target_modules_problem(targets: list[str], modules: list[str]) -> str | None:
    """Why spec.lora.targetModules does not fit the model whose adaptable modules have the
    qualified names `modules`, or None. An entry matches as PEFT matches a list entry: a module
    whose name is the entry or ends with `.` + the entry."""
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if not unmatched:
        return None
    valid = sorted({m.rsplit(".", 1)[-1] for m in modules})
    listed = ", ".join(valid[:MAX_NAMES_LISTED]) + (", ..." if len(valid) > MAX_NAMES_LISTED else "")
    return (
        f"{', '.join(unmatched)} {'matches' if len(unmatched) == 1 else 'match'} no module of the model; "
        f"the names it can adapt are: {listed or 'none'}"
    )


def adaptable_modules(model: Any) -> list[str]:
    """Qualified names of the model's modules that LoRA can wrap."""
    return [name for name, module in model.named_modules() if type(module).__name__ in ADAPTABLE_TYPES]


def check_target_modules(spec: TrainingSpec, source: str) -> None:
    """Refuse a targetModules entry that matches no module of the model, before any weights load:
    the model is built from its config on the meta device (no memory, no download of weights).
    A model that cannot be built so is logged and left to the engine."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, **pretrained_options(spec))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.model.trust_remote_code
            )
    except Exception as e:  # the engine's own load reports it, with the weights at hand
        log.warning("cannot check spec.lora.targetModules before loading the model: %s", e)
        return
    problem = target_modules_problem(list(spec.lora.target_modules), adaptable_modules(skeleton))
    if problem is not None:
        raise ConfigError("spec.lora.targetModules", problem)


def _model_field(model: ModelSource) -> str:
    return "spec.model.hub" if model.hub else "spec.model.s3" if model.s3 else "spec.model.path"


def load(spec: TrainingSpec, device: Device, source: str, **cache: Any) -> tuple[Any, Any]:
    """(PEFT model ready to train, tokenizer) on `device`; `cache` (store, workdir, stop) turns on
    the CUDA engine's 4-bit weight cache."""
    if device == "cuda":
        from finetune_trainer.engines import cuda

        return cuda.load(spec, source, **cache)
    from finetune_trainer.engines import cpu

    return cpu.load(spec, source)
