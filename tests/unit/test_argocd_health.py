"""The Argo CD health check in Argo CD's own Lua engine (hack/consumers/argocd-health: gopher-lua
opened as Argo CD v3.5's util/lua opens it, the object converted as Argo CD converts it), for both
ways of installing it: as a built-in check (standard libraries open) and as docs/gitops.md installs
it, the `argocd-cm` key, where `useOpenLibs` is off and `string` and `math` are not loaded."""

from __future__ import annotations

import json
import subprocess
import typing
from pathlib import Path

import consumers
import pytest
import yaml
from finetune_operator.api import FineTuneJob, Phase

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "deploy" / "argocd" / "resource_customizations"
CHECK = BUILTIN / "finetune.dev" / "FineTuneJob"
CASES = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
INSTALLS = ("built-in", "argocd-cm")


def docs_argocd_cm() -> dict:
    """The argocd-cm ConfigMap of docs/gitops.md, as a platform team would apply it."""
    docs = (REPO / "docs" / "gitops.md").read_text()
    blocks = [b.split("```", 1)[0] for b in docs.split("```yaml\n")[1:]]
    (cm,) = [yaml.safe_load(b) for b in blocks if "name: argocd-cm" in b]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "argocd"
    return cm


def argo_health(objects: list[dict], install: str, tmp_path: Path) -> list[dict]:
    """Argo CD's verdict per object: {status, message}, or {error} where the script failed."""
    args = [consumers.binary("argocd-health"), "-builtin", str(BUILTIN)]
    if install == "argocd-cm":  # and no built-in to fall back on
        data = tmp_path / "argocd-cm.json"
        data.write_text(json.dumps(docs_argocd_cm()["data"]))
        args = [args[0], "-builtin", str(tmp_path), "-cm", str(data)]
    done = subprocess.run(args, input=json.dumps(objects), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def health(obj: dict, install: str, tmp_path: Path) -> dict:
    return argo_health([obj], install, tmp_path)[0]


@pytest.mark.parametrize("install", INSTALLS)
def test_every_case(install, tmp_path):
    """health_test.yaml, the file Argo CD's own test runs for a built-in check, case by case."""
    objects = [yaml.safe_load((CHECK / c["inputPath"]).read_text()) for c in CASES]
    got = argo_health(objects, install, tmp_path)
    for case, result in zip(CASES, got, strict=True):
        assert result == case["healthStatus"], case["inputPath"]


def test_docs_install_only_the_health_key():
    """No `useOpenLibs` key: the check must work in the sandbox Argo CD gives argocd-cm scripts."""
    data = docs_argocd_cm()["data"]
    assert set(data) == {"resource.customizations.health.finetune.dev_FineTuneJob"}


def test_a_script_needing_the_string_library_fails_in_argocd_cm(tmp_path):
    """The engine really closes the libraries there: what the check looked like before, fails."""
    obj = yaml.safe_load((CHECK / "testdata" / "stale-generation.yaml").read_text())
    data = tmp_path / "cm.json"
    script = 'return {status = "Progressing", message = string.format("%d", obj.metadata.generation)}'
    data.write_text(json.dumps({"resource.customizations.health.finetune.dev_FineTuneJob": script}))
    run = [consumers.binary("argocd-health"), "-builtin", str(BUILTIN), "-cm", str(data)]
    (result,) = json.loads(
        subprocess.run(run, input=json.dumps([obj]), capture_output=True, text=True, check=True).stdout
    )
    assert "attempt to index a non-table object(nil) with key 'format'" in result["error"]


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
    assert seen["Pending"] == seen["Running"] == seen["Queued"] == seen["Preempted"] == {"Progressing"}
    assert set().union(*seen.values()) <= ARGO_STATUSES


@pytest.mark.parametrize("install", INSTALLS)
def test_unknown_phase_is_unknown_not_healthy(install, tmp_path):
    obj = yaml.safe_load((CHECK / "testdata" / "running.yaml").read_text())
    obj["status"]["phase"] = "Exploded"
    assert health(obj, install, tmp_path) == {"status": "Unknown", "message": "Unknown phase Exploded"}


@pytest.mark.parametrize("install", INSTALLS)
@pytest.mark.parametrize(
    ("loss", "text"),
    [(1.23456, "1.2346"), (0.00004, "0.0000"), (2.0, "2.0000"), (12.5, "12.5000"), (-0.5, "-0.5000")],
)
def test_loss_is_printed_with_four_decimals(install, loss, text, tmp_path):
    """string.format("%.4f") by arithmetic, since argocd-cm's scripts run without `string`."""
    obj = yaml.safe_load((CHECK / "testdata" / "running.yaml").read_text())
    obj["status"]["progress"]["loss"] = loss
    assert health(obj, install, tmp_path)["message"] == f"step 30/60 (50%), loss {text}, ETA 4m"


@pytest.mark.parametrize("path", sorted((CHECK / "testdata").glob("*.yaml")), ids=lambda p: p.stem)
def test_testdata_are_valid_finetunejobs(path):
    """The cases are objects the API could hold: spec and status parse with the real models."""
    obj = yaml.safe_load(path.read_text())
    FineTuneJob.model_validate(obj)
    assert {c["inputPath"] for c in CASES} >= {f"testdata/{path.name}"}, "testdata file without a case"


def test_docs_argocd_cm_snippet_is_the_script():
    """docs/gitops.md's argocd-cm block carries health.lua verbatim, so a copy-paste installs it."""
    script = docs_argocd_cm()["data"]["resource.customizations.health.finetune.dev_FineTuneJob"]
    assert script.strip() == (CHECK / "health.lua").read_text().strip()
