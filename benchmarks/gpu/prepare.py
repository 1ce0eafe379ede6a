"""Random-initialised models of real shapes and rows of real lengths, made on the GPU machine.

The machine has no network, so nothing comes from the hub. Speed and memory do not depend on
weight values, so random weights give honest figures. The tokenizer is a word-level one whose
vocabulary is `w0 w1 ...`: a row of n words is exactly n tokens, which lets the data files be
ordinary text that the trainer renders and tokenizes itself, with token lengths drawn from the
seed workloads' distributions.

    python prepare.py model llama-8b /tmp/models/llama-8b
    python prepare.py data medical /tmp/data/medical.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

ROPE_LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B config.json
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_scaling={**ROPE_LLAMA3, "factor": 8.0, "original_max_position_embeddings": 8192},
    ),
    # meta-llama/Llama-3.2-3B config.json
    "llama-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_scaling={**ROPE_LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192},
    ),
    # A CPU-sized model for checking the harness itself (bench_trainer.py with BENCH_DEVICE=cpu).
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
VOCAB = 128256
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

DISTRIBUTIONS = {"medical": (700, 0.35), "alpaca": (140, 0.6)}
"""name -> (median tokens, lognormal sigma), from the seed workloads (issue 11)."""
MAX_TOKENS = 2048
MIN_TOKENS = 16
ROWS = 6000


def row_lengths(name: str, rows: int = ROWS, seed: int = 7) -> list[int]:
    """Token lengths (BOS and EOS included): median x lognormal(0, sigma), capped at 2048."""
    median, sigma = DISTRIBUTIONS[name]
    rng = random.Random(seed)
    return [
        max(MIN_TOKENS, min(MAX_TOKENS, round(rng.lognormvariate(0, sigma) * median))) for _ in range(rows)
    ]


def write_data(name: str, path: Path) -> None:
    """JSON lines with a `text` column; BOS and EOS are added by the tokenizer and the template."""
    rng = random.Random(11)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n in row_lengths(name):
            words = " ".join(f"w{rng.randrange(VOCAB - len(SPECIALS))}" for _ in range(n - 2))
            f.write(json.dumps({"text": words}) + "\n")


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i + len(SPECIALS) for i in range(VOCAB - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=131072,
    )
    fast.save_pretrained(folder)


def create_model(shape: str) -> Any:
    """A random-initialised LlamaForCausalLM of `shape` in bf16, made on the GPU when there is one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="bfloat16",
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def write_model(shape: str, folder: Path) -> None:
    started = time.monotonic()
    model = create_model(shape)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    write_tokenizer(folder)
    (folder / "bench-params.json").write_text(json.dumps({"shape": shape, "params": params}))
    print(f"{shape}: {params / 1e9:.3f}B params written to {folder} in {time.monotonic() - started:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "data"])
    p.add_argument("name")
    p.add_argument("dest", type=Path)
    a = p.parse_args()
    if a.what == "model":
        write_model(a.name, a.dest)
    else:
        write_data(a.name, a.dest)


if __name__ == "__main__":
    main()
