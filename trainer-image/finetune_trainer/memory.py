"""GPU memory of one training micro-batch on the CUDA engine (Unsloth, 4-bit base, LoRA): what the
step split (batching.py) and the activation plan (engines/cuda.py) are decided from.

A micro-batch of T tokens needs, above the weights,
- `base_per_token` x T with every decoder layer checkpointed: the hidden state each layer hands
  the next (offloaded to host memory by Unsloth), one layer's activations while it is recomputed,
  and the chunked cross-entropy over the vocabulary;
- plus `kept_per_token_layer` x T for every layer that keeps its activations instead of
  recomputing them in the backward pass (no recomputation: a quarter less arithmetic).
Unsloth trains padding-free, so T is the sum of the rows' lengths.

The constants were measured on the 8B shape (docs/benchmarks.md, "Memory model") and are scaled
by the model's shape: `base_per_token` by hidden size, `kept_per_token_layer` by the number of
activation elements one Llama layer saves per token, (6 x hidden + 2 x key/value width +
2 x intermediate), as bf16.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_BYTES_PER_TOKEN_PER_HIDDEN = 72
"""Peak bytes per micro-batch token with every layer checkpointed, over hidden size. 8B shape on
an H100: 7.03 GiB peak at 1.4k tokens, 15.54 at 32k; the line through the two ends is 286 KB a
token at hidden 4096 (70 a hidden unit), so it bounds the middle too."""
KEPT_LAYER_FACTOR = 1.25
"""Bytes per saved activation element of a kept layer, over bf16's 2: autograd's saved tensors
(norm inputs, the projections' inputs, q/k/v and the attention output, the MLP's gate and up
outputs) plus the transient of the layer's backward."""
OVERHEAD_BYTES = 1.5 * 2**30
"""Peak memory above the weights that does not grow with tokens (8B shape: 1.05 GiB measured):
the adapters in fp32 with their gradients and 8-bit optimizer states, CUDA context leftovers."""
MEMORY_MARGIN = 0.15
"""Share of the GPU's free memory left unused (allocator fragmentation, other processes)."""


@dataclass(frozen=True)
class ModelMemory:
    """Bytes a micro-batch costs on the GPU, for one model shape."""

    weights: float
    """The 4-bit model on the GPU (NF4 linear layers, 16-bit embeddings and head)."""
    base_per_token: float
    kept_per_token_layer: float
    layers: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelMemory:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        saved = 6 * hidden + 2 * kv_heads * head_dim + 2 * inter
        return cls(
            weights=weight_bytes(config),
            base_per_token=BASE_BYTES_PER_TOKEN_PER_HIDDEN * hidden,
            kept_per_token_layer=2 * KEPT_LAYER_FACTOR * saved,
            layers=int(config["num_hidden_layers"]),
        )

    def usable(self, free_bytes: float, *, weights_loaded: bool) -> float:
        """Bytes a micro-batch's activations may take out of `free_bytes` (free before the model was
        loaded, or after it): the margin, the fixed overhead and, if not loaded yet, the weights off."""
        usable = free_bytes * (1 - MEMORY_MARGIN) - OVERHEAD_BYTES
        return usable if weights_loaded else usable - self.weights

    def token_limit(self, usable: float) -> int:
        """Most tokens one micro-batch may hold with every layer checkpointed."""
        return max(0, int(usable // self.base_per_token))

    def layers_kept(self, tokens: int, usable: float) -> int:
        """How many decoder layers a micro-batch of `tokens` can run without recomputation."""
        if tokens <= 0:
            return self.layers
        spare = usable - tokens * self.base_per_token
        return max(0, min(self.layers, math.floor(spare / (tokens * self.kept_per_token_layer))))

    def peak(self, tokens: int, layers_kept: int) -> float:
        """Predicted peak bytes (weights included) of a micro-batch: what the benchmark compares
        with torch.cuda.max_memory_allocated()."""
        return (
            self.weights
            + OVERHEAD_BYTES
            + tokens * (self.base_per_token + layers_kept * self.kept_per_token_layer)
        )


def weight_bytes(config: Mapping[str, Any]) -> float:
    """Bytes of the 4-bit model on the GPU: NF4 linear layers (0.5 byte a weight plus absmax),
    embeddings and the output head in 16-bit."""
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer * 0.5625 + embeddings * 2


def model_config(source: str) -> dict[str, Any]:
    """The model's config.json as a dict: read from a local folder, or fetched alone from the hub."""
    local = Path(source) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).to_dict()


def peak_gpu_memory_gib(device: str) -> float | None:
    """GiB the CUDA caching allocator reserved at its peak so far (what `nvidia-smi` shows of this
    process, about); None off CUDA."""
    if device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_reserved() / 2**30, 2)
