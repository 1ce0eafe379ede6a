"""Merge the LoRA adapter into the 16-bit base (not into dequantized 4-bit weights): docs/export.md.

The merged weight of every adapted linear layer is W + scale x (B @ A), computed in float64 from
the base's 16-bit W and the adapter's float32 A and B and rounded once to the base's 16-bit dtype;
every other tensor is the base's, unchanged. This is what Unsloth's
`save_pretrained_merged(..., "merged_16bit")` and PEFT's `merge_and_unload` compute (they add in
float32, which can round differently in the last bit of a few weights); float64 makes the result
the same on the CPU and the GPU, so the GGUF writer (gguf_write.py, in its own process) and the
merged model the export verifies against (this process) hold the same weights bit for bit.

`Merger` gives the merged tensors one at a time (the GGUF writer never holds the whole model);
`merged_model` is the HF model holding them; `merge_adapter` saves them as a folder (the
`merged_16bit` artifact, and the converter's input where the streaming writer cannot be used).
Adapters other than plain LoRA pairs on linear layers are merged by PEFT instead.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.engines import WEIGHT_SUFFIXES

SIXTEEN_BIT = ("bfloat16", "float16")
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def merged_dtype(config_dtype: Any) -> str:
    """Dtype of the merged checkpoint: the base's when it is 16-bit, else bfloat16 (float32 range)."""
    name = str(config_dtype).removeprefix("torch.") if config_dtype is not None else ""
    return name if name in SIXTEEN_BIT else "bfloat16"


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Tokenizer and generation files of the base that save_pretrained did not write (for example a
    SentencePiece tokenizer.model, which llama.cpp's converter reads)."""
    for path in base_dir.iterdir():
        if (
            path.is_file()
            and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json"))
            and not (out_dir / path.name).exists()
        ):
            shutil.copy2(path, out_dir / path.name)


@dataclass(frozen=True)
class LoraDeltas:
    """The adapter as plain tensors: base weight name -> (A, B), and the scale of B @ A."""

    pairs: dict[str, tuple[Any, Any]]
    scale: float


class UnsupportedAdapterError(Exception):
    """The adapter holds something other than plain LoRA pairs on linear layers (DoRA magnitudes,
    embedding adapters, modules_to_save, per-module ranks): merged by PEFT instead."""


def read_adapter(adapter_dir: Path) -> LoraDeltas:
    """A PEFT LoRA adapter folder's pairs and scale (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise UnsupportedAdapterError("not a plain LoRA adapter (DoRA or modules_to_save)")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("fan_in_fan_out"):
        raise UnsupportedAdapterError("per-module ranks or alphas, or fan_in_fan_out")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(f"adapter tensor {key} is not a LoRA A or B matrix")
        halves.setdefault(f"{match.group(1)}.weight", {})[match.group(2)] = tensor
    pairs = {}
    for name, half in halves.items():
        if set(half) != {"A", "B"}:
            raise UnsupportedAdapterError(f"{name}: lora_A or lora_B missing")
        pairs[name] = (half["A"], half["B"])
    return LoraDeltas(pairs, scale)


def merge_weight(weight: Any, a: Any, b: Any, scale: float, dtype: Any) -> Any:
    """W + scale x (B @ A) in float64, rounded once to `dtype`, on W's device."""
    import torch

    delta = b.to(weight.device, torch.float64) @ a.to(weight.device, torch.float64)
    return (weight.to(torch.float64) + scale * delta).to(dtype)


def base_dtype(base_dir: Path) -> Any:
    """The merged model's 16-bit dtype (merged_dtype of the base's config)."""
    import torch

    config = json.loads((base_dir / "config.json").read_text())
    return getattr(torch, merged_dtype(config.get("dtype") or config.get("torch_dtype")))


def base_weight_files(base_dir: Path) -> list[Path]:
    return sorted(base_dir.glob("*.safetensors"))


class Merger:
    """Merged tensors by name, one at a time: `merged(name, base_tensor)` is the tensor the merged
    model holds (adapted weights merged, every floating tensor in the 16-bit dtype)."""

    def __init__(self, base_dir: Path, adapter_dir: Path) -> None:
        from safetensors import safe_open

        self.deltas = read_adapter(adapter_dir)
        self.dtype = base_dtype(base_dir)
        files = base_weight_files(base_dir)
        if not files:
            raise UnsupportedAdapterError(f"{base_dir} holds no safetensors weights")
        names: set[str] = set()
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                names.update(f.keys())
        missing = sorted(set(self.deltas.pairs) - names)
        if missing:
            raise UnsupportedAdapterError(f"the adapter targets weights the base lacks: {missing[:3]}")

    def merged(self, name: str, tensor: Any) -> Any:
        pair = self.deltas.pairs.get(name)
        if pair is not None:
            return merge_weight(tensor, pair[0], pair[1], self.deltas.scale, self.dtype)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def merged_model(base_dir: Path, adapter_dir: Path, device: str) -> Any:
    """The merged model in float32 on `device`, holding exactly the merged 16-bit values: the
    reference a GGUF is checked against (float32 compute, so the reference adds no rounding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map=device)
    try:
        merger = Merger(base_dir, adapter_dir)
    except UnsupportedAdapterError:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        dtype = base_dtype(base_dir)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(dtype).to(torch.float32))
        return model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # from_pretrained upcast the 16-bit values exactly, so this is the stored tensor
            param.copy_(merger.merged(name, param.to(merger.dtype)).to(torch.float32))
    return model.eval()


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, device: str) -> None:
    """Save the merged model as a 16-bit safetensors folder with the base's config and tokenizer:
    one output file per base file with the same tensor names, so the base's index stays valid."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        merger = Merger(base_dir, adapter_dir)
    except UnsupportedAdapterError:
        _merge_with_peft(base_dir, adapter_dir, out_dir, device)
    else:
        for path in base_weight_files(base_dir):
            with safe_open(str(path), framework="pt", device=device) as f:
                part = {name: merger.merged(name, f.get_tensor(name)).contiguous().cpu() for name in f.keys()}  # noqa: SIM118
                metadata = f.metadata() or {"format": "pt"}
            save_file(part, str(out_dir / path.name), metadata=metadata)
            del part
        for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, out_dir / name)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    copy_side_files(base_dir, out_dir)


def _merge_with_peft(base_dir: Path, adapter_dir: Path, out_dir: Path, device: str) -> None:
    """PEFT's own merge, for adapters `read_adapter` refuses."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map=device)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(base_dtype(base_dir)).save_pretrained(out_dir)
