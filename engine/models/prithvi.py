"""Prithvi-EO (NASA/IBM) encoder: a ViT with a 3-D patch embedding and fixed 3-D sin-cos
positions, laid out so the published checkpoints load by key.

Differences from the published layout, handled by ``engine.models.checkpoints``:
- the fused ``attn.qkv`` Linear is split into ``attn.qkv.{q,k,v}`` (same maths) so LoRA can
  target q and v alone, as in the paper;
- ``pos_embed`` is a non-persistent buffer recomputed for the chip size (it is fixed sin-cos),
  and recomputed exactly for an input of another size or number of frames;
- the temporal/location encoders of the TL variants (fixed sin-cos of the year and day of year,
  and of latitude and longitude, each times a learned scale) are built only when asked for
  (``metadata=True``, and always by ``engine.models.create_backbone``): the paper found metadata
  inputs unnecessary, so segmentation models leave them out and their two scalars are dropped
  on load.

``forward_features`` returns every block's tokens (CLS first; the last block's after the final
norm), as the published models' own ``forward_features`` and TerraTorch do.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from engine.models.blocks import ViTBlocks
from engine.models.registry import BackboneSpec
from engine.protocol import EngineError


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


def sincos_1d_torch(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``sincos_1d`` in torch (fp32) for positions known only at run time: [...] → [..., dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0))
    angles = positions.float()[..., None] * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class MetadataEncoder(nn.Module):
    """A TL encoder: two numbers per item (year and day of year, or latitude and longitude), each
    encoded with the 1-D sin-cos of its raw value into half the width (the first number the first
    half), times a learned scale (``scale``, 0.1 at init, loaded from the -TL checkpoints)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:  # [..., 2] → [..., dim]
        half = self.dim // 2
        with torch.autocast(device_type=coords.device.type, enabled=False):  # years need fp32
            emb = torch.cat([sincos_1d_torch(half, coords[..., 0]), sincos_1d_torch(self.dim - half, coords[..., 1])],
                            dim=-1)
        return emb * self.scale


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


class PrithviViT(ViTBlocks, nn.Module):
    """Encoder returning the outputs of ``spec.feature_layers`` as images [B, t*D, H/p, W/p]
    (``forward``), or every block's tokens (``forward_features``). ``metadata``: build the
    temporal and location encoders (TL variants only). ``in_chans`` are the bands of one frame;
    ``forward`` takes [B, num_frames * in_chans, H, W] with the frames' bands one frame after
    the other (as stacked rasters hold them)."""

    lora_targets = r"blocks\.\d+\.(attn\.qkv\.[qv]|mlp\.fc[12])"
    methods = ("lora", "dora", "vpt", "vit-adapter", "full", "linear-probe")
    first_layer_key = "patch_embed.proj.weight"
    optional_keys = ("temporal_embed_enc.scale", "location_embed_enc.scale")

    def __init__(self, spec: BackboneSpec, in_chans: int, img_size: int, num_frames: int = 1,
                 metadata: bool = False):
        super().__init__()
        if metadata and not spec.tl:
            raise EngineError(f"{spec.name} has no temporal/location encoders (it is not a -TL model)",
                              hint="use a -TL backbone for date and location inputs, or leave them out")
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
        if metadata:
            self.temporal_embed_enc = MetadataEncoder(spec.embed_dim)
            self.location_embed_enc = MetadataEncoder(spec.embed_dim)
        self.out_channels = [spec.embed_dim * num_frames] * len(spec.feature_layers)
        self.strides = [spec.patch_size] * len(spec.feature_layers)
        self.chip_multiple = spec.patch_size
        self.feature_layers = tuple(spec.feature_layers)
        self.adapter: nn.Module | None = None  # ViT-Adapter (engine.tuning.vit_adapter)
        self.coords: tuple[torch.Tensor, torch.Tensor] | None = None  # TL inputs of the scene (set_coords)
        self._positions: dict[tuple[int, int, int], torch.Tensor] = {}
        self.prompts: nn.Parameter | None = None  # VPT (add_prompts)
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

    @property
    def has_metadata(self) -> bool:
        return hasattr(self, "temporal_embed_enc")

    def _pos_embed(self, grid: tuple[int, int, int], device) -> torch.Tensor:
        """The fixed 3-D sin-cos positions for a token grid, recomputed exactly for another size
        or number of frames than the model was built for."""
        if grid == self.grid:
            return self.pos_embed
        if grid not in self._positions:
            self._positions[grid] = sincos_3d(self.embed_dim, grid)
        return self._positions[grid].to(device)

    def embed_tokens(self, x: torch.Tensor, temporal_coords=None, location_coords=None):
        """Patch tokens with positions (and TL encodings) and CLS first: ([B, 1 + t*h*w, D], 1,
        (t, h, w)). ``x``: [B, C, T, H, W], or [B, T*C, H, W] (frames' bands one after another)."""
        if x.ndim == 4:  # [B, T*C, H, W] → [B, C, T, H, W]
            x = x.reshape(x.shape[0], self.num_frames, self.in_chans, *x.shape[-2:]).transpose(1, 2) \
                if self.num_frames > 1 else x.unsqueeze(2)
        if temporal_coords is None and location_coords is None and self.coords is not None:
            temporal_coords, location_coords = (c if c is None else c.to(x.device).expand(x.shape[0], *c.shape[1:])
                                                for c in self.coords)
        b, _, t, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise EngineError(f"input of {height} x {width} px: {self.spec.name} needs sides that are multiples of "
                              f"its patch size {p}")
        grid = (t, height // p, width // p)
        pos = self._pos_embed(grid, x.device)
        # the built size as plain numbers (an exported model's reshape must not depend on traced sizes)
        t, h, w = self.grid if grid == self.grid else grid
        tokens = self.patch_embed(x) + pos[:, 1:]
        if temporal_coords is not None or location_coords is not None:
            if not self.has_metadata:
                raise EngineError(f"{self.spec.name} was built without temporal/location encoders",
                                  hint="create it with metadata (create_backbone does for -TL models), or pass no "
                                       "coordinates")
            if temporal_coords is not None:  # [B, t, 2] (year, day of year) → repeated over each frame's patches
                per_frame = self.temporal_embed_enc(temporal_coords.reshape(b, t, 2))
                tokens = tokens + per_frame.repeat_interleave(grid[1] * grid[2], dim=1)
            if location_coords is not None:  # [B, 2] (lat, lon) → every patch
                tokens = tokens + self.location_embed_enc(location_coords.reshape(b, 2))[:, None]
        cls = (self.cls_token + pos[:, :1]).expand(b, -1, -1)
        return torch.cat([cls, tokens], dim=1), 1, (t, h, w)

    def tokens_to_image(self, tokens: torch.Tensor, prefix: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """Drop CLS; [B, (t h w), D] → [B, (t D), h, w]; D a number, not -1: an exported model must
        know its channels (ONNX batch norm of a linear head refuses an unknown count)."""
        t, h, w = grid
        b, d = tokens.shape[0], self.embed_dim
        return tokens[:, prefix:].reshape(b, t, h, w, d).permute(0, 1, 4, 2, 3).reshape(b, t * d, h, w)

    def forward_features(self, x: torch.Tensor, temporal_coords: torch.Tensor | None = None,
                         location_coords: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every block's output tokens [B, 1 + t*h*w, D] (CLS first; the last after the final
        norm). ``x``: [B, C, T, H, W] (or [B, C, H, W] for one frame), sides multiples of the
        patch; any T. ``temporal_coords`` [B, T, 2] = (year, day of year) and ``location_coords``
        [B, 2] = (latitude, longitude), for models with the TL encoders."""
        return super().forward_features(x, temporal_coords, location_coords)

    def set_coords(self, temporal_coords: torch.Tensor | None, location_coords: torch.Tensor | None) -> None:
        """The TL inputs ``forward`` uses when given none: [1, T, 2] (year, day of year) and [1, 2]
        (latitude, longitude) of the scene, kept on the module (the card stores them; an export traces
        them as constants); None for both: no metadata."""
        if temporal_coords is None and location_coords is None:
            self.coords = None
            return
        if not self.has_metadata:
            raise EngineError(f"{self.spec.name} has no temporal/location encoders (it is not a -TL model)",
                              hint="use a -TL backbone for --metadata, or leave --metadata out")
        t = torch.as_tensor(temporal_coords, dtype=torch.float32).reshape(1, -1, 2) \
            if temporal_coords is not None else None
        loc = torch.as_tensor(location_coords, dtype=torch.float32).reshape(1, 2) if location_coords is not None else None
        self.coords = (t, loc)


def build_encoder(spec: BackboneSpec, band_names: list[str], img_size: int, num_frames: int = 1,
                  metadata: bool = False) -> PrithviViT:
    if len(band_names) % num_frames:
        raise EngineError(f"{len(band_names)} bands cannot be {num_frames} frames of equal band count",
                          hint="stack the same bands for every date (one --image per date)")
    return PrithviViT(spec, len(band_names) // num_frames, img_size, num_frames, metadata=metadata)


def encoder_state(state: dict, spec: BackboneSpec) -> dict:
    from engine.models.checkpoints import prithvi_encoder_state
    return prithvi_encoder_state(state)
