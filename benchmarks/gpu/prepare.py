"""Random-initialised models of real shapes and rows of real lengths, made on the GPU machine.

The machine has no network, so nothing comes from the hub. Speed and memory do not depend on
weight values, so random weights give honest figures. The tokenizer is the tests' SentencePiece one
(tests/trainer_fixtures.build_tokenizer: 512 pieces, `tokenizer.model` beside the weights, the form
llama.cpp's converter reads, so the trainer's export runs on these models too); the model keeps the
real vocabulary size (128,256 rows of embeddings and output head), which is what costs. Data rows
are words of one piece each, so a row of n - 2 words is exactly n tokens with BOS and EOS, with
lengths that follow the seed workloads' distributions.

    python prepare.py model llama-8b /tmp/models/llama-8b
    python prepare.py data medical /tmp/data/medical.jsonl /tmp/models/llama-8b
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

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
    # A CPU-sized model for checking the harnesses themselves (BENCH_DEVICE=cpu).
    "tiny": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
VOCAB = 128256

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


def one_piece_words(tokenizer: Any) -> list[str]:
    """Words the tokenizer encodes as exactly one token (pieces that start a word)."""
    words = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        word = piece.removeprefix("\u2581")
        if piece.startswith("\u2581") and word.isalpha():
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                words.append(word)
    return words


def write_data(name: str, path: Path, model_dir: Path) -> None:
    """JSON lines with a `text` column of n - 2 one-piece words: BOS and EOS make n tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocabulary = one_piece_words(tokenizer)
    rng = random.Random(11)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, n in enumerate(row_lengths(name)):
            text = " ".join(rng.choice(vocabulary) for _ in range(n - 2))
            if i < 50:  # the premise of every figure: n - 1 tokens with BOS, n with the EOS
                assert len(tokenizer(text)["input_ids"]) == n - 1, (n, text[:80])
            f.write(json.dumps({"text": text}) + "\n")


def write_tokenizer(folder: Path) -> None:
    from trainer_fixtures import build_tokenizer

    build_tokenizer(folder, vocab_size=512)


def create_model(shape: str) -> Any:
    """A random-initialised LlamaForCausalLM of `shape` in bf16, made on the GPU when there is one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{"vocab_size": VOCAB, **SHAPES[shape]},
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
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
    p.add_argument("model", type=Path, nargs="?", help="for data: the model whose tokenizer counts")
    a = p.parse_args()
    if a.what == "model":
        write_model(a.name, a.dest)
    else:
        write_data(a.name, a.dest, a.model)


if __name__ == "__main__":
    main()
