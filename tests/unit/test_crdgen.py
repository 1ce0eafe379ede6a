"""The generated CRD: current, structural, described, bounded for CEL, and defaulting like the models."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import finetune_operator
import finetune_trainer
import pytest
import yaml
from finetune_operator import crdgen
from finetune_operator.api import IMMUTABLE_FIELDS, FineTuneJobSpec, FineTuneJobStatus

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    return yaml.safe_load((crdgen.REPO / "crds" / crdgen.CRD_FILE).read_text())


@pytest.fixture(scope="module")
def root(committed: dict[str, Any]) -> Schema:
    return committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def nodes(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (`.spec.lora.r`, `.spec.tolerations[]`, `.spec.nodeSelector{}`)."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from nodes(prop, f"{path}.{name}")
    if "items" in schema:
        yield from nodes(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], path + "{}")


def test_committed_files_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main(check=True, out=None) == 0, capsys.readouterr().out


def test_names_and_version(committed: dict[str, Any]) -> None:
    spec = committed["spec"]
    assert committed["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["all"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_every_property_is_described(root: Schema) -> None:
    undescribed = [
        f"{path}.{name}"
        for path, node in nodes(root)
        for name, prop in node.get("properties", {}).items()
        if path and not prop.get("description")  # apiVersion/kind/metadata are Kubernetes', not ours
    ]
    assert undescribed == []


def test_schema_is_structural(root: Schema) -> None:
    """What the API server calls structural, plus no JSON Schema leftovers from pydantic."""
    for path, node in nodes(root):
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if node.get("type") == "object" and path != ".metadata":  # the API server's own schema
            kinds = {
                "properties",
                "additionalProperties",
                "x-kubernetes-preserve-unknown-fields",
            } & node.keys()
            assert kinds, f"{path}: object with neither properties, additionalProperties nor preserve-unknown"
            assert kinds != {"properties", "additionalProperties"}, path
        if node.get("nullable"):
            assert "default" in node, f"{path}: nullable only where null differs from the default"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_preserve_unknown_fields_only_on_the_summary(root: Schema) -> None:
    preserved = [path for path, node in nodes(root) if node.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == [".status.summary"]


def test_spec_is_bounded_for_cel_cost(root: Schema) -> None:
    """CEL rules compare whole objects (spec immutability); the API server refuses a rule whose
    estimated cost is unbounded, so every string, list and map under spec has a size limit."""
    unbounded = [
        path
        for path, node in nodes(root["properties"]["spec"], ".spec")
        if (node.get("type") == "string" and "maxLength" not in node and "enum" not in node)
        or (node.get("type") == "array" and "maxItems" not in node)
        or (node.get("type") == "object" and "additionalProperties" in node and "maxProperties" not in node)
    ]
    assert unbounded == []


def test_cel_rules_name_existing_fields(root: Schema) -> None:
    """A renamed field would leave a CEL rule pointing at nothing; catch it before the API server."""
    for path, node in nodes(root):
        for rule in node.get("x-kubernetes-validations", []):
            if node.get("x-kubernetes-int-or-string") or "properties" not in node:
                continue  # a rule on a scalar or a map: `self` is the value, it names no field
            names = set(re.findall(r"(?:self|oldSelf)\.(\w+)", rule["rule"]))
            names |= {rule["fieldPath"].lstrip(".")} if "fieldPath" in rule else set()
            assert names <= node["properties"].keys(), (path, rule)


def test_training_spec_is_immutable_field_by_field(root: Schema) -> None:
    spec = root["properties"]["spec"]
    rules = {r["fieldPath"]: r["rule"] for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]}
    assert {k: v for k, v in rules.items() if k.lstrip(".") in IMMUTABLE_FIELDS} == {
        f".{name}": f"self.{name} == oldSelf.{name}"
        for name in ("model", "data", "template", "lora", "training")
    }
    # Every other field but suspend and activeDeadlineSeconds is immutable too, with a rule that
    # also holds for optional fields (set to unset is a change).
    fields = spec["properties"].keys()
    assert {k.lstrip(".") for k in rules} == set(fields) - {"suspend", "activeDeadlineSeconds"}
    assert rules[".image"].startswith("has(self.image) == has(oldSelf.image)")
    assert "spec" in root["required"]  # so oldSelf always exists on update


def test_batch_size_is_a_bounded_integer_and_the_split_an_enum(root: Schema) -> None:
    training = root["properties"]["spec"]["properties"]["training"]["properties"]
    assert training["batchSize"] | {"description": ""} == {
        "description": "",
        "type": "integer",
        "default": 2,
        "minimum": 1,
        "maximum": 4096,
    }
    assert training["microBatches"]["enum"] == ["auto", "literal"]
    assert training["microBatches"]["default"] == "auto"


def test_int_or_literal_becomes_int_or_string_with_a_rule() -> None:
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    class Knob(BaseModel):
        n: Annotated[int, Field(ge=1, le=9)] | Literal["auto"] = 2

    node = crdgen.object_schema(Knob)["properties"]["n"]
    assert node["x-kubernetes-int-or-string"] is True and "type" not in node
    (rule,) = node["x-kubernetes-validations"]
    assert rule["rule"] == "type(self) == int ? self >= 1 && self <= 9 : self in ['auto']"
    assert rule["message"] == "must be an integer from 1 to 9, or 'auto'"


def test_printer_columns_point_at_fields(committed: dict[str, Any], root: Schema) -> None:
    columns = committed["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"].upper() for c in columns if not c.get("priority")] == [
        "PHASE",
        "PROGRESS %",
        "LOSS",
        "EVAL LOSS",
        "PREEMPTIONS",
        "AGE",
    ]
    for column in columns:
        path, _, union = column["jsonPath"].partition("[")  # .spec.model['hub','s3','path']
        leaves = [p.strip("'") for p in union.rstrip("]").split(",")] if union else [None]
        for leaf in leaves:
            node = root
            parts = path.strip(".").split(".")[: -1 if column["type"] == "date" else None]
            for part in [*parts, *([leaf] if leaf else [])]:
                node = node["properties"][part]
            if column["type"] != "date":
                assert node["type"] in {column["type"], "number"}, column


def apply_defaults(schema: Schema, value: Any) -> Any:
    """What the API server does with `default`: fill absent properties, then recurse into them."""
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def test_defaults_match_the_models(root: Schema) -> None:
    """A minimal job defaulted by the API server equals the same job defaulted by pydantic."""
    minimal = {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "yahma/alpaca-cleaned"}}
    by_server = apply_defaults(root["properties"]["spec"], copy.deepcopy(minimal))
    by_model = FineTuneJobSpec.model_validate(minimal).model_dump(
        by_alias=True, mode="json", exclude_none=True
    )
    assert by_server == by_model

    with_push = {**minimal, "export": {"push": {"repo": "me/x", "tokenSecretRef": {"name": "h", "key": "t"}}}}
    by_server = apply_defaults(root["properties"]["spec"], copy.deepcopy(with_push))
    assert by_server["export"]["push"]["private"] is True

    status = apply_defaults(root["properties"]["status"], {})
    assert status == FineTuneJobStatus().model_dump(by_alias=True, mode="json", exclude_none=True)


def test_docs_list_every_spec_field() -> None:
    docs = (crdgen.REPO / "docs" / crdgen.DOCS_FILE).read_text()
    assert docs.startswith(f"<!-- {crdgen.HEADER} -->")
    for name in FineTuneJobSpec.model_fields:
        alias = FineTuneJobSpec.model_fields[name].alias or name
        assert f"| `{alias}` |" in docs
    assert "| `r` | integer | `16` | >= 1, <= 1024 | Rank of the low-rank update. |" in docs


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    sources = [Path(m.__file__).resolve().parents[1] for m in (finetune_operator, finetune_trainer)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, sources))}
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator", "crds", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )


def test_cli_check_names_the_drifted_file(tmp_path: Path) -> None:
    assert run_cli("--out", str(tmp_path)).returncode == 0
    crd_file, docs_file = tmp_path / crdgen.CRD_FILE, tmp_path / crdgen.DOCS_FILE
    assert crd_file.read_text() == (crdgen.REPO / "crds" / crdgen.CRD_FILE).read_text()
    assert run_cli("--check", "--out", str(tmp_path)).returncode == 0

    crd_file.write_text(crd_file.read_text().replace("Rank of the low-rank update.", "Rank."))
    stale = run_cli("--check", "--out", str(tmp_path))
    assert stale.returncode == 1
    assert str(crd_file) in stale.stderr and str(docs_file) not in stale.stderr
    assert "-                        Rank.\n" in stale.stdout
    assert "+                        Rank of the low-rank update.\n" in stale.stdout

    docs_file.unlink()
    assert str(docs_file) in run_cli("--check", "--out", str(tmp_path)).stderr
