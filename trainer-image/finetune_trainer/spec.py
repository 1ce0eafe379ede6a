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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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
# pydantic's Rust regex disagree on what \w matches beyond ASCII.
_HUB_ID = r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?$"
_ONE_SOURCE = "[has(self.hub), has(self.s3), has(self.path)].filter(x, x).size() == 1"


class ModelSource(Spec):
    """The base model to fine-tune: exactly one of a hub id, an S3 prefix or a local path."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel(_ONE_SOURCE, "set exactly one of hub, s3, path"))
    )

    hub: str | None = Field(default=None, min_length=1, max_length=256, pattern=_HUB_ID)
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


class DataSource(Spec):
    """The training data: exactly one of a hub data set, an S3 object or a local file."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel(_ONE_SOURCE, "set exactly one of hub, s3, path"))
    )

    hub: str | None = Field(default=None, min_length=1, max_length=256, pattern=_HUB_ID)
    """Data set id on a hub, for example `FreedomIntelligence/medical-o1-reasoning-SFT`."""
    s3: str | None = Field(
        default=None, max_length=1024, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/.+$"
    )
    """S3 object with the rows, `s3://bucket/key.jsonl`."""
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    """Local file with the rows."""
    config: str | None = Field(default=None, max_length=128)
    """Hub data set configuration (subset), for example `en` or `zh`."""
    split: str = Field(default="train", max_length=128, pattern=r"^[A-Za-z0-9_\-]+(\[[0-9%: \-]*\])?$")
    """Split with optional slice, as the `datasets` library reads it: `train`, `train[0:500]`,
    `train[:10%]`."""
    format: DataFormat = "auto"
    """File format for s3/path sources; `auto` picks it from the file extension."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a hub token, for gated or private data sets."""

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
        return self


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
    random_state: int = Field(default=3407, ge=0)
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
    seed: int = Field(default=3407, ge=0)
    """Seed for data order and dropout."""
    packing: bool = False
    """Pack several rows into each max-length sequence (fewer padding tokens)."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm; 0 disables clipping."""
    logging_steps: int = Field(default=1, ge=1)
    """Log loss and learning rate every this many steps."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision; `auto` is bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""

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


class SampleSpec(Spec):
    """Prompts answered by the base model before training and the fine-tuned model after."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=8192)]] = Field(
        default_factory=list, max_length=32
    )
    """Prompts, rendered through the job's template without an answer."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Tokens generated per answer (greedy decoding)."""


class TrackingSpec(Spec):
    """Optional experiment tracking."""

    type: Literal["none", "wandb"] = "none"
    """Tracker to report to."""
    project: str | None = Field(default=None, max_length=128)
    """Project name in the tracker."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the tracker's API key."""


class StorageSpec(Spec):
    """Where checkpoints and artifacts go. On the cluster the operator fills unset fields from its
    defaults and appends `<namespace>/<name>/` to the prefix."""

    uri: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*|file://.*)$",
    )
    """`s3://bucket/prefix` or a local folder (a workstation run)."""
    endpoint: str | None = Field(default=None, max_length=512, pattern=r"^https?://.+")
    """S3 endpoint for S3-compatible servers (MinIO, Ceph, R2); AWS when unset."""
    region: str | None = Field(default=None, max_length=64)
    """S3 region."""


class TrainingSpec(Spec):
    """Everything the trainer needs: `python -m finetune_trainer run job.yaml` reads this part."""

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
    samples: SampleSpec = Field(default_factory=SampleSpec)
    """Before/after sample answers."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Experiment tracking."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Checkpoint and artifact storage."""
