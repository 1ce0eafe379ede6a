"""The CUDA engine: Unsloth's FastLanguageModel, 4-bit, LoRA through `get_peft_model`.

`import unsloth` needs a GPU and patches transformers/TRL on import, so it happens only here, and
before anything imports TRL's trainer (train.py imports SFTTrainer lazily, after the engine).
"""

from __future__ import annotations

import logging
from typing import Any

from finetune_trainer.engines import ensure_pad_token, hub_token
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
    checkpointing: str | bool = {"unsloth": "unsloth", "true": True, "false": False}[
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
