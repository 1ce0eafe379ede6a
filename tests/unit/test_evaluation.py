"""Evaluation without training: validation rows, the eval-loss decisions, metrics.jsonl and loss.png,
the tracking payloads, the sample lines status shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import curves, evaluation, preflight, samples, tracking, validation
from finetune_trainer.errors import ConfigError
from finetune_trainer.evaluation import EvalPoint
from finetune_trainer.spec import EvaluationSpec, TrainingSpec
from trainer_fixtures import alpaca_rows, write_jsonl

# -- validation rows --------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "fraction"), [(64, 0.1), (10, 0.5), (1000, 0.05), (7, 0.3)])
def test_holdout_never_overlaps_and_is_reproducible(rows: int, fraction: float) -> None:
    train, held = validation.holdout_split(rows, fraction, seed=3407)
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(rows))
    assert len(held) == int(rows * fraction)
    assert (train, held) == validation.holdout_split(rows, fraction, seed=3407)
    assert held != validation.holdout_split(rows, fraction, seed=1)[1]


def test_evaluated_rows_are_a_fixed_sample_under_the_cap() -> None:
    assert validation.evaluated_indices(5, 10, seed=0) == [0, 1, 2, 3, 4]
    chosen = validation.evaluated_indices(1000, 100, seed=7)
    assert len(chosen) == 100 and chosen == sorted(set(chosen))
    assert chosen == validation.evaluated_indices(1000, 100, seed=7)


def test_overlap_counts_repeated_training_rows() -> None:
    assert validation.overlap([[1, 2], [3]], [[1, 2], [4], [3]]) == 2


def spec_with(tiny_model_dir: Path, data: Path, **validation_source: Any) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "model": {"path": str(tiny_model_dir), "maxSeqLength": 128},
            "data": {"path": str(data), "validation": validation_source},
            "template": {"type": "custom", "format": "Q: {instruction}\nA: {output}"},
        }
    )


def test_preflight_holds_out_rows_and_reports_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(40))
    checked = preflight.check(spec_with(tiny_model_dir, data, fraction=0.25, maxRows=6), tmp_path)
    assert checked.data.stats.rows == 30  # 10 held out, never trained on
    assert checked.validation is not None and checked.validation_stats is not None
    figures = checked.validation_stats.as_dict()
    assert figures["rowsAvailable"] == 10 and figures["rowsEvaluated"] == 6
    assert figures["overlapWithTraining"] == 0 and figures["tokensMax"] > 0
    train_ids = {tuple(x) for x in checked.data.dataset["input_ids"]}
    assert not train_ids & {tuple(x) for x in checked.validation.dataset["input_ids"]}
    assert "validation:      fraction 0.25 of 40 training rows" in preflight.report(
        checked.data.stats, checked.validation_stats
    )


def test_validation_file_of_its_own_reports_rows_repeated_from_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = alpaca_rows(20)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    own = write_jsonl(tmp_path / "val.jsonl", rows[:3] + alpaca_rows(5, seed=9))
    checked = preflight.check(spec_with(tiny_model_dir, data, path=str(own), split="train"), tmp_path)
    assert checked.data.stats.rows == 20
    assert checked.validation_stats is not None
    assert checked.validation_stats.as_dict()["overlapWithTraining"] == 3


@pytest.mark.parametrize(
    ("source", "field", "words"),
    [
        ("wrong columns", "spec.data.validation.path", ["do not fit the template", "'output'"]),
        ("empty file", "spec.data.validation.path", ["empty"]),
        ("no such file", "spec.data.validation.path", ["no such file"]),
        ("too small a fraction", "spec.data.validation.fraction", ["0.05 of the 10 training rows is no row"]),
    ],
)
def test_bad_validation_data_is_refused_in_preflight_naming_the_field(
    tiny_model_dir: Path, tmp_path: Path, source: str, field: str, words: list[str]
) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(10))
    val = tmp_path / "val.jsonl"
    given: dict[str, Any] = {"path": str(val), "split": "train"}
    if source == "wrong columns":
        write_jsonl(val, [{"instruction": r["instruction"], "answer": r["output"]} for r in alpaca_rows(4)])
    elif source == "empty file":
        val.write_text("")
    elif source == "too small a fraction":
        given = {"fraction": 0.05}
    with pytest.raises(ConfigError) as e:
        preflight.check(spec_with(tiny_model_dir, data, **given), tmp_path)
    assert e.value.field == field
    for word in words:
        assert word in e.value.message, e.value.message


# -- the decisions ----------------------------------------------------------------------------


def points(*losses: float, every: int = 2) -> list[EvalPoint]:
    return [EvalPoint(i * every, loss) for i, loss in enumerate(losses)]


def test_trend_finds_the_best_and_counts_evaluations_since() -> None:
    t = evaluation.trend(points(3.0, 2.0, 2.5, 2.1, 1.9))
    assert (t.best, t.since_best, t.improved) == (EvalPoint(8, 1.9), 0, True)
    t = evaluation.trend(points(3.0, 2.0, 2.5, 2.1))
    assert (t.best.step, t.since_best, t.improved) == (2, 2, False)
    assert evaluation.trend(points(2.0, 1.95), min_delta=0.1).since_best == 1  # too small to count
    assert evaluation.trend([]).best is None


def test_early_stop_after_patience_evaluations_without_improvement() -> None:
    spec = EvaluationSpec(patience=2, early_stopping=True)
    assert evaluation.stop_reason(points(3.0, 2.0, 2.5), spec) is None
    reason = evaluation.stop_reason(points(3.0, 2.0, 2.5, 2.6), spec)
    assert reason is not None
    assert "did not improve for 2 evaluations" in reason and "best 2.0000 at step 2" in reason
    assert evaluation.stop_reason(points(3.0, 2.0, 2.5, 2.6), EvaluationSpec(patience=2)) is None


@pytest.mark.parametrize(
    ("step", "every", "saving", "stopping", "expected"),
    [
        (4, None, True, False, True),  # every checkpoint is evaluated
        (3, None, False, False, False),
        (6, 3, False, False, True),
        (10, None, False, False, True),  # the last step
        (4, 2, True, True, False),  # never on the SIGTERM checkpoint
    ],
)
def test_when_to_evaluate(step: int, every: int | None, saving: bool, stopping: bool, expected: bool) -> None:
    got = evaluation.should_evaluate(step, 10, every_steps=every, saving=saving, stop_requested=stopping)
    assert got is expected


def test_points_are_rebuilt_from_the_checkpoints_log_history() -> None:
    history = [
        {"eval_loss": 3.0, "step": 0, "eval_mean_token_accuracy": 0.1},
        {"loss": 2.9, "step": 1},
        {"eval_loss": 2.5, "step": 2},
    ]
    assert evaluation.points_from_history(history) == [EvalPoint(0, 3.0, 0.1), EvalPoint(2, 2.5)]


def test_token_accuracy_from_logits_shifts_and_masks() -> None:
    import torch

    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 0] = 1.0  # predicts 2, 3, 0 for positions 1..3
    labels = torch.tensor([[9, 2, 4, -100]])  # targets 2 (right), 4 (wrong), none
    buffer: dict[str, list[float]] = {"mean_token_accuracy": []}
    evaluation.record_accuracy(buffer, logits, labels)
    assert buffer["mean_token_accuracy"] == [0.5]


# -- metrics.jsonl and loss.png ---------------------------------------------------------------


def test_metrics_log_continues_from_a_checkpoint_and_marks_the_resume(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    first = curves.MetricsLog(tmp_path / "a" / "metrics.jsonl")
    first.start(None, None)
    for step in (1, 2, 3, 4):
        first.add({"kind": "train", "step": step, "loss": 5.0 - step})
    first.add({"kind": "eval", "step": 4, "evalLoss": 1.5})
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    first.copy_into(checkpoint)
    second = curves.MetricsLog(tmp_path / "b" / "metrics.jsonl", listeners=[seen.append])
    second.start(checkpoint, 3)  # steps after 3 were trained by the first pod and are lost
    lines = curves.read_records(second.path)
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("resume", 3),
    ]
    assert seen == [lines[-1]]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + '\n{"kind": "tr')
    assert curves.read_records(path) == [{"kind": "train", "step": 1}]


def test_the_plot_is_a_png_of_train_and_eval_loss(tmp_path: Path) -> None:
    records = [{"kind": "train", "step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)]
    records += [{"kind": "eval", "step": s, "evalLoss": 3.1 - 0.08 * s} for s in (0, 5, 10)]
    records.append({"kind": "resume", "step": 5})
    out = curves.plot(records, tmp_path / "loss.png", "tiny: loss against step")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# -- tracking payloads and sample lines --------------------------------------------------------


def test_tracked_metrics_and_params() -> None:
    record = {
        "kind": "train",
        "step": 3,
        "loss": 1.5,
        "learningRate": 1e-4,
        "gpuMemoryGiB": None,
        "time": "x",
    }
    assert tracking.metrics_of(record) == {"train/loss": 1.5, "train/learning_rate": 1e-4}
    assert tracking.metrics_of({"kind": "eval", "step": 4, "evalLoss": 2.0}) == {"eval/loss": 2.0}
    assert tracking.metrics_of({"kind": "resume", "step": 8}) == {"resumed_from_step": 8.0}
    params = tracking.flatten_params({"lora": {"r": 8, "targetModules": ["q_proj"]}, "p": "x" * 600})
    assert params["lora.r"] == "8" and params["lora.targetModules"] == '["q_proj"]'
    assert len(params["p"]) == tracking.PARAM_CHARS and params["p"].endswith("...")


def test_status_shows_first_lines_of_the_first_prompts() -> None:
    records = [
        {
            "prompt": f"q{i}\nmore",
            "before": "\n  base says\nsecond",
            "after": "x" * 300,
            "gguf": {"q8_0": "g"},
        }
        for i in range(5)
    ]
    lines = samples.status_lines(records)
    assert len(lines) == samples.STATUS_SAMPLES
    assert lines[0]["prompt"] == "q0" and lines[0]["before"] == "base says"
    assert len(lines[0]["after"]) == samples.STATUS_CHARS and lines[0]["gguf"] == {"q8_0": "g"}
    assert samples.first_line(None) is None
