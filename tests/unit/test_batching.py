"""The step split (batching.plan) and the GPU memory model behind it (memory.py): pure decisions."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_trainer import batching
from finetune_trainer.memory import MEMORY_MARGIN, OVERHEAD_BYTES, ModelMemory, weight_bytes
from finetune_trainer.spec import TrainingSpec

LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
GIB = 2**30


def spec(**training: Any) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {"model": {"path": "/m", "maxSeqLength": 2048}, "data": {"path": "/d.jsonl"}, "training": training}
    )


def test_literal_runs_the_spec_as_written() -> None:
    plan = batching.plan(spec(microBatches="literal"), [100] * 50, device="cpu")
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (2, 4)
    assert "microBatches: literal" in plan.reason


def test_auto_runs_a_step_as_one_micro_batch_when_it_fits() -> None:
    memory = ModelMemory.from_config(LLAMA_8B)
    plan = batching.plan(spec(), [700] * 500, device="cuda", memory=memory, free_bytes=139 * GIB)
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (8, 1)
    assert plan.rows_per_step == 8
    assert plan.reason.startswith(
        "8 rows per step (batchSize 2 x gradientAccumulationSteps 4) run as 1 micro"
    )


def test_auto_keeps_rows_per_step_and_picks_a_divisor() -> None:
    """12 rows a step on a GPU where only 5 of the longest rows fit: 4 x 3, never 5 + 5 + 2."""
    memory = ModelMemory.from_config(LLAMA_8B)
    lengths = [2048] * 100
    usable = 5 * 2048 * memory.base_per_token + 1  # 5 worst-case rows with every layer checkpointed
    free = (usable + OVERHEAD_BYTES + memory.weights) / (1 - MEMORY_MARGIN)
    plan = batching.plan(
        spec(batchSize=3, gradientAccumulationSteps=4), lengths, device="cuda", memory=memory, free_bytes=free
    )
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (4, 3)


def test_auto_goes_below_the_spec_batch_when_even_that_does_not_fit() -> None:
    memory = ModelMemory.from_config(LLAMA_8B)
    free = (1.5 * 2048 * memory.base_per_token + OVERHEAD_BYTES + memory.weights) / (1 - MEMORY_MARGIN)
    plan = batching.plan(spec(), [2048] * 10, device="cuda", memory=memory, free_bytes=free)
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (1, 8)


def test_auto_bounds_by_the_longest_rows_not_the_mean() -> None:
    """One long row among short ones decides: the worst micro-batch must fit, not a typical one."""
    memory = ModelMemory.from_config(LLAMA_8B)
    lengths = [100] * 999 + [2048]
    usable = (2048 + 3 * 100) * memory.base_per_token + 1
    free = (usable + OVERHEAD_BYTES + memory.weights) / (1 - MEMORY_MARGIN)
    plan = batching.plan(spec(), lengths, device="cuda", memory=memory, free_bytes=free)
    assert plan.batch_size == 4  # the 4 longest fit, the 8 longest (2048 + 700) do not


def test_cpu_split_counts_padding() -> None:
    """Padded batches (the CPU engine) cost rows x the longest row."""
    plan = batching.plan(spec(batchSize=2, gradientAccumulationSteps=8), [1024] * 40, device="cpu")
    assert plan.batch_size * 1024 <= batching.CPU_TOKEN_BUDGET
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (16, 1)
    plan = batching.plan(spec(batchSize=2, gradientAccumulationSteps=16), [1024] * 40, device="cpu")
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (16, 2)


def test_packed_rows_are_max_length() -> None:
    plan = batching.plan(
        spec(packing=True, batchSize=4, gradientAccumulationSteps=4), [10] * 40, device="cpu"
    )
    assert plan.batch_size * 2048 <= batching.CPU_TOKEN_BUDGET and plan.rows_per_step == 16


def test_plan_reason_fits_the_status_field() -> None:
    memory = ModelMemory.from_config(LLAMA_8B)
    plan = batching.plan(
        spec(batchSize=4096, gradientAccumulationSteps=4096),
        [2048] * 10,
        device="cuda",
        memory=memory,
        free_bytes=139 * GIB,
    )
    assert len(plan.reason) <= 512  # status.progress.batchPlan's maxLength


def test_weight_bytes_of_the_8b_shape() -> None:
    # NF4 linear layers (6.98 B weights x 0.5625 byte) + two 16-bit 128k x 4096 matrices.
    assert weight_bytes(LLAMA_8B) / GIB == pytest.approx(5.61, abs=0.01)


def test_layers_kept_are_the_most_that_fit_and_fall_as_micro_batches_grow() -> None:
    memory = ModelMemory.from_config(LLAMA_8B)
    usable = memory.usable(133 * GIB, weights_loaded=True)
    fixed = memory.weights + OVERHEAD_BYTES
    previous = memory.layers
    for tokens in [1, 1400, 6000, 24000, 40000, 100000, 200000, 400000]:
        kept = memory.layers_kept(tokens, usable)
        assert 0 <= kept <= previous
        if kept:
            assert memory.peak(tokens, kept) - fixed <= usable
        if kept < memory.layers and memory.peak(tokens, 0) - fixed <= usable:
            assert memory.peak(tokens, kept + 1) - fixed > usable
        previous = kept
    assert memory.layers_kept(1400, usable) == memory.layers  # an 8-row alpaca step keeps them all
    assert memory.layers_kept(400000, usable) == 0
