"""Reading a job file: a whole FineTuneJob manifest (what goes to the cluster) or its bare spec.

The trainer validates only the training part (`TrainingSpec`). The fields that only Kubernetes
needs are accepted and dropped here, so the very same job.yaml runs on a workstation; a test keeps
the lists below equal to what `finetune_operator.api` adds. Keys are read as the API server reads
them, camelCase only; an unknown one is refused with the closest valid names, which the API server
cannot give.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import API_GROUP, API_VERSION, KIND, StorageSpec, TrainingSpec

KUBERNETES_ONLY_FIELDS = frozenset(
    {
        "image",
        "resources",
        "nodeSelector",
        "tolerations",
        "priorityClassName",
        "queueName",
        "workloadPriorityClassName",
        "suspend",
        "activeDeadlineSeconds",
        "backoffLimit",
        "serviceAccountName",
    }
)
"""Top-level spec fields the operator reads and the trainer ignores."""

KUBERNETES_ONLY_STORAGE_FIELDS = frozenset({"credentialsSecret", "deleteOnJobDeletion"})
"""spec.storage fields the operator reads and the trainer ignores."""

MANIFEST_FIELDS = ["apiVersion", "kind", "metadata", "spec", "status"]
"""Top-level keys of a manifest; any other is refused, as the API server does."""

_DROPPED: dict[type[BaseModel], frozenset[str]] = {
    TrainingSpec: KUBERNETES_ONLY_FIELDS,
    StorageSpec: KUBERNETES_ONLY_STORAGE_FIELDS,
}
"""Keys the CRD accepts that the trainer drops, by the model beside which they are written."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAMED = re.compile(r"^([A-Za-z][\w.]*): (.+)$", re.DOTALL)


@dataclass(frozen=True)
class Job:
    """A loaded job: the training spec and, for a manifest, its metadata name and namespace."""

    spec: TrainingSpec
    name: str | None = None
    namespace: str | None = None


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem becomes a ConfigError naming the field."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError("job", f"cannot read {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("job", f"{path} is not valid YAML: {e}") from None
    return parse_job(doc)


def parse_job(doc: Any) -> Job:
    """Validate a parsed job document (manifest or bare spec)."""
    if not isinstance(doc, dict):
        raise ConfigError(
            "job", f"expected a FineTuneJob manifest or its spec (a mapping), got {type(doc).__name__}"
        )
    name = namespace = None
    if "kind" in doc or "apiVersion" in doc or "spec" in doc:
        expected_api = f"{API_GROUP}/{API_VERSION}"
        if doc.get("apiVersion") != expected_api:
            raise ConfigError("apiVersion", f"expected {expected_api}, got {doc.get('apiVersion')!r}")
        if doc.get("kind") != KIND:
            raise ConfigError("kind", f"expected {KIND}, got {doc.get('kind')!r}")
        unknown = [str(k) for k in doc if k not in MANIFEST_FIELDS]
        if unknown:
            raise ConfigError(unknown[0], "unknown field" + unknown_key_hint(unknown[0], MANIFEST_FIELDS))
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ConfigError("metadata", "expected a mapping")
        name, namespace = metadata.get("name"), metadata.get("namespace")
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise ConfigError("spec", "expected a mapping with at least model and data")
    else:
        spec = doc
    try:
        # by_name=False: camelCase only, as the API server's schema reads the file; snake_case
        # keys are refused here too, so a workstation run and a cluster run of one file agree.
        training = TrainingSpec.model_validate(training_part(spec), by_alias=True, by_name=False)
    except ValidationError as e:
        raise config_error(e, prefix="spec") from None
    return Job(spec=training, name=name, namespace=namespace)


def training_part(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without the Kubernetes-only fields (a new dict; the input is not changed)."""
    out = {k: v for k, v in spec.items() if k not in KUBERNETES_ONLY_FIELDS}
    storage = out.get("storage")
    if isinstance(storage, dict):
        out["storage"] = {k: v for k, v in storage.items() if k not in KUBERNETES_ONLY_STORAGE_FIELDS}
    return out


def field_path(loc: tuple[int | str, ...], prefix: str) -> str:
    """`('lora', 'r')` -> `spec.lora.r`; list indices as `[i]`; pydantic's union-member tags dropped."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.match(part) and part not in ("int", "str", "float", "bool"):
            path += f".{part}"
    return path


def config_error(error: ValidationError, prefix: str) -> ConfigError:
    """The first validation problem as a ConfigError; the others are listed in its message."""
    problems = [_problem(e, prefix) for e in error.errors()]
    field, message = problems[0]
    if len(problems) > 1:
        others = "; ".join(f"{f}: {m}" for f, m in problems[1:])
        message += f" (also {others})"
    return ConfigError(field, message)


def _problem(error: Any, prefix: str) -> tuple[str, str]:
    """(field path, message). Model validators word their messages `template.format: ...`; that
    names the field more precisely than pydantic's location, so it is used when it extends it."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        return field_path(loc, prefix), "unknown field" + _closest_hint(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    named = _NAMED.match(message)
    if loc and named and named.group(1).split(".")[0] == loc[-1]:
        return field_path(loc[:-1], prefix) + "." + named.group(1), named.group(2)
    return field_path(loc, prefix), message


def _closest_hint(loc: tuple[int | str, ...]) -> str:
    """The hint for an unknown key at `loc`: the keys the object that holds it accepts (its
    model's camelCase names, plus the Kubernetes-only ones the trainer drops), or '' when that
    object is not a model."""
    model: Any = TrainingSpec
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return ""
        model = _model_of(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    return unknown_key_hint(str(loc[-1]), names + sorted(_DROPPED.get(model, ())))


def unknown_key_hint(key: str, allowed: list[str]) -> str:
    """`; did you mean X?` with the closest of `allowed` (difflib), or the list of `allowed` when
    none is close. A snake_case key is compared in camelCase, so `max_seq_len` finds maxSeqLength."""
    camel = to_camel(key) if "_" in key else key
    if camel in allowed:
        return f"; did you mean {camel}? (keys are camelCase, as in the CRD)"
    close = difflib.get_close_matches(camel, allowed, n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    return f"; valid fields are {', '.join(allowed)}"


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `X | None` or `list[X]`, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
