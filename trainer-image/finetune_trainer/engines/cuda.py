"""The CUDA engine: Unsloth's FastLanguageModel, 4-bit, LoRA through `get_peft_model`.

`import unsloth` needs a GPU and patches transformers/TRL on import, so it happens only here, and
before anything imports TRL's trainer (train.py imports SFTTrainer lazily, after the engine).
"""

from __future__ import annotations

import logging
from typing import Any

from finetune_trainer.engines import ensure_pad_token, hub_token
from finetune_trainer.memory import ModelMemory
from finetune_trainer.spec import TrainingSpec

log = logging.getLogger(__name__)


def load(spec: TrainingSpec, source: str) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # needs a GPU; see the module docstring

    from finetune_trainer.engines.cuda_attention import enable_varlen_attention

    log.info(enable_varlen_attention())

    lora = spec.lora
    # Unsloth's LoftQ quantizes the adapter's base itself and refuses a model already loaded in 4-bit.
    load_in_4bit = spec.model.load_in_4bit and not lora.use_loftq
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=source,
        max_seq_length=spec.model.max_seq_length,
        load_in_4bit=load_in_4bit,
        dtype=None,
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
        token=hub_token(),
    )
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
        if kept != self.kept:
            checkpointed = len(self.layers) - kept
            for index, layer in enumerate(self.layers):
                layer.gradient_checkpointing = index < checkpointed
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
