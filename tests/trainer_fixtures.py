"""A tiny Llama, a SentencePiece tokenizer and small data sets, built in a temporary folder.

Plain functions (usable from any test or script) plus pytest fixtures, registered for every test
by tests/conftest.py. Nothing comes from a model hub: the tokenizer is trained on generated text
and the model has random weights, which is all checkpoint, resume and export tests need. The
tokenizer is SentencePiece-based with `tokenizer.model` next to the weights, the form llama.cpp's
converter accepts; hidden size 256 keeps k-quants (rows of 256) possible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "hi", "jo", "be", "zu", "wa"]
TOPICS = ["fever", "cough", "rash", "pain", "sleep", "diet", "heart", "lung", "bone", "skin"]


def words(rng: random.Random, n: int) -> str:
    """n pseudo-words of 1-3 syllables, with a topic word now and then (gives the model structure)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(rng.choice(TOPICS))
        else:
            out.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
    return " ".join(out)


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Generated text for training the tokenizer, including the templates' fixed words."""
    rng = random.Random(seed)
    fixed = [
        "Below is an instruction that describes a task, paired with an input that provides further context.",
        "Write a response that appropriately completes the request. Before answering, think carefully.",
        "### Instruction: ### Input: ### Response: ### Question: <think> </think>",
    ]
    return fixed * 50 + [words(rng, rng.randint(5, 25)) for _ in range(lines)]


def build_tokenizer(
    dest: Path,
    vocab_size: int = 512,
    seed: int = 0,
    extra_text: Iterable[str] = (),
    text: Iterable[str] | None = None,
) -> Path:
    """Train a SentencePiece BPE tokenizer (byte fallback) on generated text and save it in `dest`
    twice: as `tokenizer.model` (what llama.cpp's converter reads) and as the same vocabulary in a
    transformers LlamaTokenizer (built from the pieces: transformers' own conversion needs
    protobuf). `extra_text` lines join the generated corpus (the demo adds its data set); `text`
    replaces it (the export test wants a vocabulary of its own few sentences only)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(text) if text is not None else [*corpus(seed=seed), *extra_text]),
        model_prefix=str(dest / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (dest / "sp.model").replace(dest / "tokenizer.model")
    (dest / "sp.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece in sorted(vocab, key=vocab.__getitem__):  # a merge's rank is its result's id
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        pairs = sorted((vocab[a], vocab[b], a, b) for a, b in splits if a in vocab and b in vocab)
        merges += [(a, b) for _, _, a, b in pairs]
    LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=False).save_pretrained(dest)
    return dest


def build_tiny_model(
    dest: Path, hidden: int = 256, layers: int = 2, seed: int = 0, extra_text: Iterable[str] = ()
) -> Path:
    """A random-weight Llama (hidden 256, 2 layers) plus its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tokenizer(dest, seed=seed, extra_text=extra_text)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def demo_text(jsonl: Path, repeat: int = 20) -> list[str]:
    """Every string value of a JSONL data set, repeated so the tokenizer learns its words."""
    lines = []
    for line in jsonl.read_text().splitlines():
        lines.extend(str(v) for v in json.loads(line).values() if v)
    return lines * repeat


def alpaca_rows(n: int, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "instruction": f"Tell me about {rng.choice(TOPICS)}. " + words(rng, rng.randint(3, 10)),
            "input": words(rng, rng.randint(0, 6)),
            "output": words(rng, rng.randint(5, 40)),
        }
        for _ in range(n)
    ]


def r1_rows(n: int, seed: int = 2) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "Question": words(rng, rng.randint(4, 12)) + "?",
            "Complex_CoT": words(rng, rng.randint(10, 40)),
            "Response": words(rng, rng.randint(3, 15)),
        }
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def job_manifest(
    model_path: Path,
    data_path: Path,
    storage_uri: str | None = None,
    endpoint: str | None = None,
    name: str = "tiny",
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A FineTuneJob for the tiny model on the CPU; `sections` override whole spec sections.

    Truncation is allowed (maxTruncatedFraction 1): the runs that test checkpoints, resume and
    step splits cut their rows at 64 tokens to keep CPU steps short. tests/integration/
    test_data_errors.py tests the threshold."""
    spec: dict[str, Any] = {
        "model": {"path": str(model_path), "maxSeqLength": 128},
        "data": {"path": str(data_path), "maxTruncatedFraction": 1},
        "template": {"type": "alpaca"},
        "lora": {"r": 8, "alpha": 16},
        "training": {
            "batchSize": 2,
            "gradientAccumulationSteps": 2,
            "maxSteps": 12,
            "warmupSteps": 2,
            "learningRate": 1e-3,
            "optimizer": "adamw_torch",
        },
        "checkpoint": {"everySteps": 100, "everyMinutes": 600, "keepLast": 2, "gracePeriodSeconds": 60},
        "export": {"gguf": []},
        "resources": {"gpus": 0},
    }
    if storage_uri:
        spec["storage"] = {"uri": storage_uri, **({"endpoint": endpoint} if endpoint else {})}
    spec.update(sections)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def write_job(path: Path, manifest: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + SentencePiece tokenizer (built once per test session)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def alpaca_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 Alpaca rows (instruction / input / output)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", alpaca_rows(64))


@pytest.fixture(scope="session")
def r1_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 R1-style rows (Question / Complex_CoT / Response)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "r1.jsonl", r1_rows(32))
