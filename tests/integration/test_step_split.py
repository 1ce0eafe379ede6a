"""The step split keeps the recipe: the real trainer on the tiny 4-bit Llama (CPU engine), the same
job run as written (`microBatches: literal`, 2 rows x 4 micro-batches) and as the trainer chooses
(`auto`: 1 micro-batch of 8 rows), over more than one epoch so the epoch boundary and the data
order after it are covered too.

Tolerance: 1e-5 absolute on every step's loss. Both runs see the same rows in every step (one
seeded permutation of the data set, whatever the split) and HF Trainer divides each micro-batch's
summed token losses by the labelled tokens of the whole step, so the two compute the same sums in
a different order; in fp32 on the CPU that moves a loss near 7 by about 1e-6. A split that changed
which rows a step holds, or normalised per micro-batch, moves the losses by 1e-2 or more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trainer_runs
from trainer_fixtures import alpaca_rows, job_manifest, write_job, write_jsonl

pytestmark = pytest.mark.slow

ROWS = 36  # 8 rows a step: 4.5 steps an epoch, so the 12 steps run into a third epoch
STEPS = 12
TOLERANCE = 1e-5


def run(tmp: Path, model: Path, data: Path, micro_batches: str) -> trainer_runs.InProcessRun:
    manifest = job_manifest(
        model,
        data,
        str(tmp / "store"),
        name=f"split-{micro_batches}",
        template={"type": "custom", "format": "### Q: {instruction}\n### A: {output}"},
        lora={"r": 8, "alpha": 16, "gradientCheckpointing": "false"},
    )
    manifest["spec"]["model"]["maxSeqLength"] = 64
    manifest["spec"]["training"].update(
        {"batchSize": 2, "gradientAccumulationSteps": 4, "maxSteps": STEPS, "microBatches": micro_batches}
    )
    return trainer_runs.run_in_process(write_job(tmp / "job.yaml", manifest), tmp)


def losses(done: trainer_runs.InProcessRun) -> dict[int, float]:
    return {f["step"]: f["loss"] for f in done.fields() if f.get("event") == "progress"}


def plan(done: trainer_runs.InProcessRun) -> dict[str, int]:
    return next(f for f in done.fields() if f.get("event") == "batch-plan")


def test_auto_split_trains_the_literal_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(ROWS, seed=5))
    literal = run(tmp_path / "literal", tiny_model_dir, data, "literal")
    auto = run(tmp_path / "auto", tiny_model_dir, data, "auto")
    assert literal.code == 0 and auto.code == 0
    assert (plan(literal)["batchSize"], plan(literal)["gradientAccumulationSteps"]) == (2, 4)
    assert (plan(auto)["batchSize"], plan(auto)["gradientAccumulationSteps"]) == (8, 1)
    assert any("run as 1 micro-batch of 8 rows" in m for m in auto.messages())

    expected, got = losses(literal), losses(auto)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= TOLERANCE, {s: (expected[s], got[s]) for s in expected}
    # Same rows, same tokens: the token counts of the two runs agree exactly.
    assert literal.summary["tokens"] == auto.summary["tokens"]
    assert literal.summary["steps"] == auto.summary["steps"] == STEPS
