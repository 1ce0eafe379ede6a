"""Test-wide setup: tests/ on sys.path (for localkube and the shared helpers) and the localkube
pytest plugin (fixtures `cluster` and `s3`) and trainer_fixtures (tiny model and data)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["localkube.plugin", "trainer_fixtures"]


IMAGE_TESTS = "FINETUNE_IMAGE_TESTS"
"""Set to 1 by `make check-images`: the tests marked `images` build the operator and CPU trainer
images (about 14 minutes cold on 2 cores, 7.4 GB for the CPU trainer) and run them. `make test`
leaves them out, so CI's cold run stays within its time; they are skipped with this reason."""


def pytest_collection_modifyitems(config: object, items: list[pytest.Item]) -> None:
    if os.environ.get(IMAGE_TESTS) == "1":
        return
    skip = pytest.mark.skip(reason=f"builds the images: `make check-images` ({IMAGE_TESTS}=1) runs it")
    for item in items:
        if "images" in item.keywords:
            item.add_marker(skip)
