"""Backbone families: which module builds an encoder for a registry spec and reads its
published checkpoints.

Every family module defines
- ``build_encoder(spec, band_names, img_size, num_frames=1, metadata=False) -> nn.Module``;
- ``encoder_state(state, spec) -> dict``: a published checkpoint's tensors (any of its key
  layouts) as the encoder's own state-dict keys, everything that is not the encoder dropped.

Every encoder (the contract the neck, decoders, tuning and loader rely on) has
- ``forward(x [B, C, H, W]) -> list`` of four feature maps [B, c_i, H / s_i, W / s_i];
- ``out_channels`` (the c_i) and ``strides`` (the s_i);
- ``chip_multiple``: input sides must be multiples of it (the patch size, or 32 for a ResNet);
- ``first_layer_key``: the state-dict key of the weight whose dimension 1 is the input band
  (copied band by band from the checkpoint; None for wavelength-conditioned embeddings);
- ``lora_targets``: regex (relative to the encoder) of the layers LoRA/DoRA adapt;
- ``methods``: the tuning methods it supports;
- ``optional_keys``: checkpoint keys loaded when the encoder has them and dropped otherwise.
Transformer encoders also offer ``forward_features`` (every block's tokens) and, for VPT and
the ViT-Adapter, ``embed_tokens(x) -> (tokens, prefix, (h, w))``, ``blocks``, ``norm``,
``embed_dim`` and ``feature_layers``.
"""
from __future__ import annotations

import importlib

from torch import nn

from engine.models.registry import BackboneSpec

FAMILY_MODULES = {
    "prithvi": "engine.models.prithvi",
    "clay": "engine.models.clay",
    "resnet": "engine.models.resnet",
    "timm": "engine.models.timm_backbones",
}


def family(spec: BackboneSpec):
    return importlib.import_module(FAMILY_MODULES[spec.family])


def build_encoder(spec: BackboneSpec, band_names: list[str], img_size: int, num_frames: int = 1,
                  metadata: bool = False) -> nn.Module:
    return family(spec).build_encoder(spec, list(band_names), img_size, num_frames=num_frames, metadata=metadata)


def encoder_state(spec: BackboneSpec, state: dict) -> dict:
    return family(spec).encoder_state(state, spec)


def encoder_summary(spec: BackboneSpec) -> tuple[int, list[str]]:
    """(encoder parameters with the pretraining bands, the tuning methods it supports), from an
    encoder built on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        encoder = build_encoder(spec, list(spec.bands), 8 * spec.patch_size)
    return sum(p.numel() for p in encoder.parameters()), list(encoder.methods)
