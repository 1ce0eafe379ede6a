"""`batchSize: auto` by a token budget: the micro-batch is as many rows as fit a number of real
tokens, not a number of rows, because on a GPU the tokens in one micro-batch set the speed.

The CUDA engine trains padding-free (Unsloth's default for SFT without packing): a micro-batch of B
rows costs the sum of their lengths, no padding. So B = token budget / mean row length. With
`packing` a row is a packed max-length sequence and B = budget / maxSeqLength.

The budget is the smaller of
- `TOKEN_BUDGET`, where tokens/s stops rising (measured on an H100 with the 8B shape, see
  docs/benchmarks.md: a larger micro-batch adds memory, not speed), and
- what fits the GPU's free memory with a margin: (free x (1 - MEMORY_MARGIN) - overhead - 4-bit
  weights) / bytes per token, with bytes per token measured on the H100 (peak memory against
  micro-batch tokens, Unsloth's offloaded activation checkpointing) and scaled by hidden size.
The worst micro-batch, not the mean one, must fit: the memory check adds four standard deviations
of the sum of B random rows.

Accumulation keeps at least the effective batch the user asked for (the tutorials' 2 rows x
gradientAccumulationSteps); when one micro-batch already holds more rows, accumulation is 1 and the
effective batch is the micro-batch (reported in the plan's reason, the log and the status).

batching.plan calls plan_batch for `batchSize: auto`; runner.py logs the plan and reports it in status.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_trainer.batching import DEFAULT_ROWS, BatchPlan

TOKEN_BUDGET = 32768
"""Real tokens per micro-batch past which tokens/s barely rises: on an H100 with the 8B shape and
varlen attention, 16k tokens gave 10,836 tok/s and 32k 11,168 (docs/benchmarks.md)."""
MEMORY_MARGIN = 0.15
"""Share of free GPU memory left unused (allocator fragmentation, other processes)."""
BYTES_PER_TOKEN_PER_HIDDEN = 72
"""Peak reserved GPU bytes per micro-batch token divided by hidden size. 8B shape on the H100:
7.03 GiB at 1.4k tokens, 12.95 at 16k, 15.54 at 32k; the line through the two ends is 286 KB a
token at hidden 4096 (70 a hidden unit), so it bounds the middle too. It holds one layer's
activations under offloaded checkpointing and the chunked cross-entropy over a 128k vocabulary."""
OVERHEAD_GIB = 1.5
"""Peak memory above the weights that does not grow with tokens (8B shape: 1.05 GiB on the line above)."""
MAX_ROWS = 4096
"""The spec's upper bound for batchSize."""


def model_config(source: str) -> dict[str, Any]:
    """The model's config.json as a dict: read from a local folder, or fetched alone from the hub."""
    local = Path(source) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).to_dict()


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


def plan_batch(
    gradient_accumulation_steps: int,
    lengths: Sequence[int],
    device: str,
    free_memory_gib: float | None,
    config: Mapping[str, Any],
    *,
    packing: bool = False,
    max_seq_length: int = 2048,
    token_budget: int = TOKEN_BUDGET,
) -> BatchPlan:
    """The micro-batch (rows) and accumulation for `batchSize: auto`."""
    effective = DEFAULT_ROWS * gradient_accumulation_steps
    if device != "cuda" or not lengths:
        return BatchPlan(DEFAULT_ROWS, gradient_accumulation_steps, "auto on cpu: the tutorials' batch")
    row_lengths = [max_seq_length] if packing else [min(n, max_seq_length) for n in lengths]
    mean = statistics.fmean(row_lengths)
    spread = statistics.pstdev(row_lengths)
    per_token = BYTES_PER_TOKEN_PER_HIDDEN * int(config["hidden_size"])
    fit_tokens = math.inf
    if free_memory_gib is not None:
        usable = (free_memory_gib * (1 - MEMORY_MARGIN) - OVERHEAD_GIB) * 2**30 - weight_bytes(config)
        fit_tokens = max(0.0, usable / per_token)
    rows = max(1, min(MAX_ROWS, int(token_budget // mean)))
    while rows > 1 and rows * mean + 4 * spread * math.sqrt(rows) > fit_tokens:
        rows -= 1
    accumulation = max(1, math.ceil(effective / rows))
    budget = min(token_budget, fit_tokens)
    return BatchPlan(
        rows,
        accumulation,
        f"auto: token budget {budget:.0f} / mean row {mean:.0f} tokens"
        f"{' (packed rows)' if packing else ' (padding-free)'} = {rows} rows x {accumulation} "
        f"accumulation, effective batch {rows * accumulation} rows (asked {effective})",
    )
