"""What evaluation costs: seconds per 100 validation rows on the tiny model, on this machine's CPU,
next to the seconds of one training step of the same job.

The real trainer runs in this process (`runner.run`) on the tiny 4-bit Llama of the tests
(hidden 256, 2 layers) with the alpaca template and maxSeqLength 256: 400 rows, 200 of them held
out (validation.fraction 0.5), `maxRows` 100 and then 200, an evaluation every 2 steps, batch 4.
Each evaluation's time is transformers' own `eval_runtime` (in metrics.jsonl as evalSeconds); a
training step's is the time between two consecutive train records with no evaluation between them.

Usage: .venv/bin/python benchmarks/eval/bench_eval.py   (writes benchmarks/eval/results.json)
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import trainer_runs  # noqa: E402
from trainer_fixtures import alpaca_rows, build_tiny_model, job_manifest, write_job, write_jsonl  # noqa: E402

STEPS = 8


def when(record: dict) -> float:
    return datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()


def measure(root: Path, model: Path, data: Path, max_rows: int) -> dict:
    manifest = job_manifest(model, data, str(root / f"store-{max_rows}"), name=f"eval-{max_rows}")
    spec = manifest["spec"]
    spec["model"]["maxSeqLength"] = 256
    spec["lora"] = {"r": 16, "alpha": 16, "gradientCheckpointing": "false"}
    spec["training"].update(maxSteps=STEPS, batchSize=4, gradientAccumulationSteps=1)
    spec["data"]["validation"] = {"fraction": 0.5, "maxRows": max_rows}
    spec["evaluation"] = {"everySteps": 2}
    run = trainer_runs.run_in_process(
        write_job(root / f"job-{max_rows}.yaml", manifest), root / f"run-{max_rows}"
    )
    assert run.code == 0, run.summary
    records = [
        json.loads(line) for line in (root / f"store-{max_rows}" / "artifacts" / "metrics.jsonl").open()
    ]
    evals = [r["evalSeconds"] for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    steps = [when(b) - when(a) for a, b in itertools.pairwise(train) if b["step"] % 2 == 0]
    rows = run.summary["validationRows"]
    return {
        "rowsEvaluated": rows,
        "evaluations": len(evals),
        "evalSecondsMedian": round(statistics.median(evals), 3),
        "evalSecondsPer100Rows": round(statistics.median(evals) * 100 / rows, 3),
        "trainStepSecondsMedian": round(statistics.median(steps), 3),
        "rowsPerTrainStep": 4,
    }


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        data = write_jsonl(root / "rows.jsonl", alpaca_rows(400))
        results = {str(n): measure(root, model, data, n) for n in (100, 200)}
    out = {"machine": f"{os.cpu_count()} CPUs, OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}", **results}
    (Path(__file__).parent / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
