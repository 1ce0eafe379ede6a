"""Training data: load rows (hub, S3 object or local file), render them, tokenize them.

The trainer hands SFTTrainer pre-tokenized rows (`input_ids`, `attention_mask`), so the numbers
preflight prints are exactly what training sees, and rendering happens once, here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from finetune_trainer import datafiles, templates
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import DataSource, PromptTemplate, StorageSpec

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> `datasets` builder."""
BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}


@dataclass(frozen=True)
class DataStats:
    """What preflight reports about the tokenized data (lengths before truncation)."""

    rows: int
    p50: int
    p95: int
    max: int
    truncated: int
    max_seq_length: int
    example: str
    incomplete_skipped: int = 0
    """Rows left out for a missing or null cell (spec.data.incompleteRows: skip)."""

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "tokensP50": self.p50,
            "tokensP95": self.p95,
            "tokensMax": self.max,
            "truncatedRows": self.truncated,
            "truncatedShare": round(self.truncated_share, 4),
            "maxSeqLength": self.max_seq_length,
            "incompleteRowsSkipped": self.incomplete_skipped,
        }


def builder_for(source: DataSource, name: str) -> str:
    """The `datasets` builder for a file: from spec.data.format, or from the extension for auto."""
    if source.format != "auto":
        return BUILDERS[source.format]
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            "spec.data.format",
            f"cannot tell the format of {name!r} from its extension; expected one of "
            f"{', '.join(FORMATS)} or set format to json, jsonl, parquet or csv",
        )
    return FORMATS[suffix]


def data_hub_token() -> str | None:
    """The hub token for a gated data set (never logged). The operator sets `HF_DATA_TOKEN` from
    spec.data.tokenSecretRef when the model has a Secret of its own, and `HF_TOKEN` when the data
    set's Secret is the only one or the same as the model's (jobbuilder._env)."""
    return os.environ.get("HF_DATA_TOKEN") or os.environ.get("HF_TOKEN") or None


def source_field(source: DataSource) -> str:
    return "spec.data.hub" if source.hub else "spec.data.s3" if source.s3 else "spec.data.path"


def source_label(source: DataSource) -> str:
    """How messages name the rows: `data file <path or s3 URI>` or `data set <hub id>`."""
    return f"data set {source.hub}" if source.hub else f"data file {source.s3 or source.path}"


def load_rows(source: DataSource, storage: StorageSpec, workdir: Path) -> datasets.Dataset:
    """The raw rows of the data source, as a `datasets.Dataset`; a file that is not UTF-8, has no
    rows, or holds bad JSON or CSV -> ConfigError naming the file and a 1-based line or row."""
    import datasets

    cache = str(workdir / "datasets-cache")
    split_name = source.split.split("[", 1)[0]
    field = source_field(source)
    label = source_label(source)
    path: Path | None = None
    builder = ""
    try:
        if source.hub:
            rows = datasets.load_dataset(
                source.hub, source.config, split=source.split, cache_dir=cache, token=data_hub_token()
            )
        else:
            path = _local_copy(source, storage, workdir) if source.s3 else Path(source.path or "")
            if not path.is_file():
                raise ConfigError(field, f"no such file: {path}")
            builder = builder_for(source, path.name)
            check_file(path, builder, field, label)
            rows = datasets.load_dataset(
                builder, data_files={split_name: str(path)}, split=source.split, cache_dir=cache
            )
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        where = _json_problem(path, builder) if path is not None else None
        if where is not None:
            raise ConfigError(field, f"{label} is not valid JSON: {where}") from None
        if path is not None and "corresponds to no data" in str(e):  # datasets' word for 0 rows
            raise ConfigError(field, f"{label} has no rows (split {source.split})") from None
        raise ConfigError(field, f"cannot read the data set: {_root_cause(e)}") from None
    if len(rows) == 0:
        raise ConfigError(field, f"{label} has no rows (split {source.split})")
    return rows


TEXT_BUILDERS = ("json", "csv")


def check_file(path: Path, builder: str, field: str, label: str) -> None:
    """Refuse a local JSON or CSV file that is empty, only blank lines, not UTF-8, or (CSV) has a
    row with the wrong number of cells, before `datasets` reads it; `label` names the file as the
    spec does (the S3 URI of a downloaded object)."""
    if path.stat().st_size == 0:
        raise ConfigError(field, f"{label} has no rows: the file is empty")
    if builder not in TEXT_BUILDERS:
        return
    with path.open("rb") as f:
        scan = datafiles.scan_text(f)
    if scan.bad_line is not None:
        raise ConfigError(
            field,
            f"{label} is not UTF-8 at line {scan.bad_line} (byte offset {scan.bad_offset}); "
            "save it as UTF-8, for example with `iconv -f latin1 -t utf-8`",
        )
    if scan.rows == 0:
        raise ConfigError(field, f"{label} has no rows: every line is blank")
    if builder == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            problem = datafiles.csv_problem(f)
        if problem is not None:
            raise ConfigError(field, f"{label}: CSV {problem}")


def _json_problem(path: Path, builder: str) -> str | None:
    """After `datasets` failed on a JSON file: the 1-based line where it stops being JSON rows."""
    if builder != "json" or not path.is_file():
        return None
    return datafiles.json_problem(path.read_text(encoding="utf-8"))


def _local_copy(source: DataSource, storage: StorageSpec, workdir: Path) -> Path:
    """Download an `s3://bucket/key` data object with the job's S3 endpoint and credentials."""
    from finetune_trainer.storage import ObjectNotFound, S3Store, config_errors

    assert source.s3 is not None
    parent, _, name = source.s3.rpartition("/")
    store = S3Store(parent, endpoint=storage.endpoint, region=storage.region)
    target = workdir / "data" / name
    try:
        with config_errors("spec.data.s3"):
            store.get_file(name, target)
    except ObjectNotFound:
        raise ConfigError("spec.data.s3", f"no such object: {source.s3}") from None
    return target


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


MAX_ROWS_NAMED = 5
"""Rows a missing-cell error names (the count says how many there are)."""


def is_missing(value: Any) -> bool:
    """A cell with no value: null (a missing JSON key, an empty CSV cell) or a float NaN (an empty
    cell in a numeric CSV column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def missing_cells(columns: Mapping[str, Iterable[Any]]) -> dict[str, list[int]]:
    """Column -> 0-based indices of its missing cells, for the columns that have any."""
    found = {name: [i for i, v in enumerate(values) if is_missing(v)] for name, values in columns.items()}
    return {name: rows for name, rows in found.items() if rows}


def describe_missing(missing: Mapping[str, list[int]]) -> str:
    """`column 'output' is missing or null in 7 rows: 2, 5, 9, 11, 12, ...` for each column."""
    parts = []
    for column, rows in missing.items():
        named = ", ".join(str(i + 1) for i in rows[:MAX_ROWS_NAMED])
        more = ", ..." if len(rows) > MAX_ROWS_NAMED else ""
        parts.append(f"column {column!r} is missing or null in {len(rows)} rows: {named}{more}")
    return "; ".join(parts)


def complete_rows(
    rows: datasets.Dataset, template: PromptTemplate, policy: str, field: str, label: str
) -> tuple[datasets.Dataset, int]:
    """The rows whose every column the template needs has a value, and how many were left out.
    policy `fail` (spec.data.incompleteRows) refuses any missing cell, naming the 1-based rows."""
    needed = sorted(set(templates.required_columns(template).values()) & set(rows.column_names))
    missing = missing_cells({column: rows[column] for column in needed})
    if not missing:
        return rows, 0
    if policy == "fail":
        raise ConfigError(
            field,
            f"{label}: {describe_missing(missing)} (rows count from 1); fill them, or set "
            "spec.data.incompleteRows: skip to train without those rows",
        )
    dropped = set().union(*missing.values())
    if len(dropped) == len(rows):
        raise ConfigError(
            field, f"{label}: every row has a missing or null cell: {describe_missing(missing)}"
        )
    return rows.select([i for i in range(len(rows)) if i not in dropped]), len(dropped)


def render_all(
    rows: datasets.Dataset,
    template: PromptTemplate,
    eos_token: str | None,
    chat: templates.ChatRenderer | None,
) -> list[str]:
    """Every row rendered through the template (columns checked first)."""
    templates.check_columns(template, rows.column_names)
    return [templates.render_row(template, row, eos_token, chat) for row in rows]


def tokenize(
    texts: list[str], tokenizer: Any, max_seq_length: int, add_special_tokens: bool = True
) -> tuple[dict[str, list[list[int]]], list[int]]:
    """Token ids truncated at max_seq_length, and every row's length before truncation."""
    ids = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=False)["input_ids"]
    lengths = [len(x) for x in ids]
    cut = [x[:max_seq_length] for x in ids]
    return {"input_ids": cut, "attention_mask": [[1] * len(x) for x in cut]}, lengths


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def stats(texts: list[str], lengths: list[int], max_seq_length: int) -> DataStats:
    """Length figures and the fit check: no rows, or every row too long, is a ConfigError."""
    if not lengths:
        raise ConfigError("spec.data", "the data set has no rows")
    truncated = sum(1 for n in lengths if n > max_seq_length)
    if truncated == len(lengths):
        raise ConfigError(
            "spec.model.maxSeqLength",
            f"every row is longer than {max_seq_length} tokens (shortest {min(lengths)}); "
            "raise maxSeqLength or shorten the rows",
        )
    return DataStats(
        rows=len(lengths),
        p50=percentile(lengths, 50),
        p95=percentile(lengths, 95),
        max=max(lengths),
        truncated=truncated,
        max_seq_length=max_seq_length,
        example=texts[0],
    )


TRUNCATION_WARN_SHARE = 0.01
"""Above this share of truncated rows preflight warns (spec.data.maxTruncatedFraction fails)."""


def truncation_verdict(figures: DataStats, max_fraction: float) -> str | None:
    """ConfigError when more than `max_fraction` of the rows are truncated; above 1% the warning
    to log; else None."""
    what = (
        f"{figures.truncated} of {figures.rows} rows ({figures.truncated_share:.1%}) are longer than "
        f"maxSeqLength {figures.max_seq_length} tokens and lose their end (for most templates the "
        "answer and the end-of-sequence token)"
    )
    if figures.truncated_share > max_fraction:
        raise ConfigError(
            "spec.data.maxTruncatedFraction",
            f"{what}; at most {max_fraction * 100:g}% may: raise spec.model.maxSeqLength (p95 is "
            f"{figures.p95} tokens, the longest row {figures.max}), shorten the rows, or raise "
            "maxTruncatedFraction",
        )
    return what if figures.truncated_share > TRUNCATION_WARN_SHARE else None


@dataclass(frozen=True)
class PreparedData:
    """Tokenized rows for SFTTrainer plus the figures preflight reports."""

    dataset: datasets.Dataset
    stats: DataStats


def prepare(
    rows: datasets.Dataset,
    template: PromptTemplate,
    *,
    tokenizer: Any,
    max_seq_length: int,
) -> PreparedData:
    """Render, tokenize and check loaded rows: the data half of preflight."""
    import datasets

    texts = render_all(rows, template, tokenizer.eos_token, templates.chat_renderer(tokenizer))
    # Chat templates write their own BOS; adding another would double it.
    encoded, lengths = tokenize(texts, tokenizer, max_seq_length, add_special_tokens=template.type != "chat")
    figures = stats(texts, lengths, max_seq_length)
    return PreparedData(datasets.Dataset.from_dict(encoded), figures)
