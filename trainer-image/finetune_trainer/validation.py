"""Validation rows: a held-out share of the training rows, or a source of their own, capped.

The decisions are pure (`holdout_split`, `evaluated_indices`); loading reuses data.py. Held-out rows
are picked by a seeded permutation of the row indices and removed from the training rows, so the
two sets never overlap. The rows evaluated under `maxRows` are a seeded sample, the same at every
evaluation and on every pod of the job: a resumed pod evaluates exactly the rows its predecessor
did, so eval losses before and after a preemption compare.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer import data, templates
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import DataSource, TrainingSpec, ValidationSource

if TYPE_CHECKING:
    import datasets


def holdout_split(rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), each ascending: floor(rows x fraction) rows held out,
    chosen by a permutation seeded with `seed`."""
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    held = sorted(order[: math.floor(rows * fraction)])
    chosen = set(held)
    return [i for i in range(rows) if i not in chosen], held


def evaluated_indices(rows: int, max_rows: int, seed: int) -> list[int]:
    """The rows evaluated: all of them up to `max_rows`, else a seeded sample of `max_rows`
    (ascending, so the data's own order is kept)."""
    if rows <= max_rows:
        return list(range(rows))
    return sorted(random.Random(seed).sample(range(rows), max_rows))


def overlap(train_ids: list[list[int]], validation_ids: list[list[int]]) -> int:
    """Validation rows whose tokens equal a training row's (a source of its own that repeats
    training rows measures memorisation, not generalisation)."""
    seen = {tuple(ids) for ids in train_ids}
    return sum(1 for ids in validation_ids if tuple(ids) in seen)


@dataclass(frozen=True)
class ValidationStats:
    """What preflight reports about the validation rows."""

    source: str
    available: int
    """Validation rows there are (held out, or in the source)."""
    tokens: data.DataStats
    """Length figures of the rows evaluated (`tokens.rows` of them)."""
    overlap: int
    """Rows evaluated that equal a training row (always 0 for a held-out fraction)."""

    def as_dict(self) -> dict[str, Any]:
        figures = self.tokens.as_dict()
        return {
            "source": self.source,
            "rowsAvailable": self.available,
            "rowsEvaluated": figures.pop("rows"),
            **figures,
            "overlapWithTraining": self.overlap,
        }


@dataclass(frozen=True)
class Split:
    """The raw training rows left after holding out, and the raw validation rows to evaluate."""

    train: datasets.Dataset
    validation: datasets.Dataset
    available: int
    source: str


def split(spec: TrainingSpec, rows: datasets.Dataset, workdir: Path) -> Split | None:
    """Hold out or load the validation rows (None without spec.data.validation); the template's
    columns are checked on them. ConfigError names the spec.data.validation field at fault."""
    source = spec.data.validation
    if source is None:
        return None
    if source.fraction is not None:
        keep, held = holdout_split(len(rows), source.fraction, source.seed)
        if not held:
            raise ConfigError(
                source.source_field,
                f"{source.fraction} of the {len(rows)} training rows is no row: raise the fraction "
                "or give the validation rows a source of their own",
            )
        train, validation = rows.select(keep), rows.select(held)
        described = f"fraction {source.fraction} of {len(rows)} training rows (seed {source.seed})"
    else:
        train, validation = rows, _load(spec, source, workdir)
        described = source.source_field.rsplit(".", 1)[1] + " " + str(_where(source))
    try:
        templates.check_columns(spec.template, validation.column_names)
    except ConfigError as e:
        raise ConfigError(
            source.source_field, f"the validation rows do not fit the template: {e.message}"
        ) from None
    if source.fraction is None:
        validation, _ = data.complete_rows(
            validation,
            spec.template,
            spec.data.incomplete_rows,
            source.source_field,
            f"validation {described}",
        )
    chosen = evaluated_indices(len(validation), source.max_rows, source.seed)
    return Split(train, validation.select(chosen), len(validation), described)


def prepare(
    spec: TrainingSpec, found: Split, train: data.PreparedData, tokenizer: Any
) -> tuple[data.PreparedData, ValidationStats]:
    """Render and tokenize the validation rows as the training rows are; their figures."""
    source = spec.data.validation
    assert source is not None  # split() returned rows
    try:
        prepared = data.prepare(
            found.validation, spec.template, tokenizer=tokenizer, max_seq_length=spec.model.max_seq_length
        )
    except ConfigError as e:
        field = e.field if e.field == "spec.model.maxSeqLength" else source.source_field
        raise ConfigError(field, f"validation rows: {e.message}") from None
    repeated = overlap(train.dataset["input_ids"], prepared.dataset["input_ids"])
    return prepared, ValidationStats(found.source, found.available, prepared.stats, repeated)


def _where(source: ValidationSource) -> str:
    where = source.hub or source.s3 or source.path or ""
    return f"{where} (split {source.split})"


def _load(spec: TrainingSpec, source: ValidationSource, workdir: Path) -> datasets.Dataset:
    as_data = DataSource(
        hub=source.hub,
        s3=source.s3,
        path=source.path,
        config=source.config,
        split=source.split,
        format=source.format,
        token_secret_ref=spec.data.token_secret_ref,
    )
    try:
        return data.load_rows(as_data, spec.storage, workdir / "validation")
    except ConfigError as e:
        field = e.field.replace("spec.data.", "spec.data.validation.", 1)
        raise ConfigError(field, f"validation rows: {e.message}") from None
