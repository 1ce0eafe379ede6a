"""Training data: load rows (hub, S3 object or local file), render them, tokenize them.

The trainer hands SFTTrainer pre-tokenized rows (`input_ids`, `attention_mask`), so the numbers
preflight prints are exactly what training sees, and rendering happens once, here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from finetune_trainer import templates
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


def load_rows(source: DataSource, storage: StorageSpec, workdir: Path) -> datasets.Dataset:
    """The raw rows of the data source, as a `datasets.Dataset`; malformed or empty -> ConfigError."""
    import datasets

    cache = str(workdir / "datasets-cache")
    split_name = source.split.split("[", 1)[0]
    field = source_field(source)
    try:
        if source.hub:
            rows = datasets.load_dataset(
                source.hub, source.config, split=source.split, cache_dir=cache, token=data_hub_token()
            )
        else:
            path = _local_copy(source, storage, workdir) if source.s3 else Path(source.path or "")
            if not path.is_file():
                raise ConfigError(field, f"no such file: {path}")
            if path.stat().st_size == 0:
                raise ConfigError(field, f"{path} is empty: the data set has no rows")
            builder = builder_for(source, path.name)
            rows = datasets.load_dataset(
                builder, data_files={split_name: str(path)}, split=source.split, cache_dir=cache
            )
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise ConfigError(field, f"cannot read the data set: {_root_cause(e)}") from None
    if len(rows) == 0:
        raise ConfigError(field, f"the data set (split {source.split}) has no rows")
    return rows


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
