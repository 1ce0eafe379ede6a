"""The Argo CD health check, run the way Argo CD runs its built-in ones: every case of
health_test.yaml through a real Lua 5.1 interpreter (Argo CD embeds gopher-lua, a Lua 5.1), with the
object converted as Argo CD converts it (every number a float) and only the libraries it opens."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import lupa  # a real Lua runtime (dev group); Argo CD's own tests run these cases in gopher-lua
import pytest
import yaml
from finetune_operator.api import FineTuneJob, Phase

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "deploy" / "argocd" / "resource_customizations" / "finetune.dev" / "FineTuneJob"
CASES = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def lua_runtime():
    """Lua 5.1 like gopher-lua; without os/io/loaders, which Argo CD's sandbox does not offer."""
    try:
        from lupa import lua51

        runtime = lua51.LuaRuntime()
    except ImportError:  # a lupa built without the bundled 5.1: the script is 5.1-compatible anyway
        runtime = lupa.LuaRuntime()
    runtime.execute("os = nil; io = nil; require = nil; dofile = nil; loadfile = nil; package = nil")
    return runtime


def to_lua(runtime, value):
    """Argo CD hands the object to Lua through JSON: maps and lists become tables, numbers float64."""
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value


def health(obj: dict) -> dict:
    runtime = lua_runtime()
    script = (CHECK / "health.lua").read_text()
    check = runtime.eval(f"function(obj)\n{script}\nend")
    result = check(to_lua(runtime, obj))
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_case(case):
    obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    assert health(obj) == case["healthStatus"]


def test_every_phase_has_a_case_and_maps_to_argo_status():
    """A phase added to the API without a health case fails here."""
    phases = set(typing.get_args(Phase))
    seen = {}
    for case in CASES:
        obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
        seen.setdefault((obj.get("status") or {}).get("phase"), set()).add(case["healthStatus"]["status"])
    assert phases <= set(seen), phases - set(seen)
    assert seen["Succeeded"] == {"Healthy"}
    assert seen["Failed"] == {"Degraded"}
    assert seen["Suspended"] == {"Suspended"}
    assert seen["Pending"] == seen["Running"] == {"Progressing"}
    assert set().union(*seen.values()) <= ARGO_STATUSES


def test_unknown_phase_is_unknown_not_healthy():
    obj = yaml.safe_load((CHECK / "testdata" / "running.yaml").read_text())
    obj["status"]["phase"] = "Exploded"
    assert health(obj)["status"] == "Unknown"


@pytest.mark.parametrize("path", sorted((CHECK / "testdata").glob("*.yaml")), ids=lambda p: p.stem)
def test_testdata_are_valid_finetunejobs(path):
    """The cases are objects the API could hold: spec and status parse with the real models."""
    obj = yaml.safe_load(path.read_text())
    FineTuneJob.model_validate(obj)
    assert {c["inputPath"] for c in CASES} >= {f"testdata/{path.name}"}, "testdata file without a case"


def test_docs_argocd_cm_snippet_is_the_script():
    """docs/gitops.md's argocd-cm block carries health.lua verbatim, so a copy-paste installs it."""
    docs = (REPO / "docs" / "gitops.md").read_text()
    key = "resource.customizations.health.finetune.dev_FineTuneJob: |"
    block = docs[docs.index(key) + len(key) :].split("```", 1)[0]
    lines = block.split("\n")[1:]
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    snippet = "\n".join(line[indent:] for line in lines).strip()
    assert snippet == (CHECK / "health.lua").read_text().strip()
    assert re.search(r"^kind: ConfigMap$", docs, re.M) and "name: argocd-cm" in docs
