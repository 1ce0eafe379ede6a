"""The export of an 8B-shape model on the GPU machine, stage by stage: merge into the 16-bit base,
f16 GGUF, quantizations, each GGUF loaded and run in llama.cpp (docs/export.md, "Figures").

    python bench_export.py ROOT OUT.json [--store DIR] [--work DIR] [--shape llama-8b] [--quant q8_0 ...]

Builds once under ROOT (kept while the machine is warm): a random-initialised base of the shape
(vocabulary 128,256, as the real model) with a small SentencePiece tokenizer (the converter pads the
GGUF vocabulary to the model's; the word-level tokenizer of prepare.py has no GGUF form), and a LoRA
adapter of the spec's defaults (r16 on all seven projections) with random B matrices, so the
merge changes every targeted weight. Then `finetune_trainer.export.run_export` on the CUDA engine
into a local store under ROOT, exactly as the trainer calls it. The export resumes (export/state.json
in the store), so a second call finishes what a call cut by its time limit left.

Random weights give near-tied greedy logits, so `verifyTokens` is 0 here and the same number of
tokens (16) is generated per prompt instead: the check's cost is paid, its verdict is not asked for.
The greedy match itself is tested on a trained tiny model (tests/integration/test_export.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), *(str(HERE.parents[1] / d) for d in ("trainer-image", "tests"))]

from prepare import SHAPES, create_model  # noqa: E402

PROMPTS = ["Explain what a checkpoint is.", "Name three colours."]


def build_base(shape: str, dest: Path) -> int:
    """prepare.py's random-initialised model of `shape`, with a SentencePiece tokenizer (its bos 1
    and eos 2 are the model's); its parameter count."""
    from trainer_fixtures import build_tokenizer

    if (dest / "bench-params.json").is_file():
        return json.loads((dest / "bench-params.json").read_text())["params"]
    shutil.rmtree(dest, ignore_errors=True)
    build_tokenizer(dest, vocab_size=512)
    model = create_model(shape)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest)
    (dest / "bench-params.json").write_text(json.dumps({"shape": shape, "params": params}))
    return params


def build_adapter(base: Path, dest: Path) -> None:
    """A LoRA adapter of the spec's defaults (r, alpha, target modules), B drawn at random (PEFT
    starts it at zero)."""
    import torch
    from finetune_trainer.spec import LoraSpec
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (dest / "adapter_config.json").is_file():
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    lora = LoraSpec()
    model = get_peft_model(
        model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules))
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    model.save_pretrained(dest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="models, adapter, store and work folders")
    p.add_argument("out", type=Path, help="JSON figures")
    p.add_argument("--store", type=Path, help="the local store (default ROOT/store-SHAPE)")
    p.add_argument("--work", type=Path, help="the export's work folder (default ROOT/work-SHAPE)")
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--quant", nargs="+", default=["q8_0"], help="GGUF types (default: the spec's q8_0)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from finetune_trainer.export import run_export
    from finetune_trainer.spec import TrainingSpec
    from finetune_trainer.storage import LocalStore

    engine = "cuda" if torch.cuda.is_available() else "cpu"
    timings: dict[str, float] = {}
    started = time.monotonic()
    base, adapter = a.root / f"base-{a.shape}", a.root / f"adapter-{a.shape}"
    params = build_base(a.shape, base)
    timings["build_base_s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    build_adapter(base, adapter)
    timings["build_adapter_s"] = round(time.monotonic() - started, 1)
    if engine == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    spec = TrainingSpec.model_validate(
        {
            "model": {"path": str(base)},
            "data": {"path": "/unused.jsonl"},
            "export": {"gguf": a.quant, "verifyTokens": 0},
            "samples": {"prompts": PROMPTS, "maxNewTokens": 16},
        }
    )
    store_dir = a.store or a.root / f"store-{a.shape}"
    store = LocalStore(store_dir)
    # `timeout` ends a run cut short with SIGTERM: the figures of the stages done so far still count.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    finished = False
    try:
        run_export(spec, base, adapter, store, a.work or a.root / f"work-{a.shape}", engine)
        finished = True
    finally:
        figures = {
            "shape": a.shape,
            "params": params,
            "engine": engine,
            "cpu_threads": os.cpu_count(),
            "quantizations": a.quant,
            "finished": finished,
            **timings,
            "export_s_this_run": round(time.monotonic() - started, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if engine == "cuda" else None,
            "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            **stage_figures(store_dir),
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(figures, indent=1) + "\n")
        print(json.dumps({k: v for k, v in figures.items() if k != "answers"}, indent=1))


def stage_figures(store_dir: Path) -> dict[str, Any]:
    """Seconds and artifact sizes of every finished stage, from the export's own state.json."""
    state_file = store_dir / "export" / "state.json"
    stages = json.loads(state_file.read_text())["stages"] if state_file.is_file() else {}
    seconds = {name: round(s.get("seconds", 0.0), 1) for name, s in stages.items()}
    return {
        "stage_s": seconds,
        "stage_s_total": round(sum(seconds.values()), 1),
        "artifact_bytes": {x["name"]: x["sizeBytes"] for s in stages.values() for x in s["artifacts"]},
        "answers": {name: s["answers"] for name, s in stages.items() if "answers" in s},
    }


if __name__ == "__main__":
    main()
