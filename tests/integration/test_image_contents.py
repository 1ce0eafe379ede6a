"""Inside the built images (hack/images.sh; `make images`): the user they run as, what the operator
image leaves out, and what each trainer variant imports, each checked by running a program in the
image with `buildah run` (no registry, no daemon).

The operator and CPU trainer images are built by the module fixture (warm: seconds, from the layer
cache). The GPU trainer image costs minutes more and is not built here: `make images` builds it and
`make check-images` runs this module after; without it its tests skip, saying so.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
from e2e.test_images import image_tags
from localkube.images import REPO, buildah, local_image

pytestmark = [pytest.mark.slow, pytest.mark.images]

COMPILERS = ("gcc", "cc", "g++", "c++", "clang", "tcc", "make", "as", "ld")
PACKAGE_MANAGERS = ("apt", "apt-get", "dpkg", "dpkg-deb", "pip", "pip3", "uv", "conda", "easy_install")


@pytest.fixture(scope="module")
def tags() -> dict[str, str]:
    done = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "operator", "trainer-cpu"],
        check=False, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return image_tags()


def in_image(image: str, script: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """`sh -c script` in a fresh container of `image`, as the image's USER unless `user` is given."""
    name = f"contents-{uuid.uuid4().hex[:8]}"
    buildah("from", "--pull=never", "--name", name, image)
    try:
        argv = ["run", "--isolation", "chroot", "--network", "host"]
        if user:
            argv += ["--user", user]
        return buildah(*argv, name, "--", "sh", "-c", script, check=False, timeout=300)
    finally:
        buildah("rm", name, check=False)


def config_of(image: str) -> dict[str, Any]:
    found = local_image(image)
    assert found is not None, f"{image} not built"
    return found["config"]


def gpu_image(tags: dict[str, str]) -> str:
    image = tags["trainer-gpu"]
    if local_image(image) is None:
        pytest.skip(f"{image} not built: `make images` builds it, `make check-images` checks it")
    return image


@pytest.mark.parametrize(
    ("variant", "uid", "entrypoint"),
    [
        ("operator", 65532, ["python", "-m", "finetune_operator", "run"]),
        ("trainer-cpu", 1000, ["python", "-m", "finetune_trainer"]),
        ("trainer-gpu", 1000, ["python", "-m", "finetune_trainer"]),
    ],
)
def test_images_run_as_a_numeric_non_root_user(
    tags: dict[str, str], variant: str, uid: int, entrypoint: list[str]
) -> None:
    image = gpu_image(tags) if variant == "trainer-gpu" else tags[variant]
    config = config_of(image)
    assert config["User"] == f"{uid}:{uid}" and config["Entrypoint"] == entrypoint
    # A passwd entry too: kopf (getpwuid) and torch's caches look the user up and stop without one.
    home = "python -c 'import os, pwd; print(pwd.getpwuid(os.getuid()).pw_dir)'"
    done = in_image(image, f"id -u; id -g; {home}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == [str(uid), str(uid)]
    assert done.stdout.split()[2] == ("/tmp" if uid == 65532 else "/home/trainer")


def test_operator_image_has_no_compiler_or_package_manager(tags: dict[str, str]) -> None:
    names = " ".join((*COMPILERS, *PACKAGE_MANAGERS))
    versioned = "ls /usr/bin | grep -E '^(gcc|g\\+\\+|cc|cpp|x86_64-linux-gnu-)' || true"
    script = f"for c in {names}; do command -v $c; done; {versioned}"
    done = in_image(tags["operator"], script)
    assert done.stdout.strip() == "", f"found in the operator image:\n{done.stdout}"
    pip = in_image(tags["operator"], "python -m pip --version; python -m ensurepip --version")
    assert pip.returncode != 0 and "No module named" in pip.stderr, pip.stdout + pip.stderr


def test_operator_image_holds_the_operator_and_not_the_training_stack(tags: dict[str, str]) -> None:
    probe = (
        "import importlib, importlib.util, json, pkgutil, finetune_operator\n"
        "mods = [m.name for m in pkgutil.walk_packages(finetune_operator.__path__, 'finetune_operator.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "stack = ('torch', 'transformers', 'unsloth', 'trl', 'pytest')\n"
        "print(json.dumps(sorted(n for n in stack if importlib.util.find_spec(n))))\n"
    )
    done = in_image(tags["operator"], f'python -c "{probe}" && python -m finetune_operator --help')
    assert done.returncode == 0, done.stderr
    first, _, help_text = done.stdout.partition("\n")
    assert json.loads(first) == [], f"training stack in the operator image: {first}"
    assert "run" in help_text


TRAINER_PROBE = (
    "import importlib.metadata as md, importlib.util, json, os, pathlib\n"
    "import torch, trl, peft, bitsandbytes, llama_cpp, transformers, finetune_trainer.runner\n"
    "tools = pathlib.Path(os.environ['LLAMA_CPP_DIR'])\n"
    "spec = importlib.util.find_spec('unsloth')\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
    "  'quantize': hasattr(llama_cpp, 'llama_model_quantize'),\n"
    "  'converter': (tools / 'convert_hf_to_gguf.py').is_file() and (tools / 'gguf-py').is_dir(),\n"
    "  'unsloth': md.version('unsloth') if spec else None,\n"
    "  'unsloth_files': sorted(p.name for p in pathlib.Path(spec.origin).parent.iterdir())\n"
    "    if spec else []}))\n"
)


def trainer_facts(image: str) -> dict[str, Any]:
    done = in_image(image, f'python -c "{TRAINER_PROBE}"')
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_trainer_image_imports_the_training_stack_without_unsloth(tags: dict[str, str]) -> None:
    facts = trainer_facts(tags["trainer-cpu"])
    assert facts["quantize"] and facts["converter"], facts
    assert facts["unsloth"] is None, "Unsloth (GPU only) in the CPU image"


def test_gpu_trainer_image_imports_the_stack_and_carries_unsloth(tags: dict[str, str]) -> None:
    """`import unsloth` needs a GPU: its files and version are checked instead."""
    facts = trainer_facts(gpu_image(tags))
    assert facts["cuda"] and facts["cuda"].startswith("13"), facts
    assert facts["quantize"] and facts["converter"], facts
    assert facts["unsloth"] == "2026.10.9"
    assert {"__init__.py", "models", "kernels"} <= set(facts["unsloth_files"]), facts["unsloth_files"]


@pytest.mark.parametrize("variant", ["trainer-cpu", "trainer-gpu"])
def test_trainer_images_keep_the_compiler_triton_needs(tags: dict[str, str], variant: str) -> None:
    """Triton compiles a C launcher against Python.h at run time: gcc and the headers stay."""
    image = gpu_image(tags) if variant == "trainer-gpu" else tags[variant]
    header = "import os, sysconfig; print(os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h'))"
    done = in_image(image, f'command -v gcc && python -c "{header}"')
    assert done.returncode == 0 and done.stdout.split()[-1] == "True", done.stdout + done.stderr
