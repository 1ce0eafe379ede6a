"""The 4-bit weight cache's decisions (weight_cache.py) on the CPU: what its key depends on, what a
download accepts, and the state fingerprint that guards a cached load. The CUDA load itself is
tests/gpu's (test_cached_4bit_weights_are_the_quantized_ones)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from finetune_trainer import weight_cache
from finetune_trainer.storage import LocalStore

QUANT = {"type": "nf4", "double": True, "compute": "torch.bfloat16"}


def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    return folder


def test_key_follows_the_weights_files_and_settings(tmp_path: Path) -> None:
    folder = model_dir(tmp_path)
    key = weight_cache.cache_key("/m", None, folder, QUANT)
    assert key == weight_cache.cache_key("/m", None, folder, QUANT)
    assert key != weight_cache.cache_key("/m", "v2", folder, QUANT)
    assert key != weight_cache.cache_key("/m", None, folder, {**QUANT, "double": False})
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert key != weight_cache.cache_key("/m", None, folder, QUANT)  # same size, rewritten


def publish(store: LocalStore, folder: Path, key: str) -> None:
    publisher = weight_cache.Publisher(store, key, folder, stop=None)
    publisher._upload()
    assert publisher.uploaded


def test_fetch_takes_only_a_complete_and_intact_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    assert weight_cache.fetch(store, "k1", tmp_path / "dl") is None  # nothing stored
    publish(store, folder, "k1")
    got = weight_cache.fetch(store, "k1", tmp_path / "dl")
    assert got is not None and (got / "model-00001-of-00001.safetensors").read_bytes() == b"weights"

    # an upload cut short: files without SHA256SUMS are not a cache
    store.put_file("cache/base-4bit/k2/config.json", folder / "config.json")
    assert weight_cache.fetch(store, "k2", tmp_path / "dl2") is None
    # a file changed after it was listed: refused
    store.put_bytes("cache/base-4bit/k1/model-00001-of-00001.safetensors", b"weightz")
    assert weight_cache.fetch(store, "k1", tmp_path / "dl3") is None


def test_upload_gives_up_when_the_pod_is_stopped(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"a")

    class Stopped:
        def is_set(self) -> bool:
            return True

    publisher = weight_cache.Publisher(store, "k", folder, Stopped())
    publisher._upload()
    assert not publisher.uploaded and store.list("cache/") == []


def test_fingerprint_tells_a_changed_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / weight_cache.FINGERPRINT_NAME).write_text(json.dumps(weight_cache.state_fingerprint(model)))
    assert weight_cache.matches(folder, model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert not weight_cache.matches(folder, model)
    assert not weight_cache.matches(tmp_path, model)  # no fingerprint recorded: not trusted
