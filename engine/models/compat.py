"""Make ``import timm`` work when torchvision's compiled ops cannot load.

PyPI has no CPU build of torchvision: the CUDA build's ``_C`` extension fails to load on CPU
torch, and torchvision's import then dies registering fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, whose schemas only ``_C`` defines. timm imports torchvision, so the
engine could not import timm. We try the extension the way torchvision does; only when that
fails do we define the two schemas (no kernels: calling them still fails loudly). Where the
extension loads (a matching CUDA machine) this is a no-op.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LIBRARY = None  # keeps the schema definitions alive


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    try:
        torch.ops.torchvision.nms  # already registered (extension loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return
        except (OSError, ImportError, RuntimeError):
            break
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def fast_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): then bf16 autocast runs a
    ViT 2-4× faster than fp32. Layers where torch's CPU bf16 is wrong stay fp32 (see prithvi)."""
    import torch

    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
