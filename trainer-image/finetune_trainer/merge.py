"""Merge the LoRA adapter into the 16-bit base (not into dequantized 4-bit weights): docs/export.md.

Same as Unsloth's `save_pretrained_merged(..., "merged_16bit")` (unsloth_zoo's
`merge_and_overwrite_lora` re-reads the original 16-bit weights, adds B @ A * scale in float32 and
casts back to the checkpoint's dtype), with transformers + PEFT, so the CPU and CUDA engines merge
with the same code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
SIXTEEN_BIT = ("bfloat16", "float16")


def merged_dtype(config_dtype: Any) -> str:
    """Dtype of the merged checkpoint: the base's when it is 16-bit, else bfloat16 (float32 range)."""
    name = str(config_dtype).removeprefix("torch.") if config_dtype is not None else ""
    return name if name in SIXTEEN_BIT else "bfloat16"


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Tokenizer and generation files of the base that save_pretrained did not write (for example a
    SentencePiece tokenizer.model, which llama.cpp's converter reads)."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, device: str) -> Any:
    """Load the base fresh in float32, merge the adapter, save the merged model in 16-bit to `out_dir`.

    Returns the merged model in float32 holding exactly the saved 16-bit values: the reference that
    the f16 GGUF is compared with (float32 compute, so the reference itself adds no rounding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base_dir)
    dtype = getattr(
        torch, merged_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map=device)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model = model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    copy_side_files(base_dir, out_dir)
    return model.to(torch.float32).eval()
