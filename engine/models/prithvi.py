"""Prithvi-EO (NASA/IBM) encoder: a ViT with a 3-D patch embedding and fixed 3-D sin-cos
positions, laid out so the published checkpoints load by key.

Differences from the published layout, handled by ``engine.models.checkpoints``:
- the fused ``attn.qkv`` Linear is split into ``attn.qkv.{q,k,v}`` (same maths) so LoRA can
  target q and v alone, as in the paper;
- ``pos_embed`` is a non-persistent buffer recomputed for the chip size (it is fixed sin-cos);
- temporal/location encoders of the TL variants are not built: the paper found metadata
  inputs unnecessary, so their two scalars are dropped on load.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from engine.models.registry import BackboneSpec


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim]: [sin | cos] of positions × ω_i, ω_i = 1 / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(dim: int, grid: tuple[int, int, int], cls_token: bool = True) -> torch.Tensor:
    """[1, (1+) t*h*w, dim] fixed positions, tokens in (t, h, w) order, channels (w, h, t)
    split 6/16, 6/16, 4/16 of ``dim``; the CLS row is zeros."""
    t, h, w = grid
    dw = dh = dim // 16 * 6
    dt = dim - dw - dh
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    emb = np.concatenate([sincos_1d(dw, ww.ravel()), sincos_1d(dh, hh.ravel()),
                          sincos_1d(dt, tt.ravel())], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class PatchEmbed3D(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] → [B, N, D]
        # torch 2.13's CPU bf16 convolution with a 16×16 kernel and ≥ 6 input channels returns
        # wrong values, so this layer always runs in fp32, even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.proj(x.float())
        return x.flatten(2).transpose(1, 2)


class SplitQKV(nn.Module):
    """Drop-in for timm's fused ``qkv`` Linear with separate q, k, v projections."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fused(self) -> nn.Linear:
        """The equivalent single Linear (for inference/export once adapters are merged)."""
        parts = (self.q, self.k, self.v)
        fused = nn.Linear(self.q.in_features, 3 * self.q.out_features, bias=self.q.bias is not None)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        return fused.to(self.q.weight.device, self.q.weight.dtype)


class PrithviViT(nn.Module):
    """Encoder returning the outputs of ``spec.feature_layers`` as images [B, D, H/p, W/p]."""

    def __init__(self, spec: BackboneSpec, in_chans: int, img_size: int, num_frames: int = 1):
        super().__init__()
        self.spec = spec
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_frames = num_frames
        self.embed_dim = spec.embed_dim
        self.patch_size = spec.patch_size
        self.grid = (num_frames, img_size // spec.patch_size, img_size // spec.patch_size)
        self.patch_embed = PatchEmbed3D(in_chans, spec.embed_dim, (1, spec.patch_size, spec.patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        self.register_buffer("pos_embed", sincos_3d(spec.embed_dim, self.grid), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.ModuleList(
            Block(spec.embed_dim, spec.num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
            for _ in range(spec.depth))
        for block in self.blocks:
            block.attn.qkv = SplitQKV(spec.embed_dim, bias=True)
        self.norm = norm(spec.embed_dim)
        self.out_channels = [spec.embed_dim * num_frames] * len(spec.feature_layers)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim == 4:  # one frame: [B, C, H, W] → [B, C, 1, H, W]
            x = x.unsqueeze(2)
        b = x.shape[0]
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        features = []
        last = len(self.blocks) - 1
        t, h, w = self.grid
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.spec.feature_layers:
                out = self.norm(tokens) if i == last else tokens
                # drop CLS; [B, (t h w), D] → [B, (t D), h, w]; D a number, not -1: an exported model
                # must know its channels (ONNX batch norm of a linear head refuses an unknown count)
                d = self.spec.embed_dim
                out = out[:, 1:].reshape(b, t, h, w, d).permute(0, 1, 4, 2, 3).reshape(b, t * d, h, w)
                features.append(out)
        return features
