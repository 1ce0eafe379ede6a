"""The training half of a FineTuneJob: every knob the trainer reads, defined once.

The operator's `FineTuneJob` spec embeds these models and the CRD's OpenAPI schema is generated
from them, so the descriptions below are what `kubectl explain ftj.spec...` prints. Field names are
camelCase on the wire (Kubernetes API conventions) and snake_case in Python.

Defaults are the values of the Unsloth tutorials the project grew from (DESIGN.md), so a minimal job
names only a model and a data set. Rules that a JSON schema cannot express are attached as CEL
(`x-kubernetes-validations`) and checked again in Python by the same model validators, so the
trainer on a workstation refuses exactly what the API server refuses.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "finetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

GgufQuantization = Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL validation rule for the CRD (`x-kubernetes-validations`).

    `field_path` (for example `.format`) makes the API server report the error on that child field
    instead of on the object the rule is attached to.
    """
    rule_ = {"rule": rule, "message": message}
    if field_path is not None:
        rule_["fieldPath"] = field_path
    return rule_


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules; the CRD generator copies them into the schema."""
    return {"x-kubernetes-validations": list(rules)}


class Spec(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


def _exactly_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        names = ", ".join(to_camel(f) for f in fields)
        raise ValueError(f"{what}: set exactly one of {names} (got {len(given)})")


class SecretKeyRef(Spec):
    """A key in a Secret of the job's namespace. The value never appears in logs, events or status."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret."""


# A hub id, `name` or `owner/name`. ASCII classes rather than \w: the API server's Go regexp and
# pydantic's Rust regex disagree on what \w matches beyond ASCII. Neither has lookahead, so `.` and
# `..` as a segment (a path out of the hub's cache) are refused by a CEL rule and `_hub_id`.
_HUB_ID = r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?$"
_HUB_SEGMENTS = "!self.split('/').exists(s, s == '.' || s == '..')"
_HUB_SEGMENTS_MESSAGE = "a hub id is `name` or `owner/name`; `.` and `..` are not names"
MAX_SEED = 2**32 - 1
"""numpy's and torch's seeds are 32-bit."""


def hub_id_problem(value: str | None) -> str | None:
    """Why `value` is not a hub id (beyond the pattern), or None."""
    if value is not None and any(part in (".", "..") for part in value.split("/")):
        return _HUB_SEGMENTS_MESSAGE
    return None


def _hub_id(value: str | None) -> str | None:
    problem = hub_id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


HubId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        pattern=_HUB_ID,
        json_schema_extra=validations(cel(_HUB_SEGMENTS, _HUB_SEGMENTS_MESSAGE)),
    ),
    AfterValidator(_hub_id),
]
_ONE_SOURCE = "[has(self.hub), has(self.s3), has(self.path)].filter(x, x).size() == 1"


class ModelSource(Spec):
    """The base model to fine-tune: exactly one of a hub id, an S3 prefix or a local path."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel(_ONE_SOURCE, "set exactly one of hub, s3, path"))
    )

    hub: HubId | None = None
    """Model id on a Hugging Face-compatible hub, for example `unsloth/Qwen3-8B`."""
    s3: str | None = Field(
        default=None, max_length=1024, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
    )
    """S3 prefix holding a saved model folder (config.json, weights, tokenizer), `s3://bucket/prefix/`."""
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    """Local folder holding a saved model (a volume in the pod, or a workstation path)."""
    revision: str | None = Field(default=None, max_length=256)
    """Hub revision (branch, tag or commit) to pin; the default branch when unset."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a hub token, for gated or private models."""
    max_seq_length: int = Field(default=2048, ge=64, le=131072)
    """Longest training sequence in tokens; longer rows are truncated (preflight reports how many)."""
    load_in_4bit: bool = True
    """Load the base weights quantized to 4-bit NF4 (QLoRA). Off trains LoRA on 16-bit weights."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: it runs arbitrary code in the trainer."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        _exactly_one(self, ("hub", "s3", "path"), "model")
        return self


DataFormat = Literal["auto", "json", "jsonl", "parquet", "csv"]
_SPLIT = r"^[A-Za-z0-9_\-]+(\[ *(-?[0-9]+%?)? *: *(-?[0-9]+%?)? *\])?$"
"""A split with an optional slice as `datasets` reads it: `train`, `train[10:20]`, `train[:10%]`,
`train[-100:]`; one colon, no step (`train[::-1]`), never empty brackets."""
_DATA_S3 = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/.+$"


class ValidationSource(Spec):
    """Rows the model is evaluated on and never trained on: exactly one of a held-out fraction of the
    training rows, a hub split, an S3 object or a local file. A source of its own is read in the
    same formats and rendered through the same template as the training data (a hub source uses
    spec.data.tokenSecretRef)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "[has(self.fraction), has(self.hub), has(self.s3), has(self.path)].filter(x, x).size() == 1",
                "set exactly one of fraction, hub, s3, path",
            )
        )
    )

    fraction: float | None = Field(default=None, gt=0, le=0.5)
    """Hold out this share of the training rows (more than 0, at most 0.5), picked with `seed`; they
    are removed from training, so the two sets never overlap."""
    hub: HubId | None = None
    """Data set id on a hub."""
    s3: str | None = Field(default=None, max_length=1024, pattern=_DATA_S3)
    """S3 object with the rows, `s3://bucket/key.jsonl`."""
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    """Local file with the rows."""
    config: str | None = Field(default=None, max_length=128)
    """Hub data set configuration (subset)."""
    split: str = Field(default="validation", max_length=128, pattern=_SPLIT)
    """Split with optional slice for hub, s3 and path sources, for example `validation` or
    `train[-200:]`."""
    format: DataFormat = "auto"
    """File format for s3/path sources; `auto` picks it from the file extension."""
    seed: int = Field(default=3407, ge=0, le=MAX_SEED)
    """Seed that picks the held-out rows of `fraction` and the rows evaluated under `maxRows`."""
    max_rows: int = Field(default=256, ge=1, le=100000)
    """Rows evaluated at most per evaluation: the cost bound (a fixed sample, the same every time)."""

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSource:
        _exactly_one(self, ("fraction", "hub", "s3", "path"), "data.validation")
        return self

    @property
    def source_field(self) -> str:
        """The spec field naming where the rows come from (for error messages)."""
        name = next(f for f in ("fraction", "hub", "s3", "path") if getattr(self, f) is not None)
        return f"spec.data.validation.{name}"


class DataSource(Spec):
    """The training data: exactly one of a hub data set, an S3 object or a local file."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel(_ONE_SOURCE, "set exactly one of hub, s3, path"))
    )

    hub: HubId | None = None
    """Data set id on a hub, for example `FreedomIntelligence/medical-o1-reasoning-SFT`."""
    s3: str | None = Field(default=None, max_length=1024, pattern=_DATA_S3)
    """S3 object with the rows, `s3://bucket/key.jsonl`."""
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    """Local file with the rows."""
    config: str | None = Field(default=None, max_length=128)
    """Hub data set configuration (subset), for example `en` or `zh`."""
    split: str = Field(default="train", max_length=128, pattern=_SPLIT)
    """Split with optional slice, as the `datasets` library reads it: `train`, `train[0:500]`,
    `train[:10%]`."""
    format: DataFormat = "auto"
    """File format for s3/path sources; `auto` picks it from the file extension."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a hub token, for gated or private data sets."""
    incomplete_rows: Literal["fail", "skip"] = "fail"
    """Rows whose cell is missing or null in a column the template reads (the alpaca template's
    optional `input` aside), here and in the validation rows. `fail`: preflight refuses the data,
    naming the column, the first rows (1-based) and how many there are. `skip`: train without them
    (preflight reports how many)."""
    max_truncated_fraction: float = Field(default=0.1, ge=0, le=1)
    """Largest share of the training rows that may be longer than spec.model.maxSeqLength: such a
    row loses its end (for most templates the answer and the end-of-sequence token). Preflight
    and run fail above it and warn above 1%; 1 turns the check off."""
    validation: ValidationSource | None = None
    """Validation data for evaluation loss and token accuracy (spec.evaluation says when); none when
    unset."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        _exactly_one(self, ("hub", "s3", "path"), "data")
        return self


TemplateType = Literal["alpaca", "r1-reasoning", "chat", "custom"]


class PromptTemplate(Spec):
    """How a data row becomes training text.

    `alpaca`: instruction / input / output. `r1-reasoning`: Question / Complex_CoT / Response with the
    chain of thought in a `<think>` block. `chat`: a list of messages through the tokenizer's chat
    template. `custom`: `format` with `{placeholders}` filled from the columns named in `fields`.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.type != 'custom' || has(self.format)", "type custom needs format", ".format"),
            cel(
                "self.type == 'custom' || !has(self.format)",
                "format is only used with type custom",
                ".format",
            ),
        )
    )

    type: TemplateType = "alpaca"
    """Template family."""
    format: str | None = Field(default=None, min_length=1, max_length=16384)
    """Python format string for type `custom`, for example `### Q: {question}\\n### A: {answer}`."""
    fields: dict[str, Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=dict, max_length=32
    )
    """Placeholder -> data column. For the built-in templates it renames the expected columns, for
    example `{instruction: prompt}` reads the `prompt` column as the instruction."""
    system_prompt: str | None = Field(default=None, max_length=16384)
    """Preamble placed before every example (alpaca, r1-reasoning) or as the system message (chat)."""
    add_eos: bool = True
    """Append the tokenizer's end-of-sequence token, so the model learns to stop."""

    @model_validator(mode="after")
    def _custom_needs_format(self) -> PromptTemplate:
        if self.type == "custom" and self.format is None:
            raise ValueError("template.format: type custom needs a format string")
        if self.type != "custom" and self.format is not None:
            raise ValueError("template.format: only used with type custom")
        if self.format is not None:
            names = format_placeholders(self.format)
            unknown = sorted(set(self.fields) - set(names))
            if unknown:
                raise ValueError(
                    f"template.fields: {', '.join(unknown)} is not a placeholder of the format; "
                    f"its placeholders are {', '.join(names)}"
                )
        return self


def format_placeholders(fmt: str) -> list[str]:
    """Named placeholders of a custom format string, in order of first use; ValueError (naming
    spec.template.format) when braces do not balance or a placeholder is not a plain name."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise ValueError(
            f"template.format: not a valid format string: {e} (write a literal brace as {{{{ or }}}})"
        ) from None
    for _text, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"template.format: placeholder {{{name}}}: expected a plain name such as {{question}} "
                "(no positions, indexes or attributes)"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("template.format: expected at least one {placeholder}")
    return names


class LoraSpec(Spec):
    """LoRA adapter shape (PEFT)."""

    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the low-rank update."""
    alpha: int = Field(default=16, ge=1, le=4096)
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input. 0 lets Unsloth use its fast path."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1, max_length=64
    )
    """Module names that get adapters (all attention and MLP projections by default)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (scale alpha / sqrt(r))."""
    use_loftq: bool = False
    """Initialise the adapter with LoftQ to offset 4-bit quantization error."""
    gradient_checkpointing: Literal["auto", "unsloth", "true", "false"] = "auto"
    """Activation checkpointing (memory for time; the same maths either way). `auto`: on CUDA each
    micro-batch keeps the activations of as many layers as fit the GPU's memory and recomputes the
    rest with Unsloth's offloaded checkpointing; plain checkpointing on the CPU. `unsloth`: every
    layer recomputed, activations offloaded to host memory (the tutorials' setting); `true`: plain
    checkpointing of every layer; `false`: none."""
    random_state: int = Field(default=3407, ge=0, le=MAX_SEED)
    """Seed for the adapter's initial weights."""


class TrainingArgs(Spec):
    """Optimisation knobs (TRL SFTTrainer). Set at most one of maxSteps and epochs (60 steps if neither)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!(has(self.maxSteps) && has(self.epochs))", "set only one of maxSteps and epochs"),
        )
    )

    batch_size: int = Field(default=2, ge=1, le=4096)
    """Rows per device per micro-batch as the recipe states it. Rows per optimizer step =
    batchSize x gradientAccumulationSteps x GPUs; with `microBatches: auto` the trainer may run
    those rows in fewer, larger micro-batches (the same rows, the same loss)."""
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=4096)
    """Micro-batches per optimizer step as the recipe states it (see batchSize)."""
    micro_batches: Literal["auto", "literal"] = "auto"
    """How each optimizer step's batchSize x gradientAccumulationSteps rows are executed. `auto`:
    in the fewest micro-batches whose rows fit the GPU's memory with a margin; the loss is
    normalised over all tokens of the step, so the steps, their rows and their losses are the
    recipe's (equal to `literal` within bf16 rounding). The split chosen and why are in the log and
    in status. `literal`: exactly gradientAccumulationSteps micro-batches of batchSize rows (for
    debugging and comparisons)."""
    warmup_steps: int = Field(default=5, ge=0)
    """Linear warm-up steps of the learning rate."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run. Exclusive with epochs; 60 when neither is set."""
    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the data. Exclusive with maxSteps."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    optimizer: Literal[
        "adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
    ] = "adamw_8bit"
    """Optimizer (transformers' `optim` names)."""
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    """Decoupled weight decay."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = (
        "linear"
    )
    """Learning-rate schedule after warm-up."""
    seed: int = Field(default=3407, ge=0, le=MAX_SEED)
    """Seed for data order and dropout (0 to 2^32-1)."""
    packing: bool = False
    """Pack several rows into each max-length sequence (fewer padding tokens)."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm; 0 disables clipping."""
    logging_steps: int = Field(default=1, ge=1)
    """Log loss and learning rate every this many steps."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision; `auto` is bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    max_non_finite_steps: int = Field(default=3, ge=1, le=10000)
    """Optimizer steps in a row whose loss may be NaN or infinite before the trainer stops with
    a configuration error (the run diverged: retrying computes the same). Such steps are never
    checkpointed; status.progress.diverged shows the first one."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingArgs:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("training: set only one of maxSteps and epochs")
        return self

    @property
    def resolved_max_steps(self) -> int | None:
        """maxSteps, or the tutorials' 60 when neither maxSteps nor epochs is set."""
        if self.max_steps is None and self.epochs is None:
            return 60
        return self.max_steps


class CheckpointPolicy(Spec):
    """When checkpoints are written and how many are kept. A checkpoint is complete only once its
    manifest (files, sizes, sha256, step, config fingerprint) is stored, after every file."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.everySteps) && self.everySteps > 0)"
                " || (has(self.everyMinutes) && self.everyMinutes > 0)",
                "set everySteps, everyMinutes or both to more than 0",
            ),
        )
    )

    every_steps: int | None = Field(default=20, ge=0)
    """Checkpoint every this many optimizer steps; 0 (or null) turns step-based checkpoints off."""
    every_minutes: float | None = Field(default=15.0, ge=0, le=1440)
    """Checkpoint when this many minutes have passed since the last one; 0 (or null) turns timed
    checkpoints off."""
    keep_last: int = Field(default=2, ge=1, le=100)
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    grace_period_seconds: int = Field(default=120, ge=10, le=3600)
    """Time from SIGTERM to exit: the trainer finishes the step, checkpoints and uploads within it.
    The operator sets the pod's terminationGracePeriodSeconds a little above this."""

    @field_validator("every_steps", "every_minutes")
    @classmethod
    def _zero_is_off(cls, value: float | None) -> float | None:
        # 0 is how a manifest says "off": `kubectl apply` treats null as "remove the field", and the
        # API server then fills the default back in. In Python "off" is None either way.
        return value or None

    @model_validator(mode="after")
    def _some_trigger(self) -> CheckpointPolicy:
        if self.every_steps is None and self.every_minutes is None:
            raise ValueError("checkpoint: set everySteps, everyMinutes or both to more than 0")
        return self


class EvaluationSpec(Spec):
    """When the model is evaluated on spec.data.validation, and what follows from the results.

    Evaluation runs before the first step, at every checkpoint (so each checkpoint carries its eval
    loss), every `everySteps` steps when set, and at the end; never on the SIGTERM checkpoint (the
    grace period is for saving). `patience` evaluations in a row without an improvement of more
    than `minDelta` over the best eval loss raise an EvalLossWorsening event, and with
    `earlyStopping` end training (the job Succeeds, saying why)."""

    every_steps: int | None = Field(default=None, ge=0)
    """Also evaluate every this many optimizer steps; 0 (or null) evaluates only before training, at
    checkpoints and at the end."""
    patience: int = Field(default=3, ge=1, le=1000)
    """Evaluations in a row without improvement that count as getting worse."""
    min_delta: float = Field(default=0.0, ge=0)
    """Smallest drop of the eval loss below the best so far that counts as an improvement."""
    early_stopping: bool = False
    """Stop training (and export) once the eval loss has not improved for `patience` evaluations."""

    @field_validator("every_steps")
    @classmethod
    def _zero_is_off(cls, value: int | None) -> int | None:
        return value or None


class HubPush(Spec):
    """Push the exported artifacts to a model hub (off unless set)."""

    repo: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
    """Target repository, `owner/name`."""
    token_secret_ref: SecretKeyRef
    """Secret key holding a write token."""
    private: bool = True
    """Create the repository private."""


class ExportSpec(Spec):
    """What the trainer produces after training. The LoRA adapter is always saved."""

    merged_16bit: bool = False
    """Also save the base model with the adapter merged, in 16-bit safetensors."""
    gguf: list[GgufQuantization] = Field(default_factory=lambda: ["q8_0"], max_length=6)
    """GGUF files to build with llama.cpp's converter and quantizer (f16, bf16 and q8_0 written
    straight from the base and the adapter, the k-quants quantized from an f16 GGUF); empty for none."""
    verify_tokens: int = Field(default=16, ge=0, le=256)
    """Tokens of the merged model's greedy answer to each sample prompt (or to `Hello`) that every
    GGUF is checked on in llama.cpp before it is stored: the log-probabilities the GGUF gives them
    must differ from the merged model's by at most a tolerance on average (0.01 nats for f16, 0.05
    for q8_0, 0.25 for q4_k_m; docs/export.md); 0 skips the check."""
    push: HubPush | None = None
    """Optional push to a model hub."""
    from_checkpoint: Literal["last", "best"] = "last"
    """Which weights to export: `last` (the end of training) or `best`, the checkpoint with the
    lowest eval loss (needs spec.data.validation; the best checkpoint is kept beyond keepLast)."""


class SampleSpec(Spec):
    """Prompts answered by the base model before training and the fine-tuned model after."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=8192)]] = Field(
        default_factory=list, max_length=32
    )
    """Prompts, rendered through the job's template without an answer."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Tokens generated per answer (greedy decoding)."""


_TRACKING_URI = r"^(https?://[^/@\s]+(/\S*)?|file:///\S*)$"


class TrackingSpec(Spec):
    """Experiment tracking: one run per job, continued across preemptions, with the spec as
    parameters, per-step training and evaluation metrics, and the artifacts' URIs. Credentials come
    only from Secrets; a URI carries none. Tracking problems are logged and never stop training."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.type != 'mlflow' || has(self.uri)", "type mlflow needs uri", ".uri"),
            cel(
                "self.type == 'mlflow' || (!has(self.usernameSecretRef) && !has(self.passwordSecretRef))",
                "usernameSecretRef and passwordSecretRef are for type mlflow",
            ),
        )
    )

    type: Literal["none", "mlflow", "wandb"] = "none"
    """Tracker to report to."""
    uri: str | None = Field(default=None, max_length=1024, pattern=_TRACKING_URI)
    """MLflow: the tracking server, `https://mlflow.example.com` (required). W&B: a self-hosted
    server's base URL (W&B's cloud when unset). Without user:password@: use the Secret refs."""
    project: str | None = Field(default=None, min_length=1, max_length=128)
    """W&B project, MLflow experiment; `finetune-operator` when unset."""
    run_name: str | None = Field(default=None, min_length=1, max_length=256)
    """Run name; `<namespace>/<name>` of the job (its name on a workstation) when unset."""
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    """W&B entity (user or team); the API key's default when unset."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the W&B API key (WANDB_API_KEY) or an MLflow bearer token
    (MLFLOW_TRACKING_TOKEN). W&B without a key runs offline: the run is stored with the
    artifacts under tracking/wandb/ for `wandb sync`."""
    username_secret_ref: SecretKeyRef | None = None
    """MLflow basic auth: Secret key holding the user name (MLFLOW_TRACKING_USERNAME)."""
    password_secret_ref: SecretKeyRef | None = None
    """MLflow basic auth: Secret key holding the password (MLFLOW_TRACKING_PASSWORD)."""

    @model_validator(mode="after")
    def _needs(self) -> TrackingSpec:
        if self.type == "mlflow" and self.uri is None:
            raise ValueError("tracking.uri: type mlflow needs the tracking server's uri")
        if self.type != "mlflow" and (self.username_secret_ref or self.password_secret_ref):
            raise ValueError("tracking: usernameSecretRef and passwordSecretRef are for type mlflow")
        return self


_STORAGE_URI = "^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|/.*|file://.*)$"
_STORAGE_URI_MESSAGE = (
    "use s3://bucket/prefix (a bucket of 3 to 63 lowercase letters, digits, dots or hyphens) or an"
    " absolute path (/data/out or file:///data/out); a relative path"
    " such as ./out means a different folder on every machine"
)


def _storage_uri(value: str) -> str:
    if not re.match(_STORAGE_URI, value):
        raise ValueError(_STORAGE_URI_MESSAGE)
    return value


# The rule is CEL rather than a `pattern`, so kubectl apply says what to write instead of printing
# the regular expression; the trainer gives the same message.
StorageUri = Annotated[
    str,
    Field(
        max_length=1024,
        json_schema_extra=validations(cel(f"self.matches('{_STORAGE_URI}')", _STORAGE_URI_MESSAGE)),
    ),
    AfterValidator(_storage_uri),
]


class StorageSpec(Spec):
    """Where checkpoints and artifacts go. On the cluster the operator fills unset fields from its
    defaults and appends `<namespace>/<name>/` to the prefix."""

    uri: StorageUri | None = None
    """`s3://bucket/prefix` or a local folder (a workstation run)."""
    endpoint: str | None = Field(default=None, max_length=512, pattern=r"^https?://.+")
    """S3 endpoint for S3-compatible servers (MinIO, Ceph, R2); AWS when unset."""
    region: str | None = Field(default=None, max_length=64)
    """S3 region."""


TRAINING_RULES = (
    cel(
        "!self.evaluation.earlyStopping || has(self.data.validation)",
        "evaluation.earlyStopping needs data.validation",
        ".evaluation",
    ),
    cel(
        "self.export.fromCheckpoint != 'best' || has(self.data.validation)",
        "export.fromCheckpoint best needs data.validation (best is by eval loss)",
        ".export",
    ),
)
"""Rules across sections of the training spec (the FineTuneJob spec carries them too)."""


class TrainingSpec(Spec):
    """Everything the trainer needs: `python -m finetune_trainer run job.yaml` reads this part."""

    model_config = ConfigDict(json_schema_extra=validations(*TRAINING_RULES))

    model: ModelSource
    """Base model."""
    data: DataSource
    """Training data."""
    template: PromptTemplate = Field(default_factory=PromptTemplate)
    """How rows become text."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter shape."""
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    """Optimisation knobs."""
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    """Checkpoint policy."""
    export: ExportSpec = Field(default_factory=ExportSpec)
    """Artifacts to produce."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Evaluation schedule, worsening events and early stopping (with data.validation)."""
    samples: SampleSpec = Field(default_factory=SampleSpec)
    """Before/after sample answers."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Experiment tracking."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Checkpoint and artifact storage."""

    @model_validator(mode="after")
    def _evaluation_needs_validation(self) -> TrainingSpec:
        if self.data.validation is None:
            if self.evaluation.early_stopping:
                raise ValueError("evaluation.earlyStopping needs data.validation")
            if self.export.from_checkpoint == "best":
                raise ValueError("export.fromCheckpoint best needs data.validation (best is by eval loss)")
        return self
