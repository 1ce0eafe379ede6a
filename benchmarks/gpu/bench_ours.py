"""(c) Our trainer's execution of several recipes in one process: the model loaded once, then
`finetune_trainer.train.train` (the trainer's own training loop, step split and activation plan)
run for each configuration from the same initial LoRA weights, seed and data order.

    python bench_ours.py MODEL_DIR DATA_DIR OUT.json medical:2x4:auto:12 medical:2x4:literal:12 ...

A configuration is data:RxA:split:steps[:checkpointing][p]: R rows x A accumulation as the spec
writes them, `auto` or `literal` (spec.training.microBatches), steps, and optionally the
spec's lora.gradientCheckpointing (default `auto`); a trailing `p` on the steps runs two more steps
under torch.profiler (not in the figures) and writes the table to $BENCH_PROFILE_DIR. Preflight,
loading and export are the CLI's (bench_trainer.py measures those); the figures here are the
steady-state steps, the per-step losses and the GPU memory of each execution. BENCH_DEVICE=cpu
checks the harness itself on a CPU (prepare.py's `tiny` shape; the activation plan is CUDA's).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

START = time.monotonic()
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "trainer-image"), str(HERE)]

import common  # noqa: E402


class Records(logging.Handler):
    """Keeps the trainer's progress lines (their structured fields and times)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        if fields.get("event") == "progress":
            self.lines.append({**fields, "t": record.created})


class NoUploads:
    """Stands in for the CheckpointUploader: the final checkpoint of each run is dropped."""

    last_complete = None
    failures = 0

    def submit(self, *_: Any, **__: Any) -> None:
        return None


def job(model: Path, data: Path, *, rows: int, accumulation: int, split: str, steps: int, ckpt: str) -> Any:
    from finetune_trainer.spec import TrainingSpec

    return TrainingSpec.model_validate(
        {
            "model": {"path": str(model), "maxSeqLength": 2048},
            "data": {"path": str(data)},
            "template": {"type": "custom", "format": "{text}"},
            "lora": {"gradientCheckpointing": ckpt},
            "training": {
                "batchSize": rows,
                "gradientAccumulationSteps": accumulation,
                "microBatches": split,
                "maxSteps": steps,
            },
            "checkpoint": {"everySteps": 0, "everyMinutes": 1440},
            "export": {"gguf": []},
        }
    )


def profile_steps(after: int, path: Path) -> Any:
    """Wrap ProgressCallback.on_step_end so that steps after+1 .. after+2 run under torch.profiler."""
    import torch
    from finetune_trainer import train as train_module

    original = train_module.ProgressCallback.on_step_end
    state: dict[str, Any] = {}

    def on_step_end(self: Any, args: Any, st: Any, control: Any, **kw: Any) -> None:
        original(self, args, st, control, **kw)
        if st.global_step == after:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            state["p"] = torch.profiler.profile(activities=activities)
            state["p"].__enter__()
        elif "p" in state and st.global_step == after + common.PROFILED_STEPS:
            torch.cuda.synchronize()
            state["p"].__exit__(None, None, None)
            averages = state.pop("p").key_averages()
            path.write_text(
                averages.table(sort_by="cuda_time_total", row_limit=25)
                + "\n\n"
                + averages.table(sort_by="cpu_time_total", row_limit=25)
            )

    train_module.ProgressCallback.on_step_end = on_step_end
    return lambda: setattr(train_module.ProgressCallback, "on_step_end", original)


def main() -> None:
    model_dir, data_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    configs = sys.argv[4:]
    profile_dir = Path(os.environ.get("BENCH_PROFILE_DIR", "/tmp"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from finetune_trainer import batching, engines, memory, preflight
    from finetune_trainer.engines import cuda
    from finetune_trainer.progress import Metrics, ProgressState
    from finetune_trainer.signals import StopRequest

    device = os.environ.get("BENCH_DEVICE", "cuda")
    gpu = device == "cuda"
    shape = json.loads((model_dir / "bench-params.json").read_text())
    config = memory.model_config(str(model_dir))
    model_memory = memory.ModelMemory.from_config(config)
    free_before_load = torch.cuda.mem_get_info()[0] if gpu else None
    work = Path("/tmp/bench-ours")
    datasets: dict[str, Any] = {}

    def prepared(name: str) -> Any:
        if name not in datasets:
            spec = job(
                model_dir,
                data_dir / f"{name}.jsonl",
                rows=2,
                accumulation=4,
                split="auto",
                steps=1,
                ckpt="auto",
            )
            datasets[name] = preflight.check(spec, work / name).data.dataset
        return datasets[name]

    records = Records()
    logging.getLogger().addHandler(records)
    first = configs[0].split(":")
    load_spec = job(
        model_dir, data_dir / f"{first[0]}.jsonl", rows=2, accumulation=4, split="auto", steps=1, ckpt="auto"
    )
    model, tokenizer = engines.load(load_spec, device, str(model_dir))
    print(f"loaded in {time.monotonic() - START:.1f}s", flush=True)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plans: dict[str, Any] = {"auto": cuda.activation_plan(load_spec, model, config) if gpu else None}

    from finetune_trainer.train import train

    results = []
    for index, text in enumerate(configs):
        parts = text.split(":")
        data, batch, split, steps = parts[:4]
        ckpt = parts[4] if len(parts) > 4 else "auto"
        profile = steps.endswith("p")
        steps_n = int(steps.removesuffix("p"))
        rows, accumulation = (int(x) for x in batch.split("x"))
        total = steps_n + (common.PROFILED_STEPS if profile else 0)
        spec = job(
            model_dir,
            data_dir / f"{data}.jsonl",
            rows=rows,
            accumulation=accumulation,
            split=split,
            steps=total,
            ckpt=ckpt,
        )
        dataset = prepared(data)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        plan = batching.plan(spec, lengths, device=device, memory=model_memory, free_bytes=free_before_load)
        # `auto`: the activation plan decides per micro-batch; `unsloth`: every layer stays
        # checkpointed, as loading armed them (train() re-arms them all at its start).
        activation = plans["auto"] if ckpt == "auto" else None
        if ckpt not in ("auto", "unsloth"):
            raise SystemExit(f"{text}: this driver loads once, so only auto and unsloth checkpointing")
        if activation is not None:
            activation.kept, activation.kept_range = None, None
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        records.lines.clear()
        restore = (
            profile_steps(steps_n, profile_dir / f"profile-ours-{data}-{batch}-{split}.txt")
            if profile
            else None
        )
        micro_tokens: list[int] = []

        def before(tokens: int, activation: Any = activation, micro_tokens: list[int] = micro_tokens) -> None:
            micro_tokens.append(tokens)
            if activation is not None:
                activation(tokens)

        started = time.monotonic()
        train(
            spec,
            model,
            tokenizer,
            dataset,
            plan=plan,
            device=device,
            output_dir=work / f"run-{index}",
            uploader=NoUploads(),
            stop=StopRequest(),
            progress=ProgressState(),
            metrics=Metrics(),
            json_lines=True,
            resume_dir=None,
            before_micro_batch=before,
        )
        if restore is not None:
            restore()
        lines = records.lines[:steps_n]
        times = [x["t"] for x in lines]
        totals = [0] + [x["tokens"] for x in lines]
        step_tokens = [b - a for a, b in itertools.pairwise(totals)]
        tps, per_step, seconds = common.steady_state(times, step_tokens)
        kept = activation.kept_range if activation is not None else (0, 0)
        biggest = max(micro_tokens) if micro_tokens else 0
        result = common.Result(
            engine="ours",
            shape=shape["shape"],
            data=data,
            batch=plan.batch_size,
            accumulation=plan.gradient_accumulation_steps,
            attention="varlen",
            steps=steps_n,
            tokens_per_second=round(tps, 1),
            mfu_pct=common.mfu_pct(shape["params"], tps),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else 0.0,
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
            tokens_per_step=round(per_step),
            seconds_per_step=round(seconds, 3),
            losses=[round(float(x["loss"]), 5) for x in lines],
            note=f"spec {batch} microBatches {split} gradientCheckpointing {ckpt}; {plan.reason}",
        )
        extra = {
            "spec_batch": batch,
            "micro_batches": split,
            "gradient_checkpointing": ckpt,
            "layers_kept": list(kept or (0, 0)),
            "largest_micro_batch_tokens": biggest,
            "predicted_peak_gib": round(model_memory.peak(biggest, (kept or (0, 0))[1]) / 2**30, 2),
            "run_seconds": round(time.monotonic() - started, 1),
        }
        row = {**result.as_dict(), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)
    existing = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(existing + results, indent=1))


if __name__ == "__main__":
    main()
