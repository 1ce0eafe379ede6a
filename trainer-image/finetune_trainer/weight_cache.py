"""The base model's 4-bit weights, quantized once and kept in the job's storage (CUDA engine).

Loading a 16-bit model in 4-bit reads every 16-bit weight and quantizes it to NF4 on the GPU (16 GB
read for an 8B model). The first pod of a job saves what that produced, the NF4 weights with their
quantization state and the 16-bit embeddings (5.7 GB for the 8B shape), under
`cache/base-4bit/<key>/` in the job's storage; a pod that replaces a preempted one loads that
instead. The bytes are the ones quantization produced, so both pods train on the same weights
(tests/gpu checks it tensor by tensor).

The key hashes what the weights depend on: the model source and revision, the names, sizes and
modification times (or S3 ETags) of the base's files, the quantization settings and the versions of
bitsandbytes, transformers and unsloth. A folder counts only once its SHA256SUMS is stored (written
last), and every file is checked against it after the download. After loading, the model's state
is compared with the fingerprint the first pod recorded (state_fingerprint: dtype, shape and byte
sum of every tensor); anything else, a failed load included, is a miss, and the pod quantizes as
the first one did.

Storage cost: one copy per job and base model (5.7 GB for an 8B model), removed with the job's
storage. Uploading runs in a background thread while training starts; it is given up (the next
pod quantizes again) when the pod is stopped, so a checkpoint upload on SIGTERM never waits for it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer import artifacts as art
from finetune_trainer.engines import WEIGHT_SUFFIXES
from finetune_trainer.storage import ObjectNotFound, StorageError, sha256_file

if TYPE_CHECKING:
    from finetune_trainer.storage import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "cache/base-4bit/"
SHARD_BYTES = 2**30
"""Shards of the saved folder: an upload stopped by SIGTERM gives up within one shard."""
VERSIONED = ("bitsandbytes", "transformers", "unsloth")


def cache_key(source: str, revision: str | None, model_dir: Path | None, quantization: dict[str, Any]) -> str:
    """16 hex digits of sha256 over what the 4-bit weights depend on (see the module docstring)."""
    files = []
    if model_dir is not None and model_dir.is_dir():
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name == "config.json"):
                stat = path.stat()
                files.append([path.name, stat.st_size, stat.st_mtime_ns])
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    identity = {
        "source": source,
        "revision": revision,
        "files": files,
        "quantization": quantization,
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def fetch(store: ObjectStore, key: str, dest: Path) -> Path | None:
    """The cached folder downloaded to `dest` and checked against its SHA256SUMS, or None."""
    prefix = f"{PREFIX}{key}/"
    try:
        sums = art.parse_sums(store.get_bytes(prefix + art.SUMS_NAME).decode())
    except ObjectNotFound:
        return None
    except StorageError as e:
        log.warning("4-bit weight cache: cannot read %s (%s); quantizing", store.uri(prefix), e)
        return None
    try:
        for rel, sha in sums.items():
            local = dest / rel
            if not (local.is_file() and sha256_file(local) == sha):
                store.get_file(prefix + rel, local)
                if sha256_file(local) != sha:
                    log.warning("4-bit weight cache: %s does not match its SHA256SUMS; quantizing", rel)
                    return None
    except StorageError as e:
        log.warning("4-bit weight cache: download of %s failed (%s); quantizing", store.uri(prefix), e)
        return None
    return dest


FINGERPRINT_NAME = "state-fingerprint.json"


def state_fingerprint(model: Any) -> dict[str, list[Any]]:
    """name -> [dtype, shape, sum of the tensor's bytes as int64]: an exact, cheap (on the GPU)
    summary of a loaded model's state, recorded when the cache is made and compared after a
    cached load, so weights that load differently than they were quantized are never trained on."""
    import torch

    out = {}
    for name, tensor in model.state_dict().items():
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        out[name] = [str(tensor.dtype), list(tensor.shape), int(raw.sum(dtype=torch.int64))]
    return out


def matches(folder: Path, model: Any) -> bool:
    """Does the model loaded from the cached `folder` hold the state recorded when it was made?"""
    recorded = folder / FINGERPRINT_NAME
    return recorded.is_file() and json.loads(recorded.read_text()) == state_fingerprint(model)


class Publisher:
    """Writes the loaded 4-bit model's weights to a local folder and uploads it, in a background
    thread, while training starts.

    `snapshot` takes the state dict (references to the GPU tensors and the packed quantization
    state) and the config before get_peft_model changes the module tree; the thread only writes
    them. The base weights are frozen, so reading them while training runs is safe."""

    def __init__(self, store: ObjectStore, key: str, folder: Path, stop: Any) -> None:
        self.store, self.key, self.folder, self.stop = store, key, folder, stop
        self.thread: threading.Thread | None = None
        self.uploaded = False
        self._state: dict[str, Any] = {}
        self._config: dict[str, Any] = {}

    def snapshot(self, model: Any, tokenizer: Any) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._state = dict(model.state_dict())
        self._config = model.config.to_dict()
        (self.folder / FINGERPRINT_NAME).write_text(json.dumps(state_fingerprint(model)))
        tokenizer.save_pretrained(self.folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.folder)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="weight-cache", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._write()
        except Exception as e:  # the cache is an optimisation: training goes on without it
            log.warning("4-bit weight cache: not saved (%s: %s)", type(e).__name__, e)
            return
        finally:
            self._state = {}
        self._upload()

    def _write(self) -> None:
        """save_pretrained's layout: sharded safetensors, their index, config.json."""
        from safetensors.torch import save_file

        shards: list[dict[str, Any]] = [{}]
        size = 0
        for name, tensor in self._state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            # Each tensor copied to the host on its own: tied weights are stored twice, never shared.
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in shard.items()},
                str(self.folder / file),
                metadata={"format": "pt"},
            )
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in self._state.values())
        index_file = self.folder / "model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (self.folder / "config.json").write_text(json.dumps(self._config, indent=1))

    def _upload(self) -> None:
        prefix = f"{PREFIX}{self.key}/"
        text, _total = art.sums_text(self.folder)
        try:
            for rel in art.parse_sums(text):
                if self.stop is not None and self.stop.is_set():
                    log.info("4-bit weight cache: upload given up (stop requested); the next pod quantizes")
                    return
                self.store.put_file(prefix + rel, self.folder / rel)
            (self.folder / art.SUMS_NAME).write_text(text)
            self.store.put_file(prefix + art.SUMS_NAME, self.folder / art.SUMS_NAME)
        except StorageError as e:
            log.warning("4-bit weight cache: upload to %s failed (%s)", self.store.uri(prefix), e)
            return
        self.uploaded = True
        log.info("4-bit weight cache: stored in %s", self.store.uri(prefix))
