"""Preflight: tokenizer + data + template, checked before any GPU time is spent.

`python -m finetune_trainer preflight job.yaml` prints the figures; `run` performs the same checks
first and exits with EXIT_CONFIG_ERROR, naming the field, when the data does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer import data, engines, templates
from finetune_trainer.spec import TrainingSpec

EXAMPLE_CHARS = 2000


@dataclass(frozen=True)
class Preflight:
    model_source: str
    tokenizer: Any
    data: data.PreparedData


def check(spec: TrainingSpec, workdir: Path, tokenizer_only: bool = False) -> Preflight:
    """Load the data and the tokenizer, render and tokenize; ConfigError on anything that cannot
    train. The template's columns are checked before the tokenizer is loaded, so the commonest
    mistake is reported in seconds."""
    rows = data.load_rows(spec.data, spec.storage, workdir)
    templates.check_columns(spec.template, rows.column_names)
    source = engines.resolve_model_source(spec.model, spec.storage, workdir, tokenizer_only=tokenizer_only)
    tokenizer = engines.load_tokenizer(spec, source)
    prepared = data.prepare(
        rows, spec.template, tokenizer=tokenizer, max_seq_length=spec.model.max_seq_length
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
