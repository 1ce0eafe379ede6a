"""(b') The tutorial's own code path, as a user of bare Unsloth runs it: the baseline of time to model.

    python bench_tutorial.py MODEL_DIR DATA_DIR OUT.json [--alpaca-steps 10]

From process start: FastLanguageModel 4-bit + get_peft_model (r16 on all projections, offloaded
checkpointing), TRL's SFTTrainer with the seeds' config (batch 2 x accumulation 4, 60 steps,
adamw_8bit, lr 2e-4, 5 warm-up steps) on the 500 medical rows, then the tutorial's export:
`save_pretrained_merged(..., "merged_16bit")` and llama.cpp's `convert_hf_to_gguf.py --outtype q8_0`
on the merged folder (what `save_pretrained_gguf(..., "q8_0")` runs once it has built llama.cpp,
which needs the network this machine lacks), the GGUF copied into a local store folder. The time to
the GGUF in the store is `time_to_model_unsloth_s`; the steady-state steps give
`seed_config_tok_s_medical`. Then the same process trains the alpaca rows at 2 x 4 for
`--alpaca-steps` steps (`seed_config_tok_s_alpaca`).
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "trainer-image"), str(HERE)]

import common  # noqa: E402


def sft_args(output_dir: str, steps: int) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=steps,
        learning_rate=2e-4,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        logging_steps=1,
        bf16=True,
        max_length=2048,
        dataset_text_field="text",
        packing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-tutorial"))
    p.add_argument("--alpaca-steps", type=int, default=10)
    a = p.parse_args()

    from unsloth import FastLanguageModel  # noqa: I001  (Unsloth first: it patches TRL)
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from finetune_trainer.gguf import convert_command, converter_env, llama_cpp_dir

    shape = json.loads((a.model / "bench-params.json").read_text())
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(a.model), max_seq_length=2048, load_in_4bit=True, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        max_seq_length=2048,
    )
    eos = tokenizer.eos_token

    def rows(name: str, n: int | None = None) -> Any:
        texts = common.load_rows(a.data / f"{name}.jsonl")[:n]
        return Dataset.from_dict({"text": [t + eos for t in texts]})

    results = []
    existing = json.loads(a.out.read_text()) if a.out.is_file() else []

    def save(finished: list[dict[str, Any]]) -> None:
        a.out.write_text(json.dumps(existing + finished, indent=1))

    def row_of(name: str, steps: int, recorder: Any, figures: dict[str, Any]) -> dict[str, Any]:
        tps, per_step, seconds = common.steady_state(recorder.step_times, recorder.step_tokens)
        result = common.Result(
            engine="unsloth-tutorial",
            shape=shape["shape"],
            data=name,
            batch=2,
            accumulation=4,
            attention="plain",
            steps=steps,
            tokens_per_second=round(tps, 1),
            mfu_pct=common.mfu_pct(shape["params"], tps),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            tokens_per_step=round(per_step),
            seconds_per_step=round(seconds, 3),
            time_to_first_step_s=figures.get("time_to_first_step_s"),
            losses=recorder.losses,
            note="bare Unsloth, the tutorial's code path" + (" with its export" if figures else ""),
        )
        return {**result.as_dict(), **figures}

    for name, steps, export in (("medical", 60, True), ("alpaca", a.alpaca_steps, False)):
        recorder = common.Recorder()
        trainer = common.metered(SFTTrainer, recorder)(
            model=model,
            args=sft_args(str(a.work / f"train-{name}"), steps),
            train_dataset=rows(name, 500 if name == "medical" else None),
            processing_class=tokenizer,
            callbacks=[common.callback(recorder)],
        )
        trainer.train()
        figures: dict[str, Any] = {}
        if export:
            # The training figures are kept before the export starts: a call cut short during the
            # export still returns them, and the lower bound of the time to model.
            lower_bound = round(time.monotonic() - START, 1)
            first = {"time_to_first_step_s": round(recorder.step_times[0] - START, 1)}
            started = {**row_of(name, steps, recorder, first), "time_to_model_lower_bound_s": lower_bound}
            save([*results, started])
            trained = time.monotonic()
            merged = a.work / "merged"
            shutil.rmtree(merged, ignore_errors=True)
            model.save_pretrained_merged(str(merged), tokenizer, save_method="merged_16bit")
            merged_at = time.monotonic()
            llama = llama_cpp_dir()
            built = a.work / "model-q8_0.gguf"
            subprocess.run(
                convert_command(llama, merged, built, "q8_0"),
                env=converter_env(llama, dict(os.environ)),
                check=True,
                capture_output=True,
            )
            converted = time.monotonic()
            store = a.work / "store"
            store.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, store / built.name)
            done = time.monotonic()
            figures = {
                "time_to_first_step_s": round(recorder.step_times[0] - START, 1),
                "train_s": round(trained - START, 1),
                "merge_s": round(merged_at - trained, 1),
                "convert_q8_0_s": round(converted - merged_at, 1),
                "store_s": round(done - converted, 1),
                "export_s": round(done - trained, 1),
                "time_to_model_s": round(done - START, 1),
                "gguf_bytes": built.stat().st_size,
            }
            # 16 GB merged folder and two 8.5 GB GGUFs: the machine's disk is 64 GB
            shutil.rmtree(merged, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
            built.unlink()
        row = row_of(name, steps, recorder, figures)
        results.append(row)
        print(json.dumps(row), flush=True)
        save(results)
        del trainer


if __name__ == "__main__":
    main()
