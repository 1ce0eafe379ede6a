"""The two Dockerfiles as text: hadolint, the rules the images promise, and the trainer's `uv export`
replayed. What the built images hold and how they run is tested on the images themselves
(tests/integration/test_image_contents.py, tests/e2e/test_images.py); these checks are the quick ones
that need no image build: a COPY source that .dockerignore drops, an unpinned base, a layer order
that would rebuild the dependencies for a code change.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "Dockerfile"
TRAINER = REPO / "trainer-image" / "Dockerfile"
CACHE = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def global_args(path: Path) -> dict[str, str]:
    """ARGs before the first FROM, with their defaults (what `FROM ${BASE}` resolves to)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("FROM "):
            break
        if line.startswith("ARG ") and "=" in line:
            key, _, value = line[4:].partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comment lines dropped (as BuildKit does);
    a base named by a global ARG is that ARG's default."""
    args = global_args(path)
    stages: list[Stage] = []
    logical, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args_ = args
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args_[m.group(1)], words[0])
            stages.append(Stage(base=base, name=words[2] if len(words) == 3 else None))
        elif stages:  # global ARGs (before the first FROM) are read by global_args()
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage.instructions:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def runs(stage: Stage) -> list[str]:
    return [args for keyword, args in stage.instructions if keyword == "RUN"]


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from another stage)."""
    out = []
    for stage in parse(path):
        for keyword, args in stage.instructions:
            words = args.split()
            if keyword == "COPY" and not any(w.startswith("--from=") for w in words):
                out.append((words[:-1], words[-1]))
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans folders, `*` and `?` stay inside one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def dockerignore_allows(relpath: str) -> bool:
    """BuildKit's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            allowed = negate
    return allowed


def uv() -> str:
    """The uv the Makefile installs (same version as the images'), or UV from the environment."""
    version = env_of(parse(OPERATOR)[0])["UV_VERSION"]
    for candidate in (os.environ.get("UV"), CACHE / f"uv-{version}" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            found = run([str(candidate), "--version"])
            if found.returncode == 0 and found.stdout.split()[1] == version:
                return str(candidate)
    pytest.fail(f"uv {version} not found: run `make venv` (it installs it under {CACHE}) or set UV")


def run(argv, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)


def requirement_names(requirements: Path) -> set[str]:
    names = set()
    for line in requirements.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if match:
            names.add(match.group(1).lower().replace("_", "-"))
    return names


# ---- lint -------------------------------------------------------------------------------------


def test_hadolint_passes_both_dockerfiles():
    done = run([REPO / "hack" / "hadolint.sh"], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path):
    """The lint really lints: an unpinned base and a root apt-get layer are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    done = run([REPO / "hack" / "hadolint.sh", bad], timeout=300)
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # untagged base image
    assert "DL3015" in done.stdout  # --no-install-recommends missing


# ---- what the images promise --------------------------------------------------------------------


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_bases_are_pinned_to_a_version_and_a_build_argument(path):
    """The base is the build argument BASE (hack/images.sh passes its local Debian), whose default
    is a registry's Debian pinned to a point release."""
    assert re.fullmatch(r"docker\.io/library/debian:12\.\d+-slim", global_args(path)["BASE"])
    for stage in parse(path):
        if stage.base == "scratch":
            continue
        tag = stage.base.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), stage.base
    assert "FROM ${BASE}" in path.read_text()


@pytest.mark.parametrize(
    ("path", "entrypoint"),
    [
        (OPERATOR, ["python", "-m", "finetune_operator", "run"]),
        (TRAINER, ["python", "-m", "finetune_trainer"]),
    ],
    ids=["operator", "trainer"],
)
def test_final_stage_runs_the_entrypoint_as_a_numeric_non_root_user(path, entrypoint):
    final = parse(path)[-1]
    users = [args for keyword, args in final.instructions if keyword == "USER"]
    assert users, "final stage never leaves root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit())
    entrypoints = [args for keyword, args in final.instructions if keyword == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [entrypoint]


def test_operator_final_stage_copies_the_venv_then_the_code_and_drops_the_package_managers():
    """The runtime stage: Debian's python3, apt purged and dpkg's programs deleted, then the
    dependencies' virtualenv, then the code as the last layer (a code change rebuilds only it)."""
    stages = parse(OPERATOR)
    final = stages[-1]
    [install] = runs(final)
    assert "apt-get install" in install and "dpkg --purge" in install and "/usr/bin/dpkg*" in install
    assert "build-essential" not in install and "gcc" not in install
    copied = [a for k, a in final.instructions if k == "COPY"]
    assert copied == ["--from=build /opt/venv /opt/venv", "--from=code /app /opt/app"]
    code = next(s for s in stages if s.name == "code")
    assert code.base == "scratch" and all(k == "COPY" for k, _ in code.instructions)


def test_trainer_layers_put_the_lock_before_the_code_and_the_code_last():
    """Lock-dependent work after the rarely changing layers, the code in one last layer; the
    variant's extras are a build argument declared just before the one layer they change."""
    [stage] = parse(TRAINER)
    kinds = [(k, a) for k, a in stage.instructions if k in ("COPY", "RUN", "ARG")]
    copies_ = [a for k, a in kinds if k == "COPY"]
    assert copies_[-1] == "trainer-image/finetune_trainer /opt/app/finetune_trainer"
    assert copies_[-2] == "pyproject.toml uv.lock README.md ./"
    position = {a: i for i, (_, a) in enumerate(kinds)}
    extras = next(i for i, (k, a) in enumerate(kinds) if k == "ARG" and a.startswith("EXTRAS="))
    assert position["pyproject.toml uv.lock README.md ./"] < extras
    assert kinds[extras + 1][0] == "RUN" and "$EXTRAS" in kinds[extras + 1][1]
    assert kinds[-1][0] == "COPY"


def test_uv_in_the_images_is_the_makefiles():
    make = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    for path in (OPERATOR, TRAINER):
        assert env_of(parse(path)[0])["UV_VERSION"] == make, path


def test_every_copy_source_exists_and_passes_dockerignore():
    for path in (OPERATOR, TRAINER):
        for sources, _ in copies(path):
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file"
                assert dockerignore_allows(source), f"{path.name}: COPY {source} is dropped by .dockerignore"
    for private in (".venv/bin/python", ".git/config", "tests/unit/test_dockerfiles.py", "crds/x.yaml"):
        assert not dockerignore_allows(private), private
    assert not dockerignore_allows("operator/finetune_operator/__pycache__/api.cpython-311.pyc")


# ---- the trainer's export, replayed ---------------------------------------------------------------


def variant_extras() -> dict[str, list[str]]:
    """EXTRAS of each trainer variant, as hack/images.sh passes them."""
    text = (REPO / "hack" / "images.sh").read_text()
    found = re.findall(r"build (trainer-\w+) .*?--build-arg \"EXTRAS=([^\"]+)\"", text, re.S)
    return {variant: extras.split() for variant, extras in found}


def export_for(extras: list[str], tmp_path: Path) -> Path:
    """The trainer's `uv export` command as its Dockerfile writes it, for `extras`, run on a copy of
    what the Dockerfile COPYs."""
    [stage] = parse(TRAINER)
    [step] = [a for a in runs(stage) if "uv export" in a]
    [command] = [c for c in re.sub(r"^(--mount=\S+\s+)+", "", step).split(" && ") if "uv export" in c]
    command = command.replace("/opt/uv/bin/uv", uv()).replace(
        "$(printf -- '--extra %s ' $EXTRAS)", " ".join(f"--extra {e}" for e in extras)
    )
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO / name, tmp_path / name)
    done = run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    return tmp_path / "requirements.txt"


def test_trainer_export_pins_the_training_stack(tmp_path):
    """Each variant's `uv export` as written, without installing torch: the GPU one has Unsloth, the
    CPU one has everything else and not Unsloth; neither has the operator or the dev tools."""
    extras = variant_extras()
    assert set(extras) == {"trainer-gpu", "trainer-cpu"}
    gpu = export_for(extras["trainer-gpu"], tmp_path)
    names = requirement_names(gpu)
    wanted = {
        "torch",
        "unsloth",
        "unsloth-zoo",
        "trl",
        "peft",
        "bitsandbytes",
        "transformers",
        "llama-cpp-python",
        "gguf",
        "matplotlib",  # loss.png
        "mlflow-skinny",  # tracking: the client only
        "wandb",
    }
    assert wanted <= names, wanted - names
    assert "mlflow" not in names, "the MLflow server (dev only) leaked into the trainer image"
    assert "kopf" not in names, "the operator extra leaked into the trainer image"
    assert "pytest" not in names, "dev dependencies leaked into the trainer image"
    assert gpu.read_text().count("--hash=sha256:") >= len(names), "unhashed requirements"
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    cpu = requirement_names(export_for(extras["trainer-cpu"], cpu_dir))
    assert wanted - {"unsloth", "unsloth-zoo"} <= cpu and not {"unsloth", "unsloth-zoo"} & cpu


def test_trainer_entrypoint_module_exists():
    assert importlib.util.find_spec("finetune_trainer.__main__") is not None


def test_trainer_image_matches_what_the_operator_and_the_export_expect():
    """The trainer's UID is the pod's runAsUser the operator sets, and LLAMA_CPP_DIR is where
    hack/llama-tools.sh puts the converter for the llama-cpp-python version it pins."""
    from finetune_operator.config import OperatorConfig

    final = parse(TRAINER)[-1]
    uid = [args for keyword, args in final.instructions if keyword == "USER"][-1].split(":")[0]
    assert int(uid) == OperatorConfig().run_as_user
    tools = (REPO / "hack" / "llama-tools.sh").read_text()
    version = re.search(r"^LLAMA_CPP_PYTHON_VERSION=(\S+)$", tools, re.M)
    assert env_of(final)["LLAMA_CPP_DIR"] == f"/opt/llama.cpp-{version.group(1)}"
    assert f'"llama-cpp-python=={version.group(1)}"' in (REPO / "pyproject.toml").read_text()


def test_the_charts_defaults_name_the_images_this_repository_builds():
    """values.yaml's operator image (its tag: appVersion), config.defaultImage and the operator's
    own default trainer are what `make images` tags (the GPU trainer is the default trainer)."""
    import yaml
    from finetune_operator.config import OperatorConfig

    done = run([REPO / "hack" / "images.sh", "tags"], timeout=60)
    assert done.returncode == 0, done.stderr
    tags = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    chart = REPO / "charts" / "finetune-operator"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    app_version = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    assert values["image"]["tag"] == ""  # the appVersion, by the chart's helper
    assert f"{values['image']['repository']}:{app_version}" == tags["operator"]
    assert values["config"]["defaultImage"] == tags["trainer-gpu"] == OperatorConfig().default_image
    assert tags["trainer-cpu"] == f"{tags['trainer-gpu']}-cpu"
