"""The CUDA engine: Unsloth's FastLanguageModel, 4-bit, LoRA through `get_peft_model`.

`import unsloth` needs a GPU and patches transformers/TRL on import, so it happens only here, and
before anything imports TRL's trainer (train.py imports SFTTrainer lazily, after the engine).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer import weight_cache
from finetune_trainer.engines import ensure_pad_token, hub_token
from finetune_trainer.memory import ModelMemory
from finetune_trainer.spec import TrainingSpec

if TYPE_CHECKING:
    from finetune_trainer.storage import ObjectStore

log = logging.getLogger(__name__)


def load(
    spec: TrainingSpec,
    source: str,
    *,
    store: ObjectStore | None = None,
    workdir: Path | None = None,
    stop: Any = None,
) -> tuple[Any, Any]:
    """(PEFT model, tokenizer). With `store` and `workdir`, the 4-bit base comes from the job's
    weight cache when a previous pod left it there, and is put there otherwise (weight_cache.py)."""
    started = time.monotonic()
    from unsloth import FastLanguageModel  # needs a GPU; see the module docstring

    from finetune_trainer.engines.cuda_attention import enable_varlen_attention

    log.info("unsloth imported in %.1fs", time.monotonic() - started)
    log.info(enable_varlen_attention())

    lora = spec.lora
    # Unsloth's LoftQ quantizes the adapter's base itself and refuses a model already loaded in 4-bit.
    load_in_4bit = spec.model.load_in_4bit and not lora.use_loftq
    cache_key, cached = None, None
    if load_in_4bit and store is not None and workdir is not None:
        cache_key = _weight_cache_key(spec, source)
        cached = weight_cache.fetch(store, cache_key, workdir / "base-4bit") if cache_key else None
    started = time.monotonic()

    import torch

    def from_pretrained(name: str, revision: str | None) -> tuple[Any, Any]:
        return FastLanguageModel.from_pretrained(
            model_name=name,
            max_seq_length=spec.model.max_seq_length,
            load_in_4bit=load_in_4bit,
            dtype=None,
            revision=revision,
            trust_remote_code=spec.model.trust_remote_code,
            token=hub_token(),
            # One GPU per rank (distributed.Ranks.start set it current); by default Unsloth loads
            # onto the first GPU, so every rank would share it.
            **({"device_map": {"": torch.cuda.current_device()}} if _data_parallel() else {}),
        )

    model = tokenizer = None
    if cached is not None:
        try:
            model, tokenizer = from_pretrained(str(cached), None)
        except Exception as e:  # a cache this Unsloth cannot load: quantize as the first pod did
            log.warning("4-bit weight cache: loading failed (%s: %s); quantizing", type(e).__name__, e)
        if model is not None and not weight_cache.matches(cached, model):
            log.warning("4-bit weight cache: the loaded state differs from the recorded one; quantizing")
            model = tokenizer = None
            torch.cuda.empty_cache()
        if model is None:
            cached = None
    if model is None:
        model, tokenizer = from_pretrained(source, spec.model.revision)
    log.info(
        "base loaded in %.1fs (%s)",
        time.monotonic() - started,
        f"4-bit weights from the job's cache {cache_key}"
        if cached
        else "quantized on load"
        if load_in_4bit
        else "16-bit",
        extra={
            "fields": {
                "event": "base-loaded",
                "weightCache": "hit" if cached else "miss" if cache_key else None,
            }
        },
    )
    if cache_key and not cached and store is not None and workdir is not None:
        publisher = weight_cache.Publisher(store, cache_key, workdir / "base-4bit", stop)
        publisher.snapshot(model, tokenizer)
        publisher.start()
    # `auto` loads with Unsloth's offloaded checkpointing armed on every layer; ActivationPlan then
    # turns it off, micro-batch by micro-batch, for the layers whose activations fit.
    checkpointing: str | bool = {"auto": "unsloth", "unsloth": "unsloth", "true": True, "false": False}[
        lora.gradient_checkpointing
    ]
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        use_gradient_checkpointing=checkpointing,
        random_state=lora.random_state,
        use_rslora=lora.use_rslora,
        loftq_config={"loftq_bits": 4, "loftq_iter": 1} if lora.use_loftq else None,
        max_seq_length=spec.model.max_seq_length,
    )
    return model, ensure_pad_token(tokenizer)


def _weight_cache_key(spec: TrainingSpec, source: str) -> str | None:
    """The cache key of this base (weight_cache.cache_key); None when the exact weights cannot be
    named: a hub model whose commit cannot be looked up."""
    import torch

    revision = spec.model.revision
    model_dir = Path(source) if Path(source).is_dir() else None
    if model_dir is None:
        try:
            from huggingface_hub import HfApi

            revision = HfApi().model_info(source, revision=revision, token=hub_token()).sha
        except Exception as e:
            log.info("4-bit weight cache off: the hub commit of %s is unknown (%s)", source, type(e).__name__)
            return None
    quantization = {"type": "nf4", "double": True, "compute": str(torch.bfloat16)}
    return weight_cache.cache_key(source, revision, model_dir, quantization)


class ActivationPlan:
    """`gradientCheckpointing: auto`: before each micro-batch, how many decoder layers keep their
    activations (no recomputation in the backward pass) and how many are checkpointed.

    Keeping a layer's activations saves its forward recomputation (a quarter of its arithmetic) and
    Unsloth's offload of its input to host memory, and costs `memory.kept_per_token_layer` bytes per
    token. The number kept is decided per micro-batch from its actual size, so a long micro-batch
    recomputes more layers instead of running out of memory, and a short one recomputes none. The
    last layers are the kept ones (the backward pass frees their activations first). The maths is
    the same either way; only memory and time change.
    """

    def __init__(self, layers: list[Any], memory: ModelMemory, usable_bytes: float) -> None:
        self.layers = layers
        self.memory = memory
        self.usable = usable_bytes
        self.kept: int | None = None
        self.kept_range: tuple[int, int] | None = None

    def __call__(self, tokens: int) -> None:
        kept = self.memory.layers_kept(tokens, self.usable)
        checkpointed = len(self.layers) - kept
        # Set every time: Unsloth's for_training (at train() start, after generate) resets them.
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = index < checkpointed
        if kept != self.kept:
            if self.kept is None:
                log.info(
                    "activations: %d of %d layers kept, %d recomputed, for a micro-batch of %d tokens "
                    "(%.1f GiB usable for activations; gradientCheckpointing: auto)",
                    kept,
                    len(self.layers),
                    checkpointed,
                    tokens,
                    self.usable / 2**30,
                )
            self.kept = kept
        low, high = self.kept_range or (kept, kept)
        self.kept_range = (min(low, kept), max(high, kept))


def activation_plan(spec: TrainingSpec, model: Any, model_config: dict[str, Any]) -> ActivationPlan | None:
    """The plan for `gradientCheckpointing: auto`, sized by the GPU memory left after loading; None
    for the other settings (they are applied as written at load)."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    if spec.lora.gradient_checkpointing != "auto":
        return None
    # The decoder layers that loading armed with Unsloth's checkpoint function, in order.
    layers = [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer)
        and getattr(m, "_gradient_checkpointing_func", None) is not None
    ]
    if not layers:
        log.warning("activations: no checkpointable layers found; training without checkpointing")
        return None
    free, _total = torch.cuda.mem_get_info()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    memory = ModelMemory.from_config(model_config)
    return ActivationPlan(layers, memory, memory.usable(free + cached, weights_loaded=True))


def _data_parallel() -> bool:
    """Whether this process is one rank of several (torchrun's WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
