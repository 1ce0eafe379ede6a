"""What torch 2.11 offers for attention over many packed sequences, checked and timed on the GPU.

One 8B-shaped attention layer (32 query heads, 8 key/value heads, head dim 128, bf16), forward and
backward, over a packed row of rows drawn from the alpaca and medical length distributions:
- `segments`: one SDPA call per sequence (Unsloth's path on torch 2.11 without a varlen kernel);
- `varlen`: FlashAttention-2's varlen kernel bundled in torch (aten._flash_attention_forward/backward),
  what engines/cuda_attention.py gives Unsloth;
- `flex`: torch.nn.attention.flex_attention with a block-diagonal causal BlockMask (compiled);
- `dense-mask`: one SDPA call with a dense (T, T) block-diagonal mask.
Each is compared with a float32 reference (per-sequence math) by ||out - ref|| / ||ref|| on the output
and the three input gradients.

    python check_varlen.py OUT.json
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TOKENS = 16384


def packed_lengths(name: str) -> list[int]:
    lengths, total = [], 0
    for n in prepare.row_lengths(name):
        if total + n > TOKENS:
            break
        lengths.append(n)
        total += n
    return lengths


def segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        o = F.scaled_dot_product_attention(
            q[s].transpose(0, 1)[None],
            k[s].transpose(0, 1)[None],
            v[s].transpose(0, 1)[None],
            is_causal=True,
            enable_gqa=True,
        )
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


class FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):  # type: ignore[no-untyped-def]  # noqa: PLR0917
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, return_debug_mask=False
        )
        ctx.save_for_backward(q, k, v, cu, out, lse, seed, offset)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        q, k, v, cu, out, lse, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, seed, offset
        )
        return dq, dk, dv, None, None


def check(name: str, flex: Callable[..., torch.Tensor]) -> dict[str, object]:
    """Every variant on one packed row of `name`-length sequences: errors and fwd+bwd time."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = packed_lengths(name)
    total = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(total, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda")
    )

    def doc_causal(b, h, qi, ki):  # type: ignore[no-untyped-def]
        return (doc[qi] == doc[ki]) & (qi >= ki)

    block = create_block_mask(doc_causal, None, None, total, total, device="cuda")
    dense = (doc[:, None] == doc[None, :]) & torch.ones(total, total, device="cuda", dtype=torch.bool).tril()

    variants: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "segments": lambda a, b, c: segments(a, b, c, lengths),
        "varlen": lambda a, b, c: FlashVarlen.apply(a, b, c, cu, max(lengths)),
        "flex": lambda a, b, c: flex(
            a.transpose(0, 1)[None],
            b.transpose(0, 1)[None],
            c.transpose(0, 1)[None],
            block_mask=block,
            enable_gqa=True,
        )[0].transpose(0, 1),
        "dense-mask": lambda a, b, c: F.scaled_dot_product_attention(
            a.transpose(0, 1)[None],
            b.transpose(0, 1)[None],
            c.transpose(0, 1)[None],
            attn_mask=dense,
            enable_gqa=True,
        )[0].transpose(0, 1),
    }
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = segments(*ref_in, lengths)
    ref.backward(grad.double())
    row: dict[str, object] = {"sequences": len(lengths), "tokens": total}
    for label, fn in variants.items():
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        try:
            out = fn(*inputs)
            out.backward(grad)
            errors = [
                float((a.double() - b).norm() / b.norm())
                for a, b in zip(
                    [out, *(x.grad for x in inputs)], [ref, *(x.grad for x in ref_in)], strict=True
                )
            ]

            def step() -> None:
                fn(*inputs).backward(grad)  # noqa: B023

            ms = do_bench(step, warmup=50, rep=300, return_mode="median")
            row[label] = {
                "fwd_bwd_ms": round(ms, 3),
                "rel_err_out_dq_dk_dv": [f"{e:.1e}" for e in errors],
            }
        except Exception as e:  # a variant that cannot run here is reported, not fatal
            row[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(name, label, row[label], flush=True)
    return row


def main() -> None:
    out_path = Path(sys.argv[1])
    report: dict[str, object] = {"torch": torch.__version__}
    try:
        from torch.nn.attention import varlen

        report["torch.nn.attention.varlen"] = str(inspect.signature(varlen.varlen_attn))
    except ImportError as e:
        report["torch.nn.attention.varlen"] = f"absent: {e}"
    report["flash_available"] = torch.backends.cuda.is_flash_attention_available()
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    for name in ("alpaca", "medical"):
        report[name] = check(name, flex)
    out_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
