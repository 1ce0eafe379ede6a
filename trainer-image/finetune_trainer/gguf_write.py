"""Write a GGUF of base + LoRA adapter straight from the 16-bit base: llama.cpp's own converter
classes with two hooks, in a process of its own (`gguf.write_merged` starts it).

    python -m finetune_trainer.gguf_write BASE_DIR ADAPTER_DIR OUT.gguf --outtype q8_0 --device cuda

What the hooks change, and what they do not:
- Tensors: the converter indexes the base's safetensors as usual, but each tensor it reads is the
  merged one (merge.Merger: W + scale x B @ A for adapted weights), loaded onto `--device`. No
  merged folder is written or read (16 GB for an 8B model).
- Arithmetic: the converter turns each tensor into numpy and quantizes it in numpy, one core at a
  time. Here the same quantization runs in torch on the tensor's device; the results are the
  same bytes (tests/integration/test_export.py compares them with the converter run on a merged
  folder): Q8_0 blocks of 32 with d = max|x| / 127 stored as f16 and round-half-away-from-zero of
  x / d, F16 and BF16 by round-to-nearest-even, F32 as is.
Everything else (architecture, tensor names and order, which tensors stay F32, metadata, the
vocabulary) is the converter's own code.

The converter is imported from the llama.cpp tree that `gguf.llama_cpp_dir()` names (its gguf-py
comes first on sys.path, through gguf.converter_env), like `convert_hf_to_gguf.py` itself.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

log = logging.getLogger("finetune_trainer.gguf_write")


def q8_0_blocks(x: Any) -> Any:
    """Q8_0 bytes of a float32 tensor whose last dimension is a multiple of 32, bit for bit as
    gguf-py's numpy `Q8_0.quantize_blocks` (itself bit-exact with ggml-quants.c)."""
    import torch

    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inverse
    # np_roundf: floor(|n|) + floor(2 (|n| - floor(|n|))), with n's sign
    magnitude = scaled.abs()
    floored = torch.floor(magnitude)
    rounded = torch.sign(scaled) * (floored + torch.floor(2 * (magnitude - floored)))
    packed = torch.cat(
        [d.to(torch.float16).view(torch.uint8), rounded.to(torch.int8).view(torch.uint8)], dim=1
    )
    return packed.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


def quantize_tensor(t: Any, qtype_name: str) -> Any:
    """The numpy array gguf-py's `quants.quantize` would return for `t` (any device)."""
    import torch

    t = t.to(torch.float32)
    if qtype_name == "F32":
        out = t
    elif qtype_name == "F16":
        out = t.to(torch.float16)
    elif qtype_name == "BF16":
        out = t.to(torch.bfloat16).view(torch.uint8).reshape(*t.shape[:-1], t.shape[-1] * 2)
    elif qtype_name == "Q8_0":
        out = q8_0_blocks(t.contiguous())
    else:
        raise NotImplementedError(qtype_name)
    return out.contiguous().cpu().numpy()


def install_hooks(gguf: Any, lazy_torch: type) -> None:
    """LazyTorchTensor.numpy() keeps the torch tensor (on its device) until `quants.quantize`, which
    then quantizes it with torch; every other path is the converter's."""
    import numpy as np

    original_quantize = gguf.quants.quantize
    supported = {gguf.GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0")}

    class TorchBacked(gguf.LazyNumpyTensor):
        """A LazyNumpyTensor whose only argument is the lazy torch tensor it converts."""

        _tensor_type = np.ndarray

    def numpy(self: Any) -> Any:
        dtype = lazy_torch._dtype_map[self.dtype]
        return TorchBacked(
            meta=gguf.LazyNumpyTensor.meta_with_dtype_and_shape(dtype, self.shape),
            args=(self,),
            func=lambda s: s.cpu().numpy(),
        )

    def quantize(data: Any, qtype: Any) -> Any:
        if not isinstance(data, TorchBacked) or qtype not in supported:
            return original_quantize(data, qtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            raise gguf.QuantError(f"Can't quantize tensor with shape {data.shape} to Q8_0")
        name = qtype.name
        if name in ("F32", "F16"):
            meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(
                np.float32 if name == "F32" else np.float16, data.shape
            )
        else:
            meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(
                np.uint8, gguf.quant_shape_to_byte_shape(data.shape, qtype)
            )
        source = data._args[0]
        return gguf.LazyNumpyTensor(
            meta=meta, args=(), func=lambda: quantize_tensor(lazy_torch.to_eager(source), name)
        )

    lazy_torch.numpy = numpy  # type: ignore[method-assign]
    gguf.quants.quantize = quantize


def read_merged_tensors(model_class: type, lazy_torch: type, merger: Any, device: str) -> None:
    """Make `model_class` (the converter's class for the architecture; this process is ours, so
    patching it is fine) index the base's safetensors as merged tensors loaded onto `device`."""
    import torch
    from safetensors import safe_open

    from finetune_trainer.merge import base_weight_files

    handles: dict[Path, Any] = {}

    def load(path: Path, name: str) -> Any:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device=device)
        return merger.merged(name, handles[path].get_tensor(name))

    def index_tensors(self: Any, remote_hf_model_id: str | None = None) -> dict[str, Any]:
        tensors = {}
        for path in base_weight_files(self.dir_model):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sliced = f.get_slice(name)
                    dtype = lazy_torch._dtype_str_map[sliced.get_dtype()]
                    if dtype.is_floating_point:
                        dtype = merger.dtype
                    meta = torch.empty(tuple(sliced.get_shape()), dtype=dtype, device="meta")

                    def gen(path: Path = path, name: str = name, meta: Any = meta) -> Any:
                        return lazy_torch(meta=meta, args=(path, name), func=load)

                    if item := self.filter_tensors((name, gen)):
                        tensors[item[0]] = item[1]
        return tensors

    model_class.index_tensors = index_tensors  # type: ignore[attr-defined]


def write(base_dir: Path, adapter_dir: Path, out: Path, outtype: str, device: str) -> None:
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from conversion.base import LazyTorchTensor

    from finetune_trainer.merge import Merger

    merger = Merger(base_dir, adapter_dir)
    install_hooks(gguf, LazyTorchTensor)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(base_dir, False)
        architecture = get_model_architecture(hparams, ModelType.TEXT)
        model_class = get_model_class(architecture)
        read_merged_tensors(model_class, LazyTorchTensor, merger, device)
        model_class(base_dir, ftype, out).write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", choices=OUTTYPES, required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    write(a.base, a.adapter, a.out, a.outtype, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
