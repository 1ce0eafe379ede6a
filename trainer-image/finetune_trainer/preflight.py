"""Preflight: tokenizer + data + template, checked before any GPU time is spent.

`python -m finetune_trainer preflight job.yaml` prints the figures; `run` performs the same checks
first and exits with EXIT_CONFIG_ERROR, naming the field, when the data does not fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finetune_trainer import data, engines, templates, validation
from finetune_trainer.spec import TrainingSpec

log = logging.getLogger(__name__)

EXAMPLE_CHARS = 2000


@dataclass(frozen=True)
class Preflight:
    model_source: str
    tokenizer: Any
    data: data.PreparedData
    """The training rows (without the held-out ones)."""
    validation: data.PreparedData | None = None
    """The validation rows evaluated (at most maxRows), when spec.data.validation is set."""
    validation_stats: validation.ValidationStats | None = None


def check(spec: TrainingSpec, workdir: Path, tokenizer_only: bool = False) -> Preflight:
    """Load the data and the tokenizer, render and tokenize; ConfigError on anything that cannot
    train. The template's columns are checked before the tokenizer is loaded, so the commonest
    mistake is reported in seconds."""
    rows = data.load_rows(spec.data, spec.storage, workdir)
    templates.check_columns(spec.template, rows.column_names)
    rows, skipped = data.complete_rows(
        rows,
        spec.template,
        spec.data.incomplete_rows,
        data.source_field(spec.data),
        data.source_label(spec.data),
    )
    if skipped:
        log.warning(
            "%d rows with a missing or null cell left out (spec.data.incompleteRows: skip)",
            skipped,
            extra={"fields": {"event": "incomplete-rows", "skipped": skipped}},
        )
    held = validation.split(spec, rows, workdir)
    source = engines.resolve_model_source(spec.model, spec.storage, workdir, tokenizer_only=tokenizer_only)
    tokenizer = engines.load_tokenizer(spec, source)
    engines.check_target_modules(spec, source)
    prepared = data.prepare(
        held.train if held else rows,
        spec.template,
        tokenizer=tokenizer,
        max_seq_length=spec.model.max_seq_length,
    )
    prepared = replace(prepared, stats=replace(prepared.stats, incomplete_skipped=skipped))
    warning = data.truncation_verdict(prepared.stats, spec.data.max_truncated_fraction)
    if warning:
        log.warning(
            "%s; spec.data.maxTruncatedFraction allows %g%%",
            warning,
            spec.data.max_truncated_fraction * 100,
            extra={
                "fields": {"event": "truncation", "truncatedShare": round(prepared.stats.truncated_share, 4)}
            },
        )
    if held is None:
        return Preflight(source, tokenizer, prepared)
    evaluated, stats = validation.prepare(spec, held, prepared, tokenizer)
    return Preflight(source, tokenizer, prepared, evaluated, stats)


def report(stats: data.DataStats, validation_stats: validation.ValidationStats | None = None) -> str:
    """The human-readable preflight report."""
    example = stats.example
    if len(example) > EXAMPLE_CHARS:
        example = example[:EXAMPLE_CHARS] + f"\n... ({len(stats.example) - EXAMPLE_CHARS} more characters)"
    lines = [
        f"rows:            {stats.rows}",
        f"tokens per row:  p50 {stats.p50}, p95 {stats.p95}, max {stats.max}",
        f"truncated:       {stats.truncated} rows ({stats.truncated_share:.1%}) longer than "
        f"maxSeqLength {stats.max_seq_length}",
    ]
    if stats.incomplete_skipped:
        lines.append(f"left out:        {stats.incomplete_skipped} rows with a missing or null cell")
    if validation_stats is not None:
        v, t = validation_stats, validation_stats.tokens
        lines += [
            f"validation:      {v.source}: {v.available} rows, {t.rows} evaluated",
            f"  tokens per row p50 {t.p50}, p95 {t.p95}, max {t.max}; {t.truncated} rows truncated; "
            f"{v.overlap} rows equal a training row",
        ]
    return "\n".join([*lines, "first row, rendered:", "-" * 72, example, "-" * 72])
