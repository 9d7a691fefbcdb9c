"""Training memory: frozen encoder weights stored in bf16 while training under bf16 autocast.

Under bf16 autocast every ``nn.Linear`` casts its fp32 weight to bf16 at each call, and autograd
keeps that bf16 copy for the backward pass, beside the fp32 original: a frozen ViT-B costs its
weights three times over (fp32, plus a bf16 copy per layer until backward). Stored in bf16 from
the start, the weights are what autocast's casts would make (the same rounding, so the same
values: nothing in training changes), the cast is a no-op, and memory holds one bf16 copy.

Only frozen ``nn.Linear`` layers inside the encoder's transformer blocks change (peft's LoRA
base layers among them): LayerNorms, the fp32 patch embedding, everything that trains (adapters,
neck, decoder) and DoRA's base layers (DoRA also reads the base weight outside the linear call, in
fp32, for its weight norm) keep their dtype.

At the end of training the weights go back to fp32, holding the bf16-rounded values: the exact
fp32 originals would need a second copy of the weights, the memory this saves. Nothing is lost:
training and validation only ever computed with the rounded values (autocast rounds them the
same way), a pretrained backbone's frozen weights are never saved with a model (it references the
weights file, whose exact values predict loads), and a backbone trained from random weights saves
the rounded values, i.e. the very model that was trained and scored. State dicts taken while
training (the kept best epoch, the resume checkpoint) get fp32 copies (``fp32_state``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The frozen fp32 ``nn.Linear`` layers of the encoder's transformer ``blocks`` (none for an
    encoder without blocks, e.g. a ResNet), DoRA base layers excepted. Only inside the blocks:
    there every Linear runs under autocast, while embeddings may run parts in fp32 with autocast
    off, where a bf16 weight would not fit. ``model``: a Segmentor or an encoder."""
    encoder = getattr(model, "encoder", model)
    root = getattr(encoder, "blocks", None)
    if not isinstance(root, nn.Module):
        return []
    dora_bases = {id(m.get_base_layer()) for m in root.modules() if len(getattr(m, "lora_magnitude_vector", ()))}
    return [m for m in root.modules()
            if isinstance(m, nn.Linear) and id(m) not in dora_bases and not m.weight.requires_grad
            and m.weight.dtype == torch.float32
            and (m.bias is None or (not m.bias.requires_grad and m.bias.dtype == torch.float32))]


def weights_to_bf16(layers: list[nn.Linear]) -> None:
    for layer in layers:
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.data = p.data.to(torch.bfloat16)


def weights_to_fp32(layers: list[nn.Linear]) -> None:
    for layer in layers:
        for p in (layer.weight, layer.bias):
            if p is not None and p.dtype == torch.bfloat16:
                p.data = p.data.float()


@contextmanager
def frozen_weights_in_bf16(model: nn.Module, enabled: bool = True):
    """Inside: ``model``'s frozen block Linear layers hold bf16 weights (run the model under bf16
    autocast only). After (also on an exception): fp32 again, with the bf16-rounded values.
    Yields the layers changed."""
    layers = frozen_linears(model) if enabled else []
    weights_to_bf16(layers)
    try:
        yield layers
    finally:
        weights_to_fp32(layers)


def use_bf16_weights(precision: str, accelerator: str) -> bool:
    """Whether training stores frozen weights in bf16: under bf16 autocast on a GPU, or on a CPU
    with native bf16 (where previews also run under bf16 autocast, see ``preview.Previews``)."""
    if precision != "bf16-mixed":
        return False
    if accelerator == "gpu":
        return True
    from engine.models.compat import fast_bf16_cpu
    return fast_bf16_cpu()


def fp32_state(state: dict) -> dict:
    """``state`` with bf16 tensors (the frozen weights while training) as fp32: saved model
    tensors are fp32, as they were before training stored weights in bf16."""
    return {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v
            for k, v in state.items()}
