"""Preflight: tokenizer + data + template, checked before any GPU time is spent.

`python -m finetune_trainer preflight job.yaml` prints the figures; `run` performs the same checks
first and exits with EXIT_CONFIG_ERROR, naming the field, when the data does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import data, engines
from finetune_trainer.spec import TrainingSpec

EXAMPLE_CHARS = 2000


@dataclass(frozen=True)
class Preflight:
    model_source: str
    tokenizer: Any
    data: data.PreparedData


def check(spec: TrainingSpec, workdir: Path, tokenizer_only: bool = False) -> Preflight:
    """Load the tokenizer and the data, render and tokenize; ConfigError on anything that cannot train."""
    source = engines.resolve_model_source(spec.model, spec.storage, workdir, tokenizer_only=tokenizer_only)
    tokenizer = engines.load_tokenizer(spec, source)
    prepared = data.prepare(
        spec.data,
        spec.template,
        storage=spec.storage,
        tokenizer=tokenizer,
        max_seq_length=spec.model.max_seq_length,
        workdir=workdir,
    )
    return Preflight(source, tokenizer, prepared)


def report(stats: data.DataStats) -> str:
    """The human-readable preflight report."""
    example = stats.example
    if len(example) > EXAMPLE_CHARS:
        example = example[:EXAMPLE_CHARS] + f"\n... ({len(stats.example) - EXAMPLE_CHARS} more characters)"
    return "\n".join(
        [
            f"rows:            {stats.rows}",
            f"tokens per row:  p50 {stats.p50}, p95 {stats.p95}, max {stats.max}",
            f"truncated:       {stats.truncated} rows ({stats.truncated_share:.1%}) longer than "
            f"maxSeqLength {stats.max_seq_length}",
            "first row, rendered:",
            "-" * 72,
            example,
            "-" * 72,
        ]
    )
