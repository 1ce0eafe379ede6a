"""The CPU engine: transformers + bitsandbytes 4-bit NF4 + PEFT LoRA (tests, laptops, the demo).

Same knobs as the CUDA engine. fp32 compute: CPUs have no fast fp16, and fp32 makes a resumed run
reproduce the uninterrupted one exactly.
"""

from __future__ import annotations

import logging
from typing import Any

from finetune_trainer.engines import ensure_pad_token, pretrained_options
from finetune_trainer.spec import TrainingSpec

log = logging.getLogger(__name__)


OPTIMIZERS = {"adamw_8bit": "adamw_torch", "paged_adamw_8bit": "adamw_torch"}
"""bitsandbytes' 8-bit optimizers need CUDA; on the CPU the same AdamW runs in 32-bit."""


def optimizer(name: str) -> str:
    """The optimizer the CPU engine runs for spec.training.optimizer `name`."""
    return OPTIMIZERS.get(name, name)


def substitutions(spec: TrainingSpec) -> list[str]:
    """What the CPU engine runs instead of a GPU-only option, as `field: from -> to`."""
    found = []
    if optimizer(spec.training.optimizer) != spec.training.optimizer:
        found.append(f"training.optimizer: {spec.training.optimizer} -> {optimizer(spec.training.optimizer)}")
    if spec.lora.gradient_checkpointing == "unsloth":  # Unsloth's offloaded variant is CUDA-only
        found.append("lora.gradientCheckpointing: unsloth -> true")
    return found


def lora_config(spec: TrainingSpec) -> Any:
    """The PEFT LoraConfig for the job's LoRA knobs."""
    from peft import LoraConfig

    lora = spec.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )


def load(spec: TrainingSpec, source: str) -> tuple[Any, Any]:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
        )
        if spec.model.load_in_4bit
        else None
    )
    common = pretrained_options(spec)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization, dtype=torch.float32, **common
    )
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(source, **common))
    checkpointing = spec.lora.gradient_checkpointing != "false"
    if spec.model.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(spec.lora.random_state)  # the adapter's initial weights, as Unsloth's random_state
    model = get_peft_model(model, lora_config(spec))
    if spec.lora.use_loftq:
        _loftq(model, spec)
    return model, tokenizer


def _loftq(model: Any, spec: TrainingSpec) -> None:
    """LoftQ initialisation of the adapter against the 4-bit base (needs the local safetensors)."""
    from finetune_trainer.errors import ConfigError

    if not spec.model.load_in_4bit:
        raise ConfigError(
            "spec.lora.useLoftq", "LoftQ offsets 4-bit quantization error; it needs spec.model.loadIn4Bit"
        )
    from peft import replace_lora_weights_loftq

    replace_lora_weights_loftq(model)
    log.info("adapter initialised with LoftQ")
