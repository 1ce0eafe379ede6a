"""Bad data files through the real trainer preflight on the tiny local model: each row is a data
file (and the spec fields it is used with), the spec field the ConfigError must name and words of
its message (the file, a 1-based line or row). Then the same through the process (`python -m
finetune_trainer preflight`: exit code 78, no traceback) and through `run` (the summary).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import preflight
from finetune_trainer.errors import EXIT_CONFIG_ERROR, ConfigError
from finetune_trainer.jobfile import parse_job
from trainer_fixtures import alpaca_rows, job_manifest, write_job
from trainer_runs import process_env, run_in_process

ALPACA = alpaca_rows(4)
SHORT = " ".join(["fever"] * 2)
LONG = " ".join(["fever"] * 80)  # longer than 64 tokens of the tiny tokenizer
TEXT = {"type": "custom", "format": "{text}"}
TRUNCATION = {"template": TEXT, "model": {"maxSeqLength": 64}}
"""Rows of the SHORT and LONG texts as they are, at the shortest maxSeqLength."""


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def lengths_file(long_rows: int, rows: int) -> bytes:
    return jsonl([{"text": LONG if i < long_rows else SHORT} for i in range(rows)])


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, bytes]
    """Files written in the test's folder; `rows.*` is spec.data.path, `validation.*` the
    validation path when the spec names one."""
    field: str | None
    """The field the ConfigError names; None: preflight passes."""
    words: tuple[str, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)
    """Sections of the spec (model and data fields are added to the defaults')."""


CASES = [
    # 1. encoding
    Case(
        "latin1-jsonl",
        {"rows.jsonl": jsonl(ALPACA[:1]) + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")},
        "spec.data.path",
        ("rows.jsonl is not UTF-8 at line 2 (byte offset", "iconv"),
    ),
    Case(
        "latin1-csv",
        {"rows.csv": b"instruction,output\nfine,ok\nfine,ok\ncaf\xe9,x\n"},
        "spec.data.path",
        ("rows.csv is not UTF-8 at line 4 (byte offset 38)",),
    ),
    Case(
        "utf16-jsonl",
        {"rows.jsonl": '{"instruction": "a", "output": "b"}\n'.encode("utf-16")},
        "spec.data.path",
        ("not UTF-8 at line 1 (byte offset 0)",),
    ),
    # 2. no rows
    Case(
        "empty-jsonl", {"rows.jsonl": b""}, "spec.data.path", ("rows.jsonl has no rows: the file is empty",)
    ),
    Case(
        "blank-jsonl", {"rows.jsonl": b"\n\n  \n\t\n"}, "spec.data.path", ("rows.jsonl has no rows", "blank")
    ),
    Case("blank-csv", {"rows.csv": b"\n\n"}, "spec.data.path", ("rows.csv has no rows", "blank")),
    Case(
        "header-only-csv", {"rows.csv": b"instruction,output\n"}, "spec.data.path", ("rows.csv has no rows",)
    ),
    Case("empty-json-array", {"rows.json": b"[]"}, "spec.data.path", ("rows.json has no rows",)),
    # 3. JSON, 1-based lines
    Case(
        "json-trailing-comma-line-3",
        {"rows.jsonl": jsonl(ALPACA[:2]) + b'{"instruction": "a", "output": "b",}\n'},
        "spec.data.path",
        ("rows.jsonl is not valid JSON: line 3, column",),
    ),
    Case(
        "json-truncated-last-line",
        {"rows.jsonl": jsonl(ALPACA[:3]) + b'{"instruction": "c", "output": \n'},
        "spec.data.path",
        ("not valid JSON: line 4",),
    ),
    Case(
        "json-blank-lines-count",
        {"rows.jsonl": b"\n" + jsonl(ALPACA[:1]) + b"\nnot json\n"},
        "spec.data.path",
        ("not valid JSON: line 4, column 1",),
    ),
    Case(
        "json-array-line-numbers",
        {"rows.json": b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n'},
        "spec.data.path",
        ("not valid JSON: line 3, column",),
    ),
    Case(
        "jsonl-line-not-an-object",
        {"rows.jsonl": jsonl([ALPACA[0], ["a", "b"], ALPACA[1]])},
        "spec.data.path",
        ("line 2: expected one JSON object per line, got list",),
    ),
    # 4. CSV cell counts, 1-based rows
    Case(
        "csv-extra-cell",
        {"rows.csv": b"instruction,output\na,b\nc,d,e\n"},
        "spec.data.path",
        ("rows.csv: CSV row 2 (line 3) has 3 cells but the header has 2 (instruction, output)",),
    ),
    Case(
        "csv-short-row",
        {"rows.csv": b"instruction,input,output\na,,b\nc,d\n"},
        "spec.data.path",
        ("CSV row 2 (line 3) has 2 cells but the header has 3",),
    ),
    Case(
        "csv-quoted-newline-counts-lines",
        {"rows.csv": b'instruction,output\n"two\nlines",b\nc\n'},
        "spec.data.path",
        ("CSV row 2 (line 4) has 1 cells",),
    ),
    # 5. missing or null cells
    Case(
        "jsonl-null-output",
        {
            "rows.jsonl": jsonl(
                [ALPACA[0], {**ALPACA[1], "output": None}, ALPACA[2], {**ALPACA[3], "output": None}]
            )
        },
        "spec.data.path",
        ("rows.jsonl: column 'output' is missing or null in 2 rows: 2, 4", "incompleteRows: skip"),
    ),
    Case(
        "jsonl-missing-key",
        {"rows.jsonl": jsonl([ALPACA[0], {"instruction": "a", "input": ""}, ALPACA[1]])},
        "spec.data.path",
        ("column 'output' is missing or null in 1 rows: 2",),
    ),
    Case(
        "csv-empty-cell",
        {"rows.csv": b"instruction,output\na,b\n,d\ne,f\n"},
        "spec.data.path",
        ("column 'instruction' is missing or null in 1 rows: 2",),
    ),
    Case(
        "many-nulls-name-five-and-count",
        {
            "rows.jsonl": jsonl(
                [{**r, "output": None if i % 2 else r["output"]} for i, r in enumerate(alpaca_rows(20))]
            )
        },
        "spec.data.path",
        ("in 10 rows: 2, 4, 6, 8, 10, ...",),
    ),
    Case(
        "renamed-column-null",
        {"rows.jsonl": jsonl([{"q": "a", "a": "b"}, {"q": None, "a": "c"}])},
        "spec.data.path",
        ("column 'q' is missing or null in 1 rows: 2",),
        {
            "template": {
                "type": "custom",
                "format": "Q {question} A {answer}",
                "fields": {"question": "q", "answer": "a"},
            }
        },
    ),
    Case(
        "chat-null-messages",
        {"rows.jsonl": jsonl([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": None}])},
        "spec.data.path",
        ("column 'messages' is missing or null in 1 rows: 2",),
        {"template": {"type": "chat"}},
    ),
    Case(
        "alpaca-null-input-is-optional", {"rows.jsonl": jsonl([{**r, "input": None} for r in ALPACA])}, None
    ),
    Case(
        "skip-leaves-rows-out",
        {"rows.jsonl": jsonl([ALPACA[0], {**ALPACA[1], "output": None}, ALPACA[2], {"instruction": "x"}])},
        None,
        spec={"data": {"incompleteRows": "skip"}},
    ),
    Case(
        "skip-every-row-incomplete",
        {"rows.jsonl": jsonl([{"instruction": "a", "output": None}, {"instruction": None, "output": "b"}])},
        "spec.data.path",
        ("every row has a missing or null cell",),
        {"data": {"incompleteRows": "skip"}},
    ),
    Case(
        "validation-file-null-cell",
        {"rows.jsonl": jsonl(ALPACA), "validation.jsonl": jsonl([ALPACA[0], {**ALPACA[1], "output": None}])},
        "spec.data.validation.path",
        ("validation path", "validation.jsonl", "column 'output' is missing or null in 1 rows: 2"),
    ),
    Case(
        "validation-file-not-utf8",
        {"rows.jsonl": jsonl(ALPACA), "validation.jsonl": b'{"instruction": "\xff", "output": "b"}\n'},
        "spec.data.validation.path",
        ("validation.jsonl is not UTF-8 at line 1 (byte offset 17)",),
    ),
    # 6. truncation: 2 of 10 rows too long for maxSeqLength 64
    Case(
        "truncated-over-the-default",
        {"rows.jsonl": lengths_file(2, 10)},
        "spec.data.maxTruncatedFraction",
        ("2 of 10 rows (20.0%)", "maxSeqLength 64", "at most 10% may"),
        TRUNCATION,
    ),
    Case(
        "truncated-under-a-raised-limit",
        {"rows.jsonl": lengths_file(2, 10)},
        None,
        spec={**TRUNCATION, "data": {"maxTruncatedFraction": 0.25}},
    ),
    Case(
        "truncated-over-a-lowered-limit",
        {"rows.jsonl": lengths_file(1, 40)},
        "spec.data.maxTruncatedFraction",
        ("1 of 40 rows (2.5%)", "at most 2% may"),
        {**TRUNCATION, "data": {"maxTruncatedFraction": 0.02}},
    ),
    Case("truncated-a-few-warns", {"rows.jsonl": lengths_file(1, 20)}, None, spec=TRUNCATION),
    Case(
        "every-row-truncated-names-max-seq-length",
        {"rows.jsonl": lengths_file(3, 3)},
        "spec.model.maxSeqLength",
        ("every row is longer than 64 tokens",),
        {**TRUNCATION, "data": {"maxTruncatedFraction": 1}},
    ),
    # 7. targetModules against the model
    Case(
        "target-module-typo-among-right-ones",
        {"rows.jsonl": jsonl(ALPACA)},
        "spec.lora.targetModules",
        (
            "q_prj matches no module of the model",
            "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
        {"lora": {"targetModules": ["q_proj", "q_prj", "v_proj"]}},
    ),
    Case(
        "target-modules-all-wrong",
        {"rows.jsonl": jsonl(ALPACA)},
        "spec.lora.targetModules",
        ("query, value match no module",),
        {"lora": {"targetModules": ["query", "value"]}},
    ),
    Case(
        "target-module-not-adaptable",
        {"rows.jsonl": jsonl(ALPACA)},
        "spec.lora.targetModules",
        ("self_attn matches no module",),
        {"lora": {"targetModules": ["self_attn"]}},
    ),
    Case(
        "target-modules-qualified-and-head",
        {"rows.jsonl": jsonl(ALPACA)},
        None,
        spec={"lora": {"targetModules": ["self_attn.q_proj", "mlp.down_proj", "lm_head"]}},
    ),
]


def spec_for(case: Case, folder: Path, model: Path) -> Any:
    data_file = next(name for name in case.files if name.startswith("rows."))
    spec: dict[str, Any] = {
        "model": {"path": str(model), "maxSeqLength": 1024},
        "data": {"path": str(folder / data_file)},
        "template": {"type": "alpaca"},
    }
    validation = next((name for name in case.files if name.startswith("validation.")), None)
    if validation:
        spec["data"]["validation"] = {"path": str(folder / validation)}
    for section, values in case.spec.items():
        spec[section] = {**spec[section], **values} if section in ("model", "data") else values
    return parse_job(spec).spec


def write_case(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        (folder / name).write_bytes(content)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_is_a_config_error_naming_field_file_and_line(
    case: Case, tiny_model_dir: Path, tmp_path: Path
) -> None:
    write_case(case, tmp_path / "files")
    spec = spec_for(case, tmp_path / "files", tiny_model_dir)
    if case.field is None:
        preflight.check(spec, tmp_path / "work")
        return
    with pytest.raises(ConfigError) as e:
        preflight.check(spec, tmp_path / "work")
    assert e.value.field == case.field, str(e.value)
    for words in case.words:
        assert words in e.value.message, str(e.value)


def test_skipped_rows_are_counted_in_the_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "skip-leaves-rows-out")
    write_case(case, tmp_path / "files")
    checked = preflight.check(spec_for(case, tmp_path / "files", tiny_model_dir), tmp_path / "work")
    stats = checked.data.stats
    assert (stats.rows, stats.incomplete_skipped) == (2, 2)
    assert stats.as_dict()["incompleteRowsSkipped"] == 2
    assert "left out:        2 rows with a missing or null cell" in preflight.report(stats)


def test_a_few_truncated_rows_warn(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = next(c for c in CASES if c.id == "truncated-a-few-warns")
    write_case(case, tmp_path / "files")
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.preflight"):
        checked = preflight.check(spec_for(case, tmp_path / "files", tiny_model_dir), tmp_path / "work")
    assert checked.data.stats.truncated == 1
    warned = [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.preflight"]
    assert warned == [
        "1 of 20 rows (5.0%) are longer than maxSeqLength 64 tokens and lose their end (for most templates "
        "the answer and the end-of-sequence token); spec.data.maxTruncatedFraction allows 10%"
    ]


def test_the_preflight_command_exits_78_without_a_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(jsonl(ALPACA[:2]) + b'{"instruction": "\xe9", "output": "x"}\n')
    job = write_job(tmp_path / "job.yaml", job_manifest(tiny_model_dir, rows))
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "preflight", str(job), "--log-format", "text"],
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == EXIT_CONFIG_ERROR, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert f"spec.data.path: data file {rows} is not UTF-8 at line 3 (byte offset" in done.stderr


def test_run_fails_on_truncation_and_reports_cpu_substitutions(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`run` applies preflight's threshold (exit 78, the summary names the field), and the summary
    says what the CPU engine runs instead of the GPU-only optimizer and checkpointing."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(lengths_file(3, 10))
    manifest = job_manifest(tiny_model_dir, rows, template=TEXT)
    manifest["spec"]["model"]["maxSeqLength"] = 64
    del manifest["spec"]["data"]["maxTruncatedFraction"]  # the default, 10%
    manifest["spec"]["training"]["optimizer"] = "adamw_8bit"
    manifest["spec"]["lora"]["gradientCheckpointing"] = "unsloth"
    done = run_in_process(write_job(tmp_path / "job.yaml", manifest), tmp_path / "run")
    assert done.code == EXIT_CONFIG_ERROR
    assert done.summary["exitReason"] == "config-error"
    assert done.summary["message"].startswith("spec.data.maxTruncatedFraction: 3 of 10 rows (30.0%)")
    substituted = "training.optimizer: adamw_8bit -> adamw_torch; lora.gradientCheckpointing: unsloth -> true"
    assert done.summary["cpuSubstitutions"] == substituted
    assert sum("the CPU engine runs" in m for m in done.messages()) == 1
