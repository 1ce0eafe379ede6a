"""GGUF with llama.cpp's own tools: convert a merged HF model, quantize, load and generate greedily.

The converter (`convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py`) comes from the
llama.cpp tree vendored in the llama-cpp-python sdist (`hack/llama-tools.sh` extracts it; the
trainer image sets `LLAMA_CPP_DIR`); the quantizer and the loader are the ctypes bindings of the
llama-cpp-python package. Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LLAMA_CPP_DIR_ENV = "LLAMA_CPP_DIR"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

CONVERTER_TYPES = frozenset({"f16", "bf16"})
"""Written by the converter itself."""

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
    """HF folder -> GGUF (`outtype` f16 or bf16) with llama.cpp's converter, in a subprocess."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"outtype: expected one of {sorted(CONVERTER_TYPES)}, got {outtype!r}")
    llama_dir = llama_cpp_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        convert_command(llama_dir, merged_dir, out, outtype),
        env=converter_env(llama_dir, dict(os.environ)),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ExportError(f"convert_hf_to_gguf.py --outtype {outtype} failed ({result.returncode}):\n{tail}")


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


def first_mismatch(expected: list[int], actual: list[int], n: int) -> int | None:
    """First position < n where the two greedy sequences differ (one ending early counts), or None."""
    for i in range(n):
        a = expected[i] if i < len(expected) else None
        b = actual[i] if i < len(actual) else None
        if a is None and b is None:
            return None
        if a != b:
            return i
    return None


def check_greedy_match(
    prompts: list[str],
    expected: list[list[int]],
    actual: list[list[int]],
    n: int,
    token_text: Any,
) -> None:
    """Fail unless the f16 GGUF's first `n` greedy tokens equal the HF model's for every prompt.

    `token_text(id)` names a token in the message."""
    for prompt, hf, gg in zip(prompts, expected, actual, strict=True):
        i = first_mismatch(hf, gg, n)
        if i is None:
            continue

        def name(seq: list[int], i: int = i) -> str:
            return f"{seq[i]} {token_text(seq[i])!r}" if i < len(seq) else "<end of generation>"

        raise ExportError(
            f"export.verifyTokens: the f16 GGUF's greedy tokens differ from the merged model's at position "
            f"{i} of {n} for prompt {prompt[:60]!r}: merged model {name(hf)}, GGUF {name(gg)}"
        )
