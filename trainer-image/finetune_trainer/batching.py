"""How an optimizer step of the recipe is executed: into how many micro-batches its rows are split.

The recipe fixes the rows of every optimizer step, batchSize x gradientAccumulationSteps (per GPU),
and their order (the seeded sampler draws one permutation of the data set, whatever the split).
HF Trainer normalises the loss of each micro-batch by the labelled tokens of the whole step
(`num_items_in_batch`), so a step run as 1 micro-batch of 8 rows computes the same loss and the
same gradient as 4 micro-batches of 2 rows, up to the order of floating-point sums. A step of few
small micro-batches leaves a large GPU idle (notes/gpu-recipe.md: 2.5-3.4x slower on an H100), so
by default (`microBatches: auto`) the trainer runs the fewest micro-batches whose rows fit:

- the micro-batch must divide the step's rows (every step then has the same split);
- the worst micro-batch, not a typical one, must fit: on the GPU (padding-free rows) the sum of
  the longest rows of the data set, with every layer checkpointed (memory.py); padded batches
  (the CPU engine) cost their longest row times the rows;
- a micro-batch may be smaller than the spec's batchSize when even that does not fit.

`microBatches: literal` runs exactly what the spec says. `plan` is pure; runner.py calls it after
preflight (which gives the tokenized lengths) and before the model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune_trainer.memory import ModelMemory
from finetune_trainer.spec import TrainingSpec

CPU_TOKEN_BUDGET = 16384
"""Padded tokens (rows x longest row) one micro-batch may hold on the CPU engine: far above what
the tiny CPU models need per step, and well inside a laptop's memory for them."""


@dataclass(frozen=True)
class BatchPlan:
    """The split of every optimizer step: `batch_size` rows per micro-batch, `gradient_accumulation_steps`
    micro-batches; their product is always the recipe's rows per step."""

    batch_size: int
    gradient_accumulation_steps: int
    reason: str

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def worst_tokens(sorted_lengths: Sequence[int], rows: int, *, padded: bool) -> int:
    """Tokens of the largest micro-batch of `rows` rows the data set can produce; `sorted_lengths`
    in descending order. Padded: every row takes the longest row's length."""
    if not sorted_lengths:
        return 0
    if padded:
        return rows * sorted_lengths[0]
    return sum(sorted_lengths[:rows])


def plan(
    spec: TrainingSpec,
    lengths: Sequence[int],
    *,
    device: str,
    memory: ModelMemory | None = None,
    free_bytes: float | None = None,
) -> BatchPlan:
    """The split for `spec` given the tokenized rows' `lengths` (after truncation).

    On CUDA, `memory` and `free_bytes` (free GPU memory before the model is loaded) bound a
    micro-batch; without them (or on the CPU) the CPU token budget does."""
    t = spec.training
    rows = t.batch_size * t.gradient_accumulation_steps
    recipe = (
        f"{rows} rows per step (batchSize {t.batch_size} x gradientAccumulationSteps "
        f"{t.gradient_accumulation_steps})"
    )
    if t.micro_batches == "literal":
        return BatchPlan(
            t.batch_size,
            t.gradient_accumulation_steps,
            f"{recipe} run as written: {t.gradient_accumulation_steps} micro-batches of {t.batch_size} rows "
            "(microBatches: literal)",
        )
    max_len = spec.model.max_seq_length
    row_lengths = [max_len] if t.packing else sorted((min(n, max_len) for n in lengths), reverse=True)
    gpu = device == "cuda" and memory is not None and free_bytes is not None
    if gpu:
        assert memory is not None and free_bytes is not None
        limit = memory.token_limit(memory.usable(free_bytes, weights_loaded=False))
        padded = False
        bound = f"fit {free_bytes / 2**30:.1f} GiB free with every layer checkpointed"
    else:
        limit, padded = CPU_TOKEN_BUDGET, True
        bound = f"within the CPU budget of {CPU_TOKEN_BUDGET} padded tokens"
    # Packed rows all have max_seq_length tokens.
    sized = row_lengths * rows if t.packing else row_lengths
    for micro in divisors_descending(rows):
        worst = worst_tokens(sized, micro, padded=padded)
        if worst <= limit:
            break
    else:
        micro, worst = 1, worst_tokens(sized, 1, padded=padded)
        bound += "; not even one row fits, so one row per micro-batch"
    accumulation = rows // micro
    split = (
        f"1 micro-batch of {micro} rows"
        if accumulation == 1
        else f"{accumulation} micro-batches of {micro} rows"
    )
    return BatchPlan(
        micro,
        accumulation,
        f"{recipe} run as {split}: the largest possible micro-batch holds {worst:,} tokens, and "
        f"up to {limit:,} {bound} (microBatches: auto)",
    )
