"""(c) transformers + PEFT + bitsandbytes NF4 with SDPA attention: the stack without Unsloth.

The usual QLoRA recipe: NF4 with double quantization and bf16 compute, `prepare_model_for_kbit_training`,
non-reentrant gradient checkpointing, LoRA r16 on all seven projections, TRL's SFTTrainer padding each
micro-batch to its longest row (tokens/s counts the attention mask, not the padding).

    python bench_hf.py MODEL_DIR DATA_DIR OUT.json medical:2x4:12 [alpaca:2x4:12 ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

START = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    model_dir, data_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    shape_info = json.loads((model_dir / "bench-params.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": 0},
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    results: list[common.Result] = []
    for index, spec in enumerate(sys.argv[4:]):
        data, batch, steps = spec.split(":")
        rows, accumulation = (int(x) for x in batch.split("x"))
        texts = [t + tokenizer.eos_token for t in common.load_rows(data_dir / f"{data}.jsonl")]
        ids = tokenizer(texts)["input_ids"]
        dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        recorder = common.Recorder()
        args = SFTConfig(
            output_dir=f"/tmp/bench-hf-{index}",
            per_device_train_batch_size=rows,
            gradient_accumulation_steps=accumulation,
            warmup_steps=5,
            max_steps=int(steps),
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
            padding_free=False,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = common.metered(SFTTrainer, recorder)(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[common.callback(recorder)],
        )
        trainer.train()
        tps, per_step, seconds = common.steady_state(recorder.step_times, recorder.step_tokens)
        result = common.Result(
            engine="hf",
            shape=shape_info["shape"],
            data=data,
            batch=rows,
            accumulation=accumulation,
            attention="sdpa",
            steps=int(steps),
            tokens_per_second=round(tps, 1),
            mfu_pct=common.mfu_pct(shape_info["params"], tps),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            tokens_per_step=round(per_step),
            seconds_per_step=round(seconds, 3),
            time_to_first_step_s=round(recorder.step_times[0] - START, 1) if index == 0 else None,
            losses=recorder.losses,
        )
        results.append(result)
        print(json.dumps(result.as_dict()), flush=True)
    common.append_results(out, results)


if __name__ == "__main__":
    main()
