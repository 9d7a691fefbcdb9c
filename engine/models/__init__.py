"""Backbones, necks, decoders and checkpoint loading."""
from engine.models.compat import ensure_torchvision_importable

ensure_torchvision_importable()
