"""What crosses the boundary between the trainer and the operator, as one typed model per message.

`ProgressReport` is the body of the trainer's progress POST (report.py builds it, the operator's
progress endpoint validates it with the same model). Validation is strict: a JSON `true` is not a
step, a string is not totalSteps, NaN and Infinity are not numbers, a step lies within
0..totalSteps and within what a JSON number holds exactly, strings are bounded, and a report may
not be dated later than the receiver's clock plus `MAX_CLOCK_SKEW` (a report dated 9999-12-31
would otherwise make every later real report look stale). A report that fails is refused whole
before it touches anything.

Unknown fields are ignored rather than refused: a newer trainer image may report more than an
older operator knows, and a report is never stored as sent (status copies only the fields below).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

MAX_CLOCK_SKEW = timedelta(minutes=5)
"""How far in the future (by the receiver's clock) a report may be dated."""
MAX_COUNT = 2**53 - 1
"""Largest step, token count or sequence: integers beyond it do not survive JSON exactly."""
MAX_FIGURE = 1e15
"""Largest loss, rate or duration taken for a measurement rather than a fault."""
HISTORY_LIMIT = 10
SAMPLES_LIMIT = 3
TEXT_LIMIT = 1024
SAMPLE_CHARS = 200

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Figure = Annotated[float, Field(ge=-MAX_FIGURE, le=MAX_FIGURE, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, le=MAX_FIGURE, allow_inf_nan=False)]
Text = Annotated[str, StringConstraints(max_length=TEXT_LIMIT)]
SampleText = Annotated[str, StringConstraints(max_length=SAMPLE_CHARS)]
PhaseName = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z]{0,31}$")]
Time = Annotated[str, StringConstraints(max_length=64)]


class Wire(BaseModel):
    """camelCase on the wire, strict types, unknown fields ignored (see the module docstring)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, strict=True, extra="ignore", frozen=True
    )


class ReportedCheckpoint(Wire):
    """The newest complete checkpoint."""

    uri: Text
    step: Count
    time: Time | None = None
    upload_seconds: NonNegative | None = None


class CheckpointEntry(Wire):
    """A kept checkpoint with its losses (checkpoints.history_entry)."""

    step: Count
    uri: Text
    train_loss: Figure | None = None
    eval_loss: Figure | None = None
    time: Time | None = None


class SampleLines(Wire):
    """The first lines of one sample prompt's answers (samples.status_lines)."""

    prompt: SampleText | None = None
    before: SampleText | None = None
    after: SampleText | None = None
    gguf: Annotated[
        dict[Annotated[str, StringConstraints(max_length=16)], SampleText | None], Field(max_length=6)
    ] = Field(default_factory=dict)


class JobRef(Wire):
    name: Annotated[str, StringConstraints(max_length=253)] | None = None
    namespace: Annotated[str, StringConstraints(max_length=63)] | None = None


class ProgressReport(Wire):
    """One progress report. `loss` is null and `diverged` true when the latest loss was NaN or
    infinite (the trainer stops after spec.training.maxNonFiniteSteps such steps in a row)."""

    phase: PhaseName = "Starting"
    total_steps: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    step: Count = 0
    percent: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    loss: Figure | None = None
    diverged: bool = False
    learning_rate: NonNegative | None = None
    tokens_per_second: NonNegative | None = None
    eta_seconds: NonNegative | None = None
    gpu_memory_gib: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = Field(
        default=None, alias="gpuMemoryGiB"
    )
    tokens: Count = 0
    checkpoint: ReportedCheckpoint | None = None
    checkpoint_failures: Count = 0
    resumed_from_step: Count | None = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    batch_plan: Annotated[str, StringConstraints(max_length=512)] | None = None
    eval_loss: Figure | None = None
    eval_token_accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    eval_step: Count | None = None
    evals_since_best: Count | None = None
    best_eval_loss: Figure | None = None
    best_eval_step: Count | None = None
    checkpoints: Annotated[list[CheckpointEntry], Field(max_length=HISTORY_LIMIT)] | None = None
    best_checkpoint: CheckpointEntry | None = None
    samples: Annotated[list[SampleLines], Field(max_length=SAMPLES_LIMIT)] | None = None
    job: JobRef | None = None
    sequence: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    reported_at: AwareDatetime

    @field_validator("reported_at")
    @classmethod
    def _not_in_the_future(cls, value: datetime, info: ValidationInfo) -> datetime:
        now = (info.context or {}).get("now")
        if isinstance(now, datetime) and value > now + MAX_CLOCK_SKEW:
            raise ValueError(
                f"is {value.isoformat()}, later than the receiver's clock ({now.isoformat()}) "
                f"plus {int(MAX_CLOCK_SKEW.total_seconds())}s: the sender's clock is wrong"
            )
        return value

    @field_validator("step")
    @classmethod
    def _step_within_total(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("total_steps")
        if total is not None and value > total:
            raise ValueError(f"step {value} is beyond totalSteps {total}")
        return value

    def wire(self) -> dict[str, Any]:
        """The report as a plain JSON-ready dict (camelCase, reportedAt as RFC 3339 with Z)."""
        out = self.model_dump(by_alias=True, mode="json")
        out["reportedAt"] = self.reported_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return out


class ReportError(ValueError):
    """A report that fails validation: the first failing field (camelCase path) and why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _first_error(error: ValidationError) -> ReportError:
    first = error.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    return ReportError(field, first["msg"])


def parse_report(body: bytes | str, now: datetime) -> ProgressReport:
    """A report from its JSON body, validated against `now`; ReportError names the field."""
    try:
        return ProgressReport.model_validate_json(body, context={"now": now})
    except ValidationError as e:
        raise _first_error(e) from None


def finite(value: Any) -> Any:
    """`value`, or None when it is a float that is NaN or infinite."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def build_report(
    snapshot: dict[str, Any], sequence: int, job: dict[str, str | None], now: datetime
) -> ProgressReport:
    """The report of a progress snapshot (progress.ProgressState.snapshot): a NaN or infinite loss
    becomes null with `diverged` set; any other non-finite figure becomes null (a measurement
    that failed, not a value). Raises ReportError if the snapshot breaks the contract anyway."""
    doc = {k: finite(v) for k, v in snapshot.items()}
    doc["diverged"] = bool(snapshot.get("diverged")) or (
        snapshot.get("loss") is not None and doc.get("loss") is None
    )
    doc |= {
        "job": job,
        "sequence": sequence,
        "reportedAt": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    # Through JSON, as the operator reads it: the trainer sends only what the operator accepts.
    return parse_report(json.dumps(doc, allow_nan=False), now)
