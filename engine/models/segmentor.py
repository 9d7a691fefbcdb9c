"""The segmentation model: encoder (backbone) → neck → decoder → per-class logits."""
from __future__ import annotations

import torch
from torch import nn

from engine.models.decoders import DECODERS, PyramidNeck
from engine.models.prithvi import PrithviViT
from engine.models.registry import BackboneSpec, get_backbone_spec
from engine.protocol import EngineError

ENCODERS = {"prithvi": PrithviViT}


class Segmentor(nn.Module):
    def __init__(self, encoder: nn.Module, neck: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] normalised image → [B, K, H, W] logits."""
        return self.decoder(x, self.neck(self.encoder(x)))


class Probabilities(nn.Module):
    """What prediction and ONNX export run: softmax over the classes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


def build_segmentor(backbone: str | BackboneSpec, in_chans: int, chip_size: int, num_classes: int,
                    decoder: str = "unet") -> Segmentor:
    spec = get_backbone_spec(backbone) if isinstance(backbone, str) else backbone
    if chip_size % spec.patch_size != 0 or chip_size < 2 * spec.patch_size:
        raise EngineError(f"chip size {chip_size} does not suit {spec.name}",
                          hint=f"use a multiple of {spec.patch_size} of at least {2 * spec.patch_size} (e.g. 224)")
    if decoder not in DECODERS:
        raise EngineError(f"unknown decoder {decoder!r}", hint=f"choose one of: {', '.join(DECODERS)}")
    if num_classes < 2:
        raise EngineError(f"the labels hold {num_classes} class(es); segmentation needs at least 2",
                          hint="label at least two classes")
    encoder = ENCODERS[spec.family](spec, in_chans, chip_size)
    head_class = DECODERS[decoder]
    if head_class.uses_pyramid:
        neck = PyramidNeck(encoder.out_channels)
        channels = neck.out_channels
    else:  # the head reads the encoder's feature maps as they are
        neck, channels = nn.Identity(), encoder.out_channels
    head = head_class(in_chans, channels, num_classes)
    return Segmentor(encoder, neck, head)
