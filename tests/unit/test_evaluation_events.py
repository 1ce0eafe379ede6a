"""The Events a status write calls for about the eval loss (events.evaluation_events)."""

from __future__ import annotations

from datetime import UTC, datetime

from finetune_operator.events import evaluation_events

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
FTJ = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {"evaluation": {"patience": 2}}}


def progress(best: float | None, best_step: int | None, since: int, loss: float, step: int) -> dict:
    return {
        "progress": {
            "bestEvalLoss": best,
            "bestEvalStep": best_step,
            "evalsSinceBest": since,
            "evalLoss": loss,
            "evalStep": step,
        }
    }


def reasons(old: dict, patch: dict) -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in evaluation_events(FTJ, old, patch, NOW)]


def test_improvement_and_worsening_are_announced_once() -> None:
    assert reasons({}, progress(2.0, 0, 0, 2.0, 0)) == [("Normal", "EvalLossImproved")]
    assert reasons(progress(2.0, 0, 0, 2.0, 0), progress(1.5, 4, 0, 1.5, 4)) == [
        ("Normal", "EvalLossImproved")
    ]
    assert reasons(progress(1.5, 4, 0, 1.5, 4), progress(1.5, 4, 1, 1.7, 8)) == []
    assert reasons(progress(1.5, 4, 1, 1.7, 8), progress(1.5, 4, 2, 1.8, 12)) == [
        ("Warning", "EvalLossWorsening")
    ]
    assert reasons(progress(1.5, 4, 2, 1.8, 12), progress(1.5, 4, 3, 1.9, 16)) == []  # the same streak
    # A patch without progress (a phase change alone) announces nothing.
    assert reasons(progress(1.5, 4, 3, 1.9, 16), {"phase": "Succeeded"}) == []


def test_messages_say_what_changed() -> None:
    [improved] = evaluation_events(FTJ, progress(2.0, 0, 0, 2.0, 0), progress(1.5, 4, 0, 1.5, 4), NOW)
    assert improved["message"] == "eval loss 1.5000 at step 4, the best so far (was 2.0000 at step 0)"
    assert improved["involvedObject"]["kind"] == "FineTuneJob" and improved["involvedObject"]["uid"] == "u"
    [worse] = evaluation_events(FTJ, progress(1.5, 4, 1, 1.7, 8), progress(1.5, 4, 2, 1.8, 12), NOW)
    assert (
        "has not improved for 2 evaluations" in worse["message"]
        and "now 1.8000 at step 12" in worse["message"]
    )
