"""GGUF with llama.cpp's own tools: write base + adapter as GGUF, quantize, load, check and generate.

The converter (`convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py`) comes from the
llama.cpp tree vendored in the llama-cpp-python sdist (`hack/llama-tools.sh` extracts it; the
trainer image sets `LLAMA_CPP_DIR`); the quantizer and the loader are the ctypes bindings of the
llama-cpp-python package. Nothing is downloaded at run time.

f16, bf16 and q8_0 are written by `write_merged` (gguf_write.py: the converter's classes reading
merged tensors, quantizing on the GPU) straight from the 16-bit base and the adapter; the k-quants
are quantized from an f16 GGUF by llama.cpp's quantizer. `check_log_probs` is the check every
written GGUF passes (export.verifyTokens).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LLAMA_CPP_DIR_ENV = "LLAMA_CPP_DIR"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

CONVERTER_TYPES = frozenset({"f16", "bf16", "q8_0"})
"""Written by the converter's classes (gguf_write.py, or convert_hf_to_gguf.py on a merged folder)."""

LOG_PROB_TOLERANCE = {"f16": 0.01, "bf16": 0.02, "q8_0": 0.05, "q6_k": 0.1, "q5_k_m": 0.2, "q4_k_m": 0.25}
"""Largest mean difference allowed, by type, between the log-probabilities a GGUF and the merged
model give the verified tokens (nats). The merged model's own greedy tokens are fed to both
(teacher forcing), so the check compares the two models position by position and does not depend
on near-ties between tokens the way a greedy match does. Measured on the export test's trained tiny
Llama over 6 prompts x 16 tokens (mean / largest single difference): f16 0.0003 / 0.002, q8_0
0.006 / 0.044, q6_k 0.010 / 0.13, q5_k_m 0.031 / 0.24, q4_k_m 0.028 / 0.35; the q8_0 file with one
tensor's rows shuffled: 1.2 (ffn_down of one layer) to 11.4 (output head) on average."""

QUANT_FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
"""Quantized from the f16 GGUF by `llama_model_quantize` (values of llama.h's `llama_ftype`)."""


class ExportError(Exception):
    """Export failed in a way a retry cannot fix (conversion refused, greedy mismatch, ...)."""


def default_llama_cpp_dir() -> Path:
    cache = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))
    return cache / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def llama_cpp_dir() -> Path:
    """The llama.cpp tree holding the converter: `$LLAMA_CPP_DIR`, else the hack/llama-tools.sh cache."""
    root = Path(os.environ.get(LLAMA_CPP_DIR_ENV) or default_llama_cpp_dir())
    if not (root / "convert_hf_to_gguf.py").is_file() or not (root / "gguf-py").is_dir():
        raise ExportError(
            f"{LLAMA_CPP_DIR_ENV}={root}: expected llama.cpp's convert_hf_to_gguf.py and gguf-py there "
            "(run hack/llama-tools.sh, or set LLAMA_CPP_DIR to a llama.cpp checkout)"
        )
    return root


def gguf_filename(quant: str) -> str:
    return f"model-{quant}.gguf"


def convert_command(llama_dir: Path, merged_dir: Path, out: Path, outtype: str) -> list[str]:
    return [
        sys.executable,
        str(llama_dir / "convert_hf_to_gguf.py"),
        str(merged_dir),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
    ]


def converter_env(llama_dir: Path, base: dict[str, str]) -> dict[str, str]:
    """`base` with the vendored gguf-py first on PYTHONPATH (the converter matches its own gguf-py,
    which may be newer than the `gguf` package installed)."""
    paths = [str(llama_dir / "gguf-py"), str(llama_dir), base.get("PYTHONPATH", "")]
    return {**base, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def convert(merged_dir: Path, out: Path, outtype: str) -> None:
    """HF folder -> GGUF (`outtype` f16, bf16 or q8_0) with llama.cpp's converter, in a subprocess."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"outtype: expected one of {sorted(CONVERTER_TYPES)}, got {outtype!r}")
    llama_dir = llama_cpp_dir()
    _run_converter(
        convert_command(llama_dir, merged_dir, out, outtype),
        llama_dir,
        out,
        f"convert_hf_to_gguf.py --outtype {outtype}",
    )


def write_merged(base_dir: Path, adapter_dir: Path, out: Path, outtype: str, device: str) -> None:
    """Base + adapter -> GGUF (`outtype` f16, bf16 or q8_0) without a merged folder: gguf_write.py in
    a subprocess, the tensors merged and quantized on `device`."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"outtype: expected one of {sorted(CONVERTER_TYPES)}, got {outtype!r}")
    llama_dir = llama_cpp_dir()
    command = [
        sys.executable,
        "-m",
        "finetune_trainer.gguf_write",
        str(base_dir),
        str(adapter_dir),
        str(out),
        "--outtype",
        outtype,
        "--device",
        device,
    ]
    _run_converter(command, llama_dir, out, f"gguf_write --outtype {outtype}")


def _run_converter(command: list[str], llama_dir: Path, out: Path, what: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = converter_env(llama_dir, dict(os.environ))
    # The subprocess imports finetune_trainer (gguf_write) from wherever this process does.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], package_root])
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ExportError(f"{what} failed ({result.returncode}):\n{tail}")


def quantize(source: Path, out: Path, quant: str, threads: int = 0) -> None:
    """f16 GGUF -> quantized GGUF with llama.cpp's quantizer (`threads` 0: all cores)."""
    import llama_cpp

    if quant not in QUANT_FTYPES:
        raise ValueError(f"quant: expected one of {sorted(QUANT_FTYPES)}, got {quant!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = threads
    out.parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise ExportError(f"llama_model_quantize {source.name} -> {quant} failed (returned {rc})")


def generate(path: Path, prompt_ids: list[list[int]], max_new_tokens: int, gpu: bool) -> list[list[int]]:
    """Load a GGUF with llama.cpp and continue each prompt greedily (argmax of the logits, no sampler):
    the new token ids, ending with an end-of-generation token if the model stopped.

    Prompts enter as token ids, the ones the HF tokenizer produced, so a comparison with the HF model
    tests the weights and the graph, not two tokenizers."""
    import llama_cpp
    import numpy as np

    n_ctx = max((len(p) for p in prompt_ids), default=0) + max_new_tokens + 8
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_gpu_layers=-1 if gpu else 0, seed=0, verbose=False
    )
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n_vocab = llm.n_vocab()
        results = []
        for ids in prompt_ids:
            llm.reset()
            new: list[int] = []
            feed = list(ids)
            for _ in range(max_new_tokens):
                llm.eval(feed)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                new.append(token)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                feed = [token]
            results.append(new)
        return results
    finally:
        llm.close()


def gguf_log_probs(path: Path, prompt_ids: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
    """Teacher-forced: for each prompt, the log-probability the GGUF gives each of `tokens` after
    the prompt and the tokens before it, from one batched evaluation of prompt + tokens."""
    import llama_cpp
    import numpy as np

    n_ctx = max((len(p) + len(t) for p, t in zip(prompt_ids, tokens, strict=True)), default=0) + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, seed=0, verbose=False)
    try:
        result = []
        for ids, expected in zip(prompt_ids, tokens, strict=True):
            llm.reset()
            llm.eval(list(ids) + list(expected))
            logits = np.asarray(llm.scores[len(ids) - 1 : len(ids) - 1 + len(expected)], dtype=np.float64)
            result.append(log_probs_of(logits, expected))
        return result
    finally:
        llm.close()


def log_probs_of(logits: Any, tokens: list[int]) -> list[float]:
    """log softmax(logits[i])[tokens[i]] for each row i (float64)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return [float(logits[i, t] - lse[i]) for i, t in enumerate(tokens)]


def check_log_probs(
    quant: str,
    *,
    prompts: list[str],
    expected: list[list[float]],
    actual: list[list[float]],
    token_text: Any,
    tokens: list[list[int]],
) -> tuple[float, float]:
    """Fail unless the mean difference between the GGUF's and the merged model's log-probabilities
    of the verified tokens is within LOG_PROB_TOLERANCE[quant]; returns (mean, largest).

    `token_text(id)` names a token in the message."""
    deltas = [
        (abs(a - b), prompt, i, ids[i], a, b)
        for prompt, hf, gg, ids in zip(prompts, expected, actual, tokens, strict=True)
        for i, (a, b) in enumerate(zip(hf, gg, strict=True))
    ]
    if not deltas:
        return 0.0, 0.0
    mean = sum(d[0] for d in deltas) / len(deltas)
    worst = max(deltas, key=lambda d: d[0])
    tolerance = LOG_PROB_TOLERANCE[quant]
    if mean > tolerance:
        _, prompt, i, token, a, b = worst
        raise ExportError(
            f"export.verifyTokens: the {quant} GGUF's log-probabilities of the merged model's "
            f"{len(deltas)} greedy tokens differ from the merged model's by {mean:.3f} nats on average, "
            f"more than the {tolerance} allowed for {quant} (largest: token {i} of the answer to "
            f"{prompt[:60]!r}, {token} {token_text(token)!r}: GGUF {b:.3f}, merged model {a:.3f})"
        )
    return mean, worst[0]
