"""Necks and decoders: from the encoder's same-resolution ViT features to per-pixel logits.

``LinearDecoder`` is the light head of a linear probe (the paper's baseline): a per-patch
linear classifier on the last feature map, up-sampled to the input.
``PyramidNeck`` turns the four 1/16 feature maps into a pyramid (1/4, 1/8, 1/16, 1/32) with
learned up-sampling; ``UNetDecoder`` (the paper's recommended decoder) climbs that pyramid
and then two more levels fed by a small convolutional stem on the input image itself, so
boundaries are drawn at full resolution rather than up-sampled from 1/16 features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PyramidNeck(nn.Module):
    """Four maps at 1/p (p = patch size) → 1/4, 1/8, 1/16-ish, 1/32-ish of the input.

    The first map is up-sampled ×4, the second ×2, the third kept, the fourth halved.
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        if len(channels) != 4:
            raise ValueError("PyramidNeck needs four feature maps")
        c0, c1, c2, c3 = channels
        self.up4 = nn.Sequential(nn.ConvTranspose2d(c0, c0 // 2, 2, 2), nn.BatchNorm2d(c0 // 2), nn.GELU(),
                                 nn.ConvTranspose2d(c0 // 2, c0 // 4, 2, 2))
        self.up2 = nn.ConvTranspose2d(c1, c1 // 2, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.out_channels = [c0 // 4, c1 // 2, c2, c3]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UpBlock(nn.Module):
    """Up-sample to the skip's size, concatenate, two 3×3 conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv_bn_relu(cin + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    def __init__(self, in_chans: int, pyramid_channels: list[int], num_classes: int,
                 channels: tuple[int, ...] = (256, 128, 64, 32, 16)):
        super().__init__()
        p4, p8, p16, p32 = pyramid_channels
        c16, c8, c4, c2, c1 = channels
        # Full- and half-resolution stem on the (normalised) image: keeps fine boundaries.
        self.stem1 = conv_bn_relu(in_chans, c1)
        self.stem2 = conv_bn_relu(c1, c2, stride=2)
        self.up16 = UpBlock(p32, p16, c16)
        self.up8 = UpBlock(c16, p8, c8)
        self.up4 = UpBlock(c8, p4, c4)
        self.up2 = UpBlock(c4, c2, c2)
        self.up1 = UpBlock(c2, c1, c1)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, image: torch.Tensor, pyramid: list[torch.Tensor]) -> torch.Tensor:
        s1 = self.stem1(image)
        s2 = self.stem2(s1)
        x = self.up16(pyramid[3], pyramid[2])
        x = self.up8(x, pyramid[1])
        x = self.up4(x, pyramid[0])
        x = self.up2(x, s2)
        x = self.up1(x, s1)
        return self.head(x)


class LinearDecoder(nn.Module):
    """Per-patch linear classifier on the encoder's last feature map (batch-normalised, as in
    MAE's linear probing), bilinearly up-sampled to the input size. It sees only the frozen
    encoder's features: no image stem, no pyramid."""

    uses_pyramid = False

    def __init__(self, in_chans: int, feature_channels: list[int], num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(feature_channels[-1], affine=False)
        self.head = nn.Conv2d(feature_channels[-1], num_classes, 1)

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        logits = self.head(self.norm(features[-1]))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


UNetDecoder.uses_pyramid = True
DECODERS = {"unet": UNetDecoder, "linear": LinearDecoder}


def default_decoder(method: str) -> str:
    """The paper's pairing: a linear probe gets the light linear head, every other method the
    UNet decoder (recommended by the paper)."""
    return "linear" if method == "linear-probe" else "unet"
