"""Everything after training: adapter, merged 16-bit model, GGUF files verified in llama.cpp,
Ollama Modelfiles, before/after samples, optional hub push (docs/export.md).

Export runs as stages. After each one `export/state.json` in the store records it with its artifact
records; a pod that replaces a preempted one skips every stage whose artifacts are still in the
store with the recorded size and sha256, and runs the rest. Stage order (`plan_stages`):

  adapter -> merged -> gguf-q8_0 / gguf-f16 / gguf-q4_k_m / ... (as listed) -> samples -> push

`merged` produces the HF reference (the merged model's greedy tokens, their log-probabilities and
its answers) that every GGUF is checked against, so no later stage needs the HF model again; it
writes the merged folder only when `merged16bit` is asked for. f16, bf16
and q8_0 are written straight from the base and the adapter (gguf.write_merged: no merged folder,
no f16 intermediate); the k-quants are quantized from an f16 GGUF, built for them in the work
folder when f16 itself is not exported. Every GGUF written is loaded in llama.cpp and checked
(gguf.check_log_probs) before it is stored.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer import artifacts as art
from finetune_trainer import gguf, samples
from finetune_trainer.gguf import ExportError
from finetune_trainer.merge import Merger, UnsupportedAdapterError, merge_adapter, merged_model
from finetune_trainer.modelfile import modelfile_for
from finetune_trainer.templates import chat_renderer

if TYPE_CHECKING:
    from finetune_trainer.spec import ExportSpec, TrainingSpec
    from finetune_trainer.storage import ObjectStore

log = logging.getLogger(__name__)

VERIFY_PROMPT = "Hello"
"""Prompt for the GGUF checks when the job has no sample prompts."""

__all__ = ["ExportError", "generate_samples", "plan_stages", "run_export"]
generate_samples = samples.generate_samples


def plan_stages(export: ExportSpec, has_prompts: bool) -> list[str]:
    """Stages this export runs, in order."""
    stages = ["adapter"]
    if export.merged_16bit or export.gguf or has_prompts:
        stages.append("merged")
    stages += [f"gguf-{q}" for q in dict.fromkeys(export.gguf)]
    if has_prompts:
        stages.append("samples")
    if export.push is not None:
        stages.append("push")
    return stages


class Export:
    """One export run: the stage functions and what they share (paths, tokenizer, lazy inputs)."""

    def __init__(
        self,
        *,
        spec: TrainingSpec,
        base_dir: Path,
        adapter_dir: Path,
        store: ObjectStore,
        workdir: Path,
        engine: str,
    ) -> None:
        self.spec, self.base_dir, self.adapter_dir = spec, base_dir, adapter_dir
        self.store, self.engine = store, engine
        self.device = "cuda" if engine == "cuda" else "cpu"
        self.out = workdir / "artifacts"  # mirrors the store's artifacts/ (what push uploads)
        self.build = workdir / "build"  # intermediates that are not artifacts
        self.state = art.load_state(store)
        self.prompts = spec.samples.prompts or [VERIFY_PROMPT]
        # Answers are generated only for sample prompts; the check needs verifyTokens tokens.
        self.n_text = spec.samples.max_new_tokens if spec.samples.prompts else 0
        self.n_gen = max(self.n_text, spec.export.verify_tokens)
        self._tokenizer: Any = None

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        return self._tokenizer

    def local(self, key: str) -> Path:
        return self.out / key.removeprefix(art.ARTIFACTS_PREFIX)

    def stage_verified(self, stage: str) -> bool:
        """Did a previous run finish `stage`, with its artifacts still intact in the store?"""
        record = self.state["stages"].get(stage)
        if record is None:
            return False
        for a in record["artifacts"]:
            ok = (
                art.verify_folder(self.store, a)
                if a["key"].endswith("/")
                else art.verify_file(self.store, a, self.local(a["key"]))
            )
            if not ok:
                log.warning(
                    "export: %s recorded as done but %s changed in the store; redoing it", stage, a["uri"]
                )
                return False
        return True

    def run(self) -> list[dict[str, Any]]:
        stages: dict[str, Callable[[], dict[str, Any]]] = {
            "adapter": self.adapter,
            "merged": self.merged,
            "samples": self.write_samples,
            "push": self.push,
        }
        for stage in plan_stages(self.spec.export, bool(self.spec.samples.prompts)):
            if self.stage_verified(stage):
                log.info("export: %s already done (verified in the store), skipped", stage)
                continue
            started = time.monotonic()
            fn = stages.get(stage) or (lambda s=stage: self.gguf_stage(s.removeprefix("gguf-")))
            record = fn()
            seconds = time.monotonic() - started
            self.state = art.with_stage(self.state, stage, record, seconds)
            art.save_state(self.store, self.state)
            log.info("export: %s done in %.1fs", stage, seconds)
        return [art.public(a) for s in self.state["stages"].values() for a in s["artifacts"]]

    # -- stages ----------------------------------------------------------------------------------

    def adapter(self) -> dict[str, Any]:
        folder = self.local(art.ARTIFACTS_PREFIX + "adapter/")
        if folder.resolve() != self.adapter_dir.resolve():
            shutil.copytree(self.adapter_dir, folder, dirs_exist_ok=True)
        return {"artifacts": [art.upload_folder(self.store, "adapter", "artifacts/adapter/", folder)]}

    def merged_dir(self) -> Path:
        return (
            self.local("artifacts/merged_16bit/") if self.spec.export.merged_16bit else self.build / "merged"
        )

    def merged(self) -> dict[str, Any]:
        """The reference: the merged model's greedy tokens for each prompt, the log-probabilities it
        gives the first verifyTokens of them (teacher-forced) and its answers; the merged folder
        too when it is an artifact."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the training step's cached activations, before a 32 GB load
        artifacts = []
        if self.spec.export.merged_16bit:
            out = self.merged_dir()
            shutil.rmtree(out, ignore_errors=True)
            merge_adapter(self.base_dir, self.adapter_dir, out, self.device)
            artifacts.append(art.upload_folder(self.store, "merged_16bit", "artifacts/merged_16bit/", out))
        model = merged_model(self.base_dir, self.adapter_dir, self.device)
        tok = self.tokenizer
        prompt_ids = [
            samples.encode_prompt(tok, p)
            for p in samples.rendered_prompts(self.spec.template, self.prompts, tok)
        ]
        reference = [samples.greedy_ids(model, tok, ids, self.n_gen) for ids in prompt_ids]
        verified = [ids[: self.spec.export.verify_tokens] for ids in reference]
        log_probs = [teacher_forced_log_probs(model, p, v) for p, v in zip(prompt_ids, verified, strict=True)]
        after = [tok.decode(ids[: self.n_text], skip_special_tokens=True) for ids in reference]
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {
            "artifacts": artifacts,
            "promptIds": prompt_ids,
            "reference": reference,
            "referenceLogProbs": log_probs,
            "after": after,
        }

    def local_merged(self) -> Path:
        """The merged folder for llama.cpp's converter (adapters the streaming writer cannot merge):
        this run's, the stored artifact, or merged again."""
        out = self.merged_dir()
        if (out / "config.json").is_file():
            return out
        stored = [a for a in self.state["stages"]["merged"]["artifacts"] if a["name"] == "merged_16bit"]
        if stored:
            art.download_folder(self.store, stored[0], out)
        else:
            merge_adapter(self.base_dir, self.adapter_dir, out, self.device)
        return out

    def gguf_path(self, quant: str) -> Path:
        name = gguf.gguf_filename(quant)
        return (
            self.local(art.ARTIFACTS_PREFIX + name) if quant in self.spec.export.gguf else self.build / name
        )

    def write_gguf(self, quant: str) -> Path:
        """f16 / bf16 / q8_0 written from base + adapter (or from the merged folder for adapters the
        streaming writer refuses); the k-quants quantized from the f16 GGUF."""
        path = self.gguf_path(quant)
        if quant in gguf.CONVERTER_TYPES:
            if self.streamable:
                gguf.write_merged(self.base_dir, self.adapter_dir, path, quant, self.device)
            else:
                gguf.convert(self.local_merged(), path, quant)
        else:
            gguf.quantize(self.local_f16(), path, quant)
        return path

    def local_f16(self) -> Path:
        """The f16 GGUF (the quantizer's input): this run's, the stored artifact (downloaded and
        verified by stage_verified), or written again."""
        path = self.gguf_path("f16")
        return path if path.is_file() else self.write_gguf("f16")

    @functools.cached_property
    def streamable(self) -> bool:
        try:
            Merger(self.base_dir, self.adapter_dir)
        except UnsupportedAdapterError as e:
            log.info("export: %s; merging into a folder for llama.cpp's converter", e)
            return False
        return True

    def gguf_stage(self, quant: str) -> dict[str, Any]:
        path = self.write_gguf(quant)
        merged = self.state["stages"]["merged"]
        record: dict[str, Any] = {}
        n_verify = self.spec.export.verify_tokens
        if n_verify:
            verified = [ids[:n_verify] for ids in merged["reference"]]
            mean, largest = gguf.check_log_probs(
                quant,
                prompts=self.prompts,
                expected=merged["referenceLogProbs"],
                actual=gguf.gguf_log_probs(path, merged["promptIds"], verified),
                token_text=self.tokenizer.convert_ids_to_tokens,
                tokens=verified,
            )
            record.update(
                verifiedTokens=n_verify, meanLogProbDelta=round(mean, 5), maxLogProbDelta=round(largest, 5)
            )
        if self.n_text:
            results = gguf.generate(path, merged["promptIds"], self.n_text, gpu=self.engine == "cuda")
            record["answers"] = [self.gguf_text(ids) for ids in results]
        artifacts = [
            art.upload_file(self.store, f"gguf-{quant}", f"artifacts/{path.name}", path),
            self.modelfile(quant, path.name),
        ]
        return {"artifacts": artifacts, **record}

    def gguf_text(self, ids: list[int]) -> str:
        """A GGUF's answer decoded by the HF tokenizer, like the merged model's (same token budget)."""
        return self.tokenizer.decode(ids[: self.n_text], skip_special_tokens=True)

    def modelfile(self, quant: str, gguf_name: str) -> dict[str, Any]:
        tok = self.tokenizer
        # llama.cpp (so Ollama) puts a BOS before the prompt when the model's tokenizer does; the
        # converter takes that from the same tokenizer config, so ask the tokenizer.
        adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
        text = modelfile_for(
            self.spec.template,
            gguf_name,
            tok.eos_token,
            chat_renderer(tok),
            bos_token=tok.bos_token if adds_bos else None,
        )
        path = self.local(f"artifacts/model-{quant}.Modelfile")
        path.write_text(text)
        return art.upload_file(self.store, f"modelfile-{quant}", f"artifacts/{path.name}", path)

    def write_samples(self) -> dict[str, Any]:
        stages = self.state["stages"]
        gguf_answers = {
            name.removeprefix("gguf-"): s["answers"]
            for name, s in stages.items()
            if name.startswith("gguf-") and "answers" in s
        }
        records = samples.samples_document(
            self.spec.samples.prompts,
            samples.load_before(self.store),
            stages["merged"]["after"],
            gguf_answers,
        )
        js, md = self.local("artifacts/samples.json"), self.local("artifacts/samples.md")
        js.write_text(json.dumps(records, indent=1, ensure_ascii=False))
        md.write_text(samples.samples_markdown(records))
        return {
            "artifacts": [
                art.upload_file(self.store, "samples-json", "artifacts/samples.json", js),
                art.upload_file(self.store, "samples-md", "artifacts/samples.md", md),
            ]
        }

    def push(self) -> dict[str, Any]:
        from finetune_trainer.hubpush import push_folder

        push = self.spec.export.push
        assert push is not None  # plan_stages adds push only when set
        for stage in self.state["stages"].values():
            for a in stage["artifacts"]:
                local = self.local(a["key"])
                if a["key"].endswith("/") and not local.is_dir():
                    art.download_folder(self.store, a, local)
                elif not a["key"].endswith("/") and not local.is_file():
                    self.store.get_file(a["key"], local)
        commit = push_folder(self.out, push, os.environ)
        log.info("export: pushed to %s", push.repo)
        return {"artifacts": [], "repo": push.repo, "commit": commit}


def teacher_forced_log_probs(model: Any, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt, tokens[:i]) under the HF `model`, from one forward pass."""
    import torch

    if not tokens:
        return []
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(tokens)], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
    return gguf.log_probs_of(logits.double().cpu().numpy(), tokens)


def run_export(  # noqa: PLR0917  (positional: the trainer's call contract)
    spec: TrainingSpec,
    base_model_dir: Path,
    adapter_dir: Path,
    store: ObjectStore,
    workdir: Path,
    engine: str,
) -> list[dict[str, Any]]:
    """Run (or resume) the export of a trained adapter; returns the artifacts as
    `{name, uri, sizeBytes, sha256}` in stage order. Raises ExportError (greedy mismatch, conversion
    failure) and ConfigError (bad push settings)."""
    if engine not in ("cuda", "cpu"):
        raise ValueError(f"engine: expected 'cuda' or 'cpu', got {engine!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    return Export(
        spec=spec,
        base_dir=Path(base_model_dir),
        adapter_dir=Path(adapter_dir),
        store=store,
        workdir=Path(workdir),
        engine=engine,
    ).run()
