"""Necks and decoders: from the encoder's same-resolution ViT features to per-pixel logits.

``LinearDecoder`` is the light head of a linear probe (the paper's baseline): a per-patch
linear classifier on the last feature map, up-sampled to the input.
``PyramidNeck`` turns the four 1/16 feature maps into a pyramid (1/4, 1/8, 1/16, 1/32) with
learned up-sampling; ``UNetDecoder`` (the paper's recommended decoder) climbs that pyramid
and then two more levels fed by a small convolutional stem on the input image itself, so
boundaries are drawn at full resolution rather than up-sampled from 1/16 features.
``UPerNetDecoder`` (pyramid pooling + feature pyramid on the neck's pyramid) and ``FCNDecoder``
(convolutions on the last feature map) are the paper's other decoders, for comparison.
"""
from __future__ import annotations

import math

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


class UPerNetDecoder(nn.Module):
    """UPerNet (Xiao et al. 2018), as the paper compares it: a pyramid pooling module on the
    coarsest pyramid level, a feature pyramid (top-down, lateral 1×1 convolutions, 3×3 smoothing),
    the four levels up-sampled to the finest one and fused, a 1×1 classifier, then bilinear
    up-sampling to the input. Reads the neck's pyramid only (no image stem)."""

    uses_pyramid = True

    def __init__(self, in_chans: int, pyramid_channels: list[int], num_classes: int, channels: int = 128,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        top = pyramid_channels[-1]
        self.grid = math.lcm(*pool_scales)
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AvgPool2d(self.grid // scale), nn.Conv2d(top, channels, 1, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) for scale in pool_scales)
        self.bottleneck = conv_bn_relu(top + len(pool_scales) * channels, channels)
        self.laterals = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                                    nn.ReLU(inplace=True)) for c in pyramid_channels[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in pyramid_channels[:-1])
        self.fuse = conv_bn_relu(len(pyramid_channels) * channels, channels)
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, image: torch.Tensor, pyramid: list[torch.Tensor]) -> torch.Tensor:
        top = pyramid[-1]
        # pooled from the top level resized to 6 × 6 (the scales' least common multiple) with fixed
        # kernels: ONNX exports adaptive pooling only to sizes that divide a known input size, and
        # the top level of a 224 px chip is 7 × 7
        grid = F.interpolate(top, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        pooled = [F.interpolate(pool(grid), size=top.shape[-2:], mode="bilinear", align_corners=False)
                  for pool in self.pools]
        levels = [lateral(x) for lateral, x in zip(self.laterals, pyramid[:-1])]
        levels.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [smooth(x) for smooth, x in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                                                for x in outs[1:])], dim=1))
        return F.interpolate(self.head(fused), size=image.shape[-2:], mode="bilinear", align_corners=False)


class FCNDecoder(nn.Module):
    """The FCN head (Long et al. 2015, as in MMSegmentation's FCNHead): two 3×3 conv-BN-ReLU on the
    encoder's last feature map, a 1×1 classifier, bilinear up-sampling to the input."""

    uses_pyramid = False

    def __init__(self, in_chans: int, feature_channels: list[int], num_classes: int, channels: int = 256):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(feature_channels[-1], channels), conv_bn_relu(channels, channels))
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        logits = self.head(self.convs(features[-1]))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


UNetDecoder.uses_pyramid = True
DECODERS = {"unet": UNetDecoder, "upernet": UPerNetDecoder, "fcn": FCNDecoder, "linear": LinearDecoder}


def default_decoder(method: str) -> str:
    """The paper's pairing: a linear probe gets the light linear head, every other method the
    UNet decoder (recommended by the paper)."""
    return "linear" if method == "linear-probe" else "unet"
