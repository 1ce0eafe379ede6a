"""Data-parallel training on GPUs: the trainer's torchrun path, as a multi-GPU pod runs it.

    python bench_ddp.py MODEL_DIR DATA_DIR OUT_DIR

Runs the seeds' medical recipe (the first 500 medical rows, 30 steps, no export) three ways, all
`python -m finetune_trainer run` with the same 8 rows per optimizer step:
- `single`: one process, no launcher (what a one-GPU pod runs), batchSize 2 x accumulation 4;
- `torchrun-1`: FINETUNE_NPROC_PER_NODE=1, the same recipe through the launcher and torchrun's
  agent with one NCCL rank: the cost of the path itself (should be the same figures);
- `torchrun-N` (only when the machine has N >= 2 GPUs): N ranks, batchSize 2 x accumulation
  4/N x N GPUs (the same rows per step), NCCL.
Figures: exit code, time to the first step, steady tokens/s (over all ranks), each rank's GPU
memory, per-step losses and their largest relative difference from `single` (bf16: expect ~1e-2,
not the CPU tests' 1e-7). OUT_DIR gets ddp.json. Not run by CI; needs the benchmark's model
folder (prepare.py) and data (fetch scripts), as bench_trainer.py does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_trainer  # noqa: E402

ROWS_PER_STEP = 8
STEPS = 30


def run(
    name: str, model: Path, data: Path, root: Path, *, env: dict[str, str], ranks: int | None
) -> dict[str, Any]:
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    per_rank = ROWS_PER_STEP // (ranks or 1)
    spec = bench_trainer.job_spec(
        model,
        data,
        {"uri": str(workdir / "store")},
        training={"batchSize": 2, "gradientAccumulationSteps": per_rank // 2, "maxSteps": STEPS},
        export={"gguf": []},
    )
    job = workdir / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    extra = {"FINETUNE_NPROC_PER_NODE": str(ranks)} if ranks else {}
    started, lines, summary, code = bench_trainer.run_trainer(job, workdir, {**env, **extra})
    progress = bench_trainer.progress_of(lines)
    figures: dict[str, Any] = {"exit_code": code, "ranks": ranks or 1, "steps": len(progress)}
    if progress:
        tps, _per_step, seconds = bench_trainer.steady(progress)
        figures.update(
            time_to_first_step_s=round(progress[0]["t"] - started, 1),
            tokens_per_second=round(tps, 1),
            seconds_per_step=round(seconds, 3),
            losses=[float(x["loss"]) for x in progress],
        )
    figures.update(
        peak_gpu_gib=summary.get("peakGpuMemoryGiB"),
        gpu_per_rank_gib=summary.get("gpuMemoryPerRankGiB"),
        tokens=summary.get("tokens"),
        exit_reason=summary.get("exitReason"),
        message=summary.get("message"),
    )
    return figures


def max_relative_difference(a: list[float], b: list[float]) -> float | None:
    pairs = list(zip(a, b, strict=False))
    return max(abs(x - y) / abs(y) for x, y in pairs) if pairs else None


def main() -> None:
    import torch

    model, data_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    rows = (data_dir / "medical.jsonl").read_text().splitlines()[:500]
    data = root / "medical500.jsonl"
    data.write_text("\n".join(rows) + "\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(bench_trainer.REPO / "trainer-image"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    gpus = torch.cuda.device_count()
    results = {
        "single": run("single", model, data, root, env=env, ranks=None),
        "torchrun-1": run("torchrun-1", model, data, root, env=env, ranks=1),
    }
    ranks = 4 if gpus >= 4 else 2 if gpus >= 2 else 0  # divisors of the 8 rows per step
    if ranks:
        results[f"torchrun-{ranks}"] = run(f"torchrun-{ranks}", model, data, root, env=env, ranks=ranks)
    base = results["single"].get("losses") or []
    for name, figures in results.items():
        figures["loss_max_rel_diff_vs_single"] = max_relative_difference(figures.get("losses") or [], base)
        print(name, json.dumps({k: v for k, v in figures.items() if k != "losses"}), flush=True)
    (out / "ddp.json").write_text(json.dumps({"gpus": gpus, **results}, indent=1))


if __name__ == "__main__":
    main()
