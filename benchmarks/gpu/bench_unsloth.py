"""(b) Bare Unsloth: FastLanguageModel 4-bit + get_peft_model + TRL's SFTTrainer, the trainer's knobs.

One process loads the model once and trains several configurations one after another, each from the
same initial LoRA weights and data order, so plain and varlen attention are compared side by side on
identical batches (their per-step losses are the loss-match check). Only the first configuration's
time to first step includes loading; peak memory is reset between configurations.

    python bench_unsloth.py MODEL_DIR DATA_DIR OUT.json medical:2x4:plain:12 alpaca:auto:varlen:10 ...

A configuration is data:BATCH:attention:steps; BATCH is RxA (rows x accumulation);
attention is `plain` (Unsloth as installed) or `varlen` (engines/cuda_attention.py on); steps with a
`p` suffix (`8p`) run two more steps under torch.profiler (not in the figures) and write its table
to $BENCH_PROFILE_DIR.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

START = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer-image"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def micro_batch(spec: str) -> tuple[int, int]:
    rows, accumulation = spec.split("x")
    return int(rows), int(accumulation)


def main() -> None:
    model_dir, data_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    configs = sys.argv[4:]
    profile_dir = Path(os.environ.get("BENCH_PROFILE_DIR", "/tmp"))
    from unsloth import FastLanguageModel  # noqa: I001  (Unsloth first: it patches TRL)
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from finetune_trainer.engines import cuda_attention

    shape_info = json.loads((model_dir / "bench-params.json").read_text())
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=2048, load_in_4bit=True, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        max_seq_length=2048,
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    datasets: dict[str, Any] = {}

    def dataset(name: str) -> Any:
        if name not in datasets:
            texts = [t + tokenizer.eos_token for t in common.load_rows(data_dir / f"{name}.jsonl")]
            ids = tokenizer(texts)["input_ids"]
            datasets[name] = Dataset.from_dict(
                {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
            )
        return datasets[name]

    results: list[common.Result] = []
    for index, spec in enumerate(configs):
        data, batch_spec, attention, steps = spec.split(":")
        profile = steps.endswith("p")
        steps = steps.removesuffix("p")
        rows, accumulation = micro_batch(batch_spec)
        note = cuda_attention.enable_varlen_attention() if attention == "varlen" else ""
        if attention != "varlen":
            cuda_attention.disable_varlen_attention()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        recorder = common.Recorder(
            int(steps) if profile else None, profile_dir / f"profile-{data}-{attention}.txt"
        )
        args = SFTConfig(
            output_dir=f"/tmp/bench-unsloth-{index}",
            per_device_train_batch_size=rows,
            gradient_accumulation_steps=accumulation,
            warmup_steps=5,
            max_steps=int(steps) + (common.PROFILED_STEPS if profile else 0),
            learning_rate=2e-4,
            optim="adamw_8bit",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            data_seed=3407,
            logging_steps=1,
            bf16=True,
            max_length=2048,
            packing=False,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = common.metered(SFTTrainer, recorder)(
            model=model,
            args=args,
            train_dataset=dataset(data),
            processing_class=tokenizer,
            callbacks=[common.callback(recorder)],
        )
        trainer.train()
        measured = int(steps)  # profiled steps come after the measured ones and are left out
        tps, per_step, seconds = common.steady_state(
            recorder.step_times[:measured], recorder.step_tokens[:measured]
        )
        result = common.Result(
            engine="unsloth",
            shape=shape_info["shape"],
            data=data,
            batch=rows,
            accumulation=accumulation,
            attention=attention,
            steps=int(steps),
            tokens_per_second=round(tps, 1),
            mfu_pct=common.mfu_pct(shape_info["params"], tps),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            tokens_per_step=round(per_step),
            seconds_per_step=round(seconds, 3),
            time_to_first_step_s=round(recorder.step_times[0] - START, 1) if index == 0 else None,
            losses=recorder.losses[:measured],
            note=note,
        )
        results.append(result)
        print(json.dumps(result.as_dict()), flush=True)
        del trainer
    common.append_results(out, results)


if __name__ == "__main__":
    main()
