"""The two Dockerfiles, without a container engine: hadolint, the rules the images promise, and
the commands their build stages run, replayed in a clean virtualenv.

No Docker engine runs on the development machines, so an image is never built here. What can break
a build without an engine to notice is checked instead: a COPY source that .dockerignore drops, a
`uv export` that fails for the extras it names, a dependency set that cannot import the operator.
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


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comment lines dropped (as BuildKit does)."""
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
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) == 3 else None))
        else:
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


def replay(stage: Stage, root: Path, run_filter) -> dict[str, str]:
    """Run a build stage's WORKDIR/COPY/ENV/RUN steps on this machine under `root`.

    Absolute paths named in ENV (the virtualenv) are moved under `root`; uv's cache is left on and
    bytecode compilation off: both only change speed. Returns the final environment.
    """
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{Path(uv()).parent}:{env['PATH']}"
    cwd = root
    for keyword, args in stage.instructions:
        if keyword == "ENV":
            for key, value in env_of(Stage("", None, [(keyword, args)])).items():
                if key in ("UV_NO_CACHE", "UV_COMPILE_BYTECODE"):
                    continue
                expanded = value.replace("$PATH", env["PATH"]) if key == "PATH" else value
                env[key] = str(root) + expanded if expanded.startswith("/") else expanded
        elif keyword == "WORKDIR":
            cwd = root / args.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                target = cwd / dest / Path(source).name if dest.endswith("/") else cwd / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(REPO / source, target)
        elif keyword == "RUN" and run_filter(args):
            done = run(["bash", "-euo", "pipefail", "-c", args], cwd=cwd, env=env, timeout=600)
            assert done.returncode == 0, f"RUN {args}\n{done.stdout}\n{done.stderr}"
    return env


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
def test_bases_are_pinned_to_a_version(path):
    for stage in parse(path):
        tag = stage.base.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), stage.base


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


def test_operator_final_stage_is_slim_without_build_steps():
    """No compiler in the runtime image: a slim base (which ships none) and no RUN at all, only the
    virtualenv copied from the build stage."""
    build, final = parse(OPERATOR)
    assert final.base == build.base and final.base.split(":")[1].endswith(("-slim-bookworm", "-slim"))
    assert runs(final) == []
    assert [a for k, a in final.instructions if k == "COPY"] == ["--from=build /opt/venv /opt/venv"]


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


# ---- the build commands, replayed ---------------------------------------------------------------


def test_operator_build_stage_installs_a_venv_that_runs_the_operator(tmp_path):
    """Every RUN of the operator's build stage (except installing uv itself, which is the Makefile's
    pinned uv here) in a fresh tree holding only what the Dockerfile COPYs, then the result: the
    whole finetune_operator package imports, `-m finetune_operator` answers, and the training
    stack is absent."""
    build = parse(OPERATOR)[0]
    env = replay(build, tmp_path, run_filter=lambda cmd: "pip install --no-cache-dir" not in cmd)
    python = Path(env["VIRTUAL_ENV"]) / "bin" / "python"
    probe = (
        "import importlib, importlib.util, pkgutil, finetune_operator\n"
        "mods = [m.name for m in pkgutil.walk_packages(finetune_operator.__path__, 'finetune_operator.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "stack = ('torch', 'transformers', 'unsloth', 'trl')\n"
        "print(sorted(n for n in stack if importlib.util.find_spec(n)))\n"
    )
    clean_env = {"PATH": "/usr/bin:/bin"}
    done = run([python, "-c", probe], cwd=tmp_path, env=clean_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"training stack leaked into the operator image: {done.stdout}"
    cli = run([python, "-m", "finetune_operator", "--help"], cwd=tmp_path, env=clean_env, timeout=60)
    assert cli.returncode == 0 and "run" in cli.stdout, cli.stderr
    requirements = requirement_names(tmp_path / "src" / "requirements.txt")
    assert {"kopf", "kubernetes", "pydantic", "prometheus-client"} <= requirements
    assert "--hash=sha256:" in (tmp_path / "src" / "requirements.txt").read_text()


def test_trainer_export_pins_the_training_stack(tmp_path):
    """The trainer's `uv export` as written, without installing torch a second time."""
    build = parse(TRAINER)[0]
    replay(build, tmp_path, run_filter=lambda cmd: cmd.startswith("uv export"))
    requirements = tmp_path / "src" / "requirements.txt"
    names = requirement_names(requirements)
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
    assert requirements.read_text().count("--hash=sha256:") >= len(names), "unhashed requirements"


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
