"""Test-wide setup: tests/ on sys.path (for localkube and the shared helpers) and the localkube
pytest plugin (fixtures `cluster` and `s3`) and trainer_fixtures (tiny model and data)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["localkube.plugin", "trainer_fixtures"]
