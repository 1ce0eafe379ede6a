"""Fixtures shared by every test module."""

from trainer_fixtures import alpaca_jsonl, r1_jsonl, tiny_model_dir  # noqa: F401  (registers the fixtures)
