"""The segmentation model: encoder (backbone) → neck → decoder → per-class logits."""
from __future__ import annotations

import torch
from torch import nn

from engine.models.decoders import DECODERS, PyramidNeck
from engine.models.families import build_encoder
from engine.models.registry import BackboneSpec, get_backbone_spec
from engine.protocol import EngineError


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


def default_band_names(spec: BackboneSpec, in_chans: int) -> list[str]:
    """The pretraining bands when the count fits, else unnamed bands."""
    return list(spec.bands) if in_chans == len(spec.bands) else [""] * in_chans


def build_segmentor(backbone: str | BackboneSpec, in_chans: int, chip_size: int, num_classes: int,
                    decoder: str = "unet", band_names: list[str] | None = None, method: str | None = None,
                    num_frames: int = 1, metadata: bool = False) -> Segmentor:
    """``in_chans``: all input bands (every frame's); ``band_names`` (default: the pretraining
    bands when the count fits) pick pretrained channels, and wavelengths for Clay; ``method``
    ``vit-adapter`` builds the adapter around the encoder (other methods are set up by
    ``engine.tuning.apply_tuning`` once the weights are loaded)."""
    spec = get_backbone_spec(backbone) if isinstance(backbone, str) else backbone
    if chip_size % spec.patch_size != 0 or chip_size < 2 * spec.patch_size:
        raise EngineError(f"chip size {chip_size} does not suit {spec.name}",
                          hint=f"use a multiple of {spec.patch_size} of at least {2 * spec.patch_size} (e.g. 224)")
    band_names = list(band_names) if band_names is not None else default_band_names(spec, in_chans)
    if len(band_names) != in_chans:
        raise ValueError(f"{len(band_names)} band names for {in_chans} bands")
    if decoder not in DECODERS:
        raise EngineError(f"unknown decoder {decoder!r}", hint=f"choose one of: {', '.join(DECODERS)}")
    if num_classes < 2:
        raise EngineError(f"the labels hold {num_classes} class(es); segmentation needs at least 2",
                          hint="label at least two classes")
    encoder = build_encoder(spec, band_names, chip_size, num_frames=num_frames, metadata=metadata)
    if method is not None:
        from engine.tuning import check_method
        check_method(encoder, method)
    if method == "vit-adapter":
        from engine.tuning.vit_adapter import attach_vit_adapter
        attach_vit_adapter(encoder)
    head_class = DECODERS[decoder]
    if head_class.uses_pyramid and len(set(encoder.strides)) == 1:  # a ViT's maps, all at the patch size
        neck = PyramidNeck(encoder.out_channels)
        channels = neck.out_channels
    elif head_class.uses_pyramid:  # already a pyramid (a CNN, or the ViT-Adapter): strides 4, 8, 16, 32
        neck, channels = nn.Identity(), list(encoder.out_channels)
    else:  # the head reads the encoder's feature maps as they are
        neck, channels = nn.Identity(), encoder.out_channels
    head = head_class(in_chans, channels, num_classes)
    return Segmentor(encoder, neck, head)
