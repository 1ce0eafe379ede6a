"""Operator configuration: defaults that run the demo, limits, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_operator.config import ConfigFileError, OperatorConfig, load_config


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_OPERATOR_CONFIG", raising=False)
    cfg = load_config()
    assert cfg == OperatorConfig()
    assert cfg.report_token_expiration_seconds >= 600  # the TokenRequest API's minimum
    assert cfg.model_source_allowed("anything/at-all")


def test_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "defaultImage: reg/trainer:2\nmaxGpusPerJob: 2\nallowedModelSources: ['unsloth/', 's3://models/']\n"
        "storage: {uri: 's3://ckpt', credentialsSecret: s3}\nports: {metrics: 9100}\n"
    )
    monkeypatch.setenv("FINETUNE_OPERATOR_CONFIG", str(path))
    cfg = load_config()
    assert (cfg.default_image, cfg.max_gpus_per_job, cfg.ports.metrics) == ("reg/trainer:2", 2, 9100)
    assert cfg.model_source_allowed("unsloth/Qwen3-8B") and cfg.model_source_allowed("s3://models/x/")
    assert not cfg.model_source_allowed("s3://other/unsloth/")  # anchored at the start


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("maxGpusPerJob: -1\n", "maxGpusPerJob"),
        ("allowedModelSources: ['([']\n", "allowedModelSources"),
        ("ports: {health: 70000}\n", "ports.health"),
        ("defaultImag: typo\n", "defaultImag"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=key.replace(".", r"\.")):
        load_config(path)
