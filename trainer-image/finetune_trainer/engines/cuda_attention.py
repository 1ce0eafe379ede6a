"""Variable-length attention for Unsloth's padding-free batches on torch 2.11.

Why: Unsloth trains SFT padding-free (a micro-batch is one row of concatenated sequences plus their
lengths). Without FlashAttention-2 or xFormers installed it takes torch's `varlen_attn`, but only
from torch 2.12 on (it needs the `enable_gqa` argument); on torch 2.11 it falls back to one SDPA
call per run of equal-length sequences, so a micro-batch of 200 short rows costs 200 attention
launches per layer, forward and backward. That is why short rows trained at 18.8% MFU against
40.8% for long ones (notes/gpu-recipe.md).

torch 2.11 already ships FlashAttention-2's varlen kernel as `aten._flash_attention_forward` /
`_flash_attention_backward` (cumulative sequence lengths, causal, grouped-query heads), which is what
Unsloth's own `_LeanFlashVarlen` calls on newer torch. `enable_varlen_attention()` hands Unsloth a
`varlen_attn` with the newer signature built on those ops, so its dispatcher takes the varlen path:
one kernel launch per layer whatever the number of sequences. Nothing is installed; the maths is the
same block-diagonal causal attention (benchmarks/gpu checks the losses against the plain path).

Hook: call it right after `import unsloth` in engines/cuda.py (before training starts). It returns a
one-line description for the log; it changes nothing where Unsloth already has a varlen kernel,
where torch has no flash kernel, or where Unsloth's internals are not the expected ones.
"""

from __future__ import annotations

from typing import Any

_STATE: dict[str, Any] = {}


def _never_cudnn(*_: Any, **__: Any) -> bool:
    """torch 2.11's varlen has no cuDNN route: always take the flash kernel."""
    return False


def enable_varlen_attention() -> str:
    """Route Unsloth's packed (padding-free) attention through torch's bundled flash varlen kernel."""
    import torch
    from unsloth.utils import attention_dispatch as dispatch

    if getattr(dispatch, "HAS_FLASH_ATTENTION", False):
        return "varlen attention: flash-attn is installed, Unsloth uses it"
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None and "varlen" not in _STATE:
        return "varlen attention: Unsloth already uses torch's varlen_attn"
    if not (torch.cuda.is_available() and torch.backends.cuda.is_flash_attention_available()):
        return "varlen attention: unavailable (torch has no flash kernel here); per-sequence SDPA"
    lean = getattr(dispatch, "_LeanFlashVarlen", None)
    if lean is None or not hasattr(dispatch, "_torch_varlen_packed"):
        return "varlen attention: this Unsloth version has no varlen hook; per-sequence SDPA"

    def varlen_attn(  # noqa: PLR0917  (torch's varlen_attn signature)
        query: Any,
        key: Any,
        value: Any,
        cu_seq_q: Any,
        cu_seq_k: Any,
        max_q: int,
        max_k: int,
        *,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
    ) -> Any:
        """torch>=2.12's `varlen_attn` signature for self-attention (cu_seq_q is cu_seq_k); the flash
        kernel takes fewer key/value heads than query heads natively, so `enable_gqa` needs nothing."""
        causal = tuple(window_size) == (-1, 0)
        return lean.apply(query, key, value, cu_seq_q, max_q, causal, scale, window_size[0], window_size[1])

    _STATE.setdefault(
        "saved",
        (
            dispatch._TORCH_VARLEN_ATTN,
            dispatch._LEAN_VARLEN,
            getattr(dispatch, "_varlen_can_use_cudnn", None),
        ),
    )
    dispatch._TORCH_VARLEN_ATTN = varlen_attn
    dispatch._LEAN_VARLEN = True
    dispatch._varlen_can_use_cudnn = _never_cudnn
    _STATE["varlen"] = True
    return "varlen attention: torch's bundled FlashAttention-2 varlen kernel (aten._flash_attention_*)"


def disable_varlen_attention() -> None:
    """Undo `enable_varlen_attention` (benchmarks compare both paths in one process)."""
    if "varlen" not in _STATE:
        return
    from unsloth.utils import attention_dispatch as dispatch

    dispatch._TORCH_VARLEN_ATTN, dispatch._LEAN_VARLEN, cudnn = _STATE["saved"]
    if cudnn is not None:
        dispatch._varlen_can_use_cudnn = cudnn
    del _STATE["varlen"]
