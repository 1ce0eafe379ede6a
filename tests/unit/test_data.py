"""Data loading, the length figures and the fit checks of preflight (real files, real tokenizer)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from finetune_trainer import data, datafiles, preflight
from finetune_trainer.errors import ConfigError
from finetune_trainer.jobfile import parse_job
from finetune_trainer.spec import DataSource, StorageSpec
from trainer_fixtures import alpaca_rows, write_jsonl

STORAGE = StorageSpec()


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [data.percentile(values, q) for q in (50, 95, 100)] == [50, 95, 100]
    assert data.percentile([7], 95) == 7


def test_stats_count_truncated_rows_and_refuse_data_that_cannot_fit() -> None:
    figures = data.stats(["first"], [10, 20, 30, 200], max_seq_length=100)
    assert (figures.rows, figures.p50, figures.max, figures.truncated) == (4, 20, 200, 1)
    assert figures.truncated_share == 0.25
    with pytest.raises(ConfigError) as e:
        data.stats(["x"], [150, 200], max_seq_length=100)
    assert e.value.field == "spec.model.maxSeqLength" and "shortest 150" in e.value.message
    with pytest.raises(ConfigError, match="no rows"):
        data.stats([], [], max_seq_length=100)


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        ("a.jsonl", "auto", "json"),
        ("a.JSON", "auto", "json"),
        ("a.parquet", "auto", "parquet"),
        ("a.txt", "csv", "csv"),
    ],
)
def test_builder_from_extension_or_format(name: str, fmt: str, expected: str) -> None:
    assert data.builder_for(DataSource(path=name, format=fmt), name) == expected


def test_unknown_extension_names_the_format_field() -> None:
    with pytest.raises(ConfigError) as e:
        data.builder_for(DataSource(path="rows.txt"), "rows.txt")
    assert e.value.field == "spec.data.format"


def write_formats(folder: Path, rows: list[dict[str, str]]) -> dict[str, Path]:
    import pandas as pd

    frame = pd.DataFrame(rows)
    paths = {
        "jsonl": write_jsonl(folder / "rows.jsonl", rows),
        "json": folder / "rows.json",
        "csv": folder / "rows.csv",
        "parquet": folder / "rows.parquet",
    }
    paths["json"].write_text(json.dumps(rows))
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    return paths


def test_every_file_format_loads_the_same_rows_with_a_split_slice(tmp_path: Path) -> None:
    rows = alpaca_rows(10)
    for kind, path in write_formats(tmp_path, rows).items():
        loaded = data.load_rows(DataSource(path=str(path), split="train[2:5]"), STORAGE, tmp_path / kind)
        assert [r["instruction"] for r in loaded] == [r["instruction"] for r in rows[2:5]], kind


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
            "is not valid JSON: line 2, column 32: Expecting value",
        ),
        ("", "no rows"),
    ],
)
def test_malformed_or_empty_data_names_the_source_field(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        data.load_rows(DataSource(path=str(path)), STORAGE, tmp_path)
    assert e.value.field == "spec.data.path"
    assert words in e.value.message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        data.load_rows(DataSource(path=str(tmp_path / "nope.jsonl")), STORAGE, tmp_path)


def job_for(
    model: Path, rows: Path, max_seq_length: int = 256, max_truncated: float = 0.1, **template: object
) -> object:
    spec = {
        "model": {"path": str(model), "maxSeqLength": max_seq_length},
        "data": {"path": str(rows), "maxTruncatedFraction": max_truncated},
        "template": template or {"type": "custom", "format": "{text}"},
    }
    return parse_job(spec).spec


def test_preflight_figures_on_known_lengths(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # 20 rows of growing length; the figures must be those of the tokenizer's own counts
    texts = [" ".join(["fever"] * (4 * i + 1)) for i in range(20)]
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in texts])
    lengths = [len(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in texts]
    limit = sorted(lengths)[15]  # 4 rows longer than this
    spec = job_for(tiny_model_dir, rows, max_seq_length=max(64, limit), max_truncated=0.25)
    checked = preflight.check(spec, tmp_path)
    figures = checked.data.stats
    assert lengths == sorted(lengths) and lengths[0] >= 3
    assert (figures.rows, figures.max) == (20, lengths[-1])
    assert (figures.p50, figures.p95) == (lengths[9], lengths[18])
    assert figures.truncated == sum(n > max(64, limit) for n in lengths)
    assert figures.example == texts[0] + tokenizer.eos_token
    stored = checked.data.dataset["input_ids"]
    assert max(len(ids) for ids in stored) == min(lengths[-1], max(64, limit))
    assert stored[0][0] == tokenizer.bos_token_id and stored[0][-1] == tokenizer.eos_token_id
    report = preflight.report(figures)
    assert f"p50 {figures.p50}, p95 {figures.p95}, max {figures.max}" in report


def test_preflight_checks_columns_before_loading_the_tokenizer(tmp_path: Path, alpaca_jsonl: Path) -> None:
    spec = job_for(tmp_path / "no-model-here", alpaca_jsonl, type="r1-reasoning")
    with pytest.raises(ConfigError) as e:
        preflight.check(spec, tmp_path)
    assert e.value.field == "spec.template.fields"
    assert "'Question'" in e.value.message and "input, instruction, output" in e.value.message


def test_preflight_refuses_rows_that_never_fit(tiny_model_dir: Path, r1_jsonl: Path, tmp_path: Path) -> None:
    spec = job_for(tiny_model_dir, r1_jsonl, max_seq_length=64, type="r1-reasoning")
    with pytest.raises(ConfigError) as e:
        preflight.check(spec, tmp_path)
    assert e.value.field == "spec.model.maxSeqLength"


def test_chat_template_goes_through_the_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "ka lo"}, {"role": "assistant", "content": "mi ne"}]}] * 3,
    )
    spec = job_for(tiny_model_dir, rows, type="chat")
    with pytest.raises(ConfigError) as e:  # the tiny tokenizer has no chat template
        preflight.check(spec, tmp_path)
    assert e.value.field == "spec.template.type"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_TOKEN": "model-token", "HF_DATA_TOKEN": "data-token"}, "data-token"),  # two Secrets
        ({"HF_TOKEN": "shared-token"}, "shared-token"),  # only the data set gated, or one Secret
        ({}, None),
    ],
)
def test_a_hub_data_set_is_read_with_the_data_sets_token(
    env: dict[str, str], expected: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator puts spec.data.tokenSecretRef in HF_DATA_TOKEN when the model has a Secret of
    its own. The hub cannot be reached from the tests, so `datasets.load_dataset` is replaced by a
    recorder that returns real rows: what is checked is the token the trainer hands it."""
    import datasets

    for name in ("HF_TOKEN", "HF_DATA_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls: list[dict] = []

    def load_dataset(*args: object, **kwargs: object) -> datasets.Dataset:
        calls.append({"args": args, **kwargs})
        return datasets.Dataset.from_list(alpaca_rows(3))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = data.load_rows(DataSource(hub="org/gated-set"), STORAGE, tmp_path)
    assert len(rows) == 3
    assert calls[0]["args"][0] == "org/gated-set" and calls[0]["token"] == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"a": "x"}\n{"a": "y"}\n', datafiles.TextScan(None, None, 2)),
        (b'{"a": "x"}\n\n  \n{"a": "\xe9"}\n', datafiles.TextScan(4, 22, 1)),  # latin-1 e-acute
        (b"\xef\xbb\xbfa,b\n1,2\n", datafiles.TextScan(None, None, 2)),  # a UTF-8 BOM is UTF-8
        (b"ok\n\xe2\x82\n", datafiles.TextScan(2, 3, 1)),  # a cut multi-byte character
        (b"\n \t\n", datafiles.TextScan(None, None, 0)),
        (b"", datafiles.TextScan(None, None, 0)),
    ],
)
def test_scan_text_finds_the_first_line_that_is_not_utf8(
    content: bytes, expected: datafiles.TextScan
) -> None:
    assert datafiles.scan_text(content.splitlines(keepends=True)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}\n\n{"a": 2}\n', None),
        ('{"a": 1}\n{"a": 2,}\n', "line 2, column 9: Expecting property name enclosed in double quotes"),
        ('\n\n{"a": \n', "line 3, column 7: Expecting value"),
        ('{"a": 1}\n"just a string"\n', "line 2: expected one JSON object per line, got str"),
        ('[{"a": 1},\n {"a": 2}]', None),
        ('[{"a": 1},\n {"a" 2}]', "line 2, column 7: Expecting ':' delimiter"),
        ("[1, 2]", "element 1 of the JSON array is not an object"),
    ],
)
def test_json_problem_names_a_one_based_line(text: str, expected: str | None) -> None:
    assert datafiles.json_problem(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,b\n1,2\n\n3,4\n", None),
        ("a,b\n1,2\n\n3,4,5\n", "row 2 (line 4) has 3 cells but the header has 2 (a, b)"),
        ('a,b\n"x\ny",2\n3\n', "row 2 (line 4) has 1 cells but the header has 2 (a, b)"),
        ("", None),
    ],
)
def test_csv_problem_names_a_one_based_row_and_line(text: str, expected: str | None) -> None:
    assert datafiles.csv_problem(text.splitlines(keepends=True)) == expected


def test_missing_cells_are_null_or_nan_and_named_one_based() -> None:
    missing = data.missing_cells({"a": ["x", None, "", float("nan"), 0], "b": ["y"] * 5})
    assert missing == {"a": [1, 3]}  # an empty string and 0 are values
    many = data.missing_cells({"output": [None] * 7})
    assert data.describe_missing({**missing, **many}) == (
        "column 'a' is missing or null in 2 rows: 2, 4; "
        "column 'output' is missing or null in 7 rows: 1, 2, 3, 4, 5, ..."
    )


@pytest.mark.parametrize(
    ("truncated", "max_fraction", "outcome"),
    [
        (0, 0.1, None),
        (1, 0.1, None),  # 1%: no warning
        (2, 0.1, "warn"),
        (10, 0.1, "warn"),  # at the limit: allowed
        (11, 0.1, "fail"),
        (39, 0.1, "fail"),
        (39, 0.5, "warn"),
        (1, 0.0, "fail"),
        (99, 1.0, "warn"),
    ],
)
def test_truncation_verdict(truncated: int, max_fraction: float, outcome: str | None) -> None:
    figures = data.DataStats(100, 10, 20, 30, truncated, 64, "x")
    if outcome == "fail":
        with pytest.raises(ConfigError) as e:
            data.truncation_verdict(figures, max_fraction)
        assert e.value.field == "spec.data.maxTruncatedFraction"
        assert f"{truncated} of 100 rows ({truncated}.0%)" in e.value.message
        assert (
            "maxSeqLength 64" in e.value.message and f"at most {max_fraction * 100:g}% may" in e.value.message
        )
        return
    verdict = data.truncation_verdict(figures, max_fraction)
    assert (verdict is not None) == (outcome == "warn")


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q_proj", "v_proj"], None),
        (["self_attn.q_proj", "lm_head"], None),
        (["q_proj", "q_prj"], "q_prj matches no module of the model; the names it can adapt are: "),
        (["query", "value"], "query, value match no module of the model"),
        (["proj"], "proj matches no module"),  # a suffix must end at a dot, as PEFT matches
    ],
)
def test_target_modules_problem(targets: list[str], expected: str | None) -> None:
    from finetune_trainer import engines

    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")] + [
        "lm_head"
    ]
    problem = engines.target_modules_problem(targets, modules)
    if expected is None:
        assert problem is None
        return
    assert problem is not None and problem.startswith(expected)
    assert problem.endswith("lm_head, q_proj, v_proj")


def test_a_model_that_cannot_be_built_is_left_to_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """targetModules are checked on a skeleton built from config.json; a config transformers
    cannot build (here an unknown architecture) is logged, and the engine's load reports it."""
    from finetune_trainer import engines

    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    spec = parse_job({"model": {"path": str(tmp_path)}, "data": {"hub": "d/x"}}).spec
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.engines"):
        engines.check_target_modules(spec, str(tmp_path))
    assert "cannot check spec.lora.targetModules before loading the model" in caplog.text
