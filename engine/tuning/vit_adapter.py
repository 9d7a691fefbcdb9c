"""ViT-Adapter (Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023)
around a frozen ViT, built from standard operations so it runs on CPUs and exports to ONNX.

The original's structure, for an input of H × W px and a ViT of width D:

- ``SpatialPrior``: a convolutional stem (three 3×3 conv-BN-ReLU, the first with stride 2, then
  a 3×3 max-pool with stride 2) gives c1 at 1/4; three 3×3 stride-2 conv-BN-ReLU give c2 (1/8),
  c3 (1/16), c4 (1/32), of widths w, 2w, 4w, 4w (w = 64); 1×1 convolutions project each to D.
  The levels follow the input size (each side ⌈H / 2^k⌉), whatever the ViT's patch size.
- four interactions, one per group of ViT blocks (the groups end at the encoder's
  ``feature_layers``), each: ``Injector`` (the ViT's patch tokens attend to the c2…c4 tokens; the
  result is added times a learned per-channel γ that starts at 0, so at initialisation the
  frozen ViT computes exactly what it computes alone), the group's frozen blocks, ``Extractor``
  (the c2…c4 tokens attend to the ViT's patch tokens, then a ``ConvFFN``: Linear → 3×3 depthwise
  convolution on each level's own grid → GELU → Linear). The last interaction has two extra
  extractors (the original's ``use_extra_extractor``). CLS (and any other prefix token) goes
  through the blocks but neither injects nor is extracted from (the original's
  ``InteractionBlockWithCls``). A learned embedding per level (3 × D) is added to c2…c4 first.
- outputs: c2…c4 tokens back to maps; c1 + a 2×2 stride-2 transposed convolution of c2; each
  level plus the ViT's patch tokens after the matching group (the first group's at 1/4, the
  second's at 1/8, the third's at 1/16, the last's at 1/32: ×4, ×2, ×1, ×½ for patch 16, here
  bilinearly resized to the level's size for any patch), each batch-normalised: four maps of D
  channels at strides 4, 8, 16, 32. The last group's tokens pass the ViT's final ``norm`` when
  the group ends with the last block, as in the encoder's own features.

The one change: multi-scale deformable attention (a CUDA kernel sampling 4 points per head and
level around a reference point) becomes standard multi-head attention
(``scaled_dot_product_attention``) over all tokens of the other side, which exports to ONNX
(opset 17) and runs anywhere. To keep the spatial correspondence the reference points gave,
fixed 2-D sin-cos positions of each token's centre in pixels (in units of 8 px, the finest
attended level's spacing; half the channels for x, half for y) are added to queries and keys
(not values), as DETR does. At chip sizes ≤ 512 px the 1/8 + 1/16 + 1/32 tokens (5,376 at 512 px)
are few enough for full attention.

Defaults (the original's segmentation configs for ViT-B/L, also TerraTorch's for Prithvi):
attention heads = the ViT's own (12 for ViT-B, 16 for 300M), attention width D/2 (the
original's ``deform_ratio`` 0.5: its value projection D → D/2, here q, k, v D → D/2 and the
output D/2 → D; head width 32), ConvFFN hidden width D/4 (``cffn_ratio`` 0.25), spatial prior
width 64 (``conv_inplane``), γ = 0 at start (``init_values``), LayerNorm (eps 1e-6) before
attention and ConvFFN, BatchNorm on the outputs (the original's SyncBatchNorm), no drop-path
(the backbone is frozen). Initialisation as the original: Linear weights truncated normal
(std 0.02) and zero biases, convolutions normal with std sqrt(2 / fan-out), level embedding
standard normal. TerraTorch turns the ConvFFN off for Prithvi (``with_cffn=False``); it is kept
here as the original has it.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.blocks import checkpoint_block, run_block
from engine.protocol import EngineError

POSITION_UNIT = 8.0  # px per unit of the sin-cos positions (the finest attended level's spacing)
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def sincos_positions(dim: int, rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """[rows * cols, dim] fixed positions of the cells of a rows × cols grid laid over an image of
    height × width px, row-major: [sin | cos] of the cell centre's x then y (in POSITION_UNIT px)
    times ω_i = 1 / 10000^(i / (dim / 4)); zero channels pad a width that is not a multiple of 4."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / max(quarter, 1))
    ys = (np.arange(rows) + 0.5) * (height / rows) / POSITION_UNIT
    xs = (np.arange(cols) + 0.5) * (width / cols) / POSITION_UNIT
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ax, ay = np.outer(xx.ravel(), omega), np.outer(yy.ravel(), omega)
    emb = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay),
                          np.zeros((rows * cols, dim - 4 * quarter))], axis=1)
    return torch.from_numpy(emb).float()


def tokens_to_map(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, rows * cols, C] → [B, C, rows, cols] (the batch size left to the tensor: an export
    keeps it dynamic)."""
    return tokens.unflatten(1, (rows, cols)).permute(0, 3, 1, 2)


class SpatialPrior(nn.Module):
    """The convolutional spatial prior: [B, C, H, W] → c1…c4 [B, D, ⌈H/s⌉, ⌈W/s⌉], s = 4, 8, 16, 32."""

    def __init__(self, in_chans: int, dim: int, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, w, 2), *conv_bn_relu(w, w, 1), *conv_bn_relu(w, w, 1),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*conv_bn_relu(w, 2 * w, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * w, 4 * w, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * w, 4 * w, 2))
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Conv2d(c, dim, 1) for c in (w, 2 * w, 4 * w, 4 * w))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class Attention(nn.Module):
    """Multi-head cross-attention of width ``inner``: queries from one token set, keys and values
    from another; positions (when given) are added to the query and key inputs only."""

    def __init__(self, dim: int, heads: int, inner: int):
        super().__init__()
        if inner % heads:
            raise ValueError(f"attention width {inner} is not a multiple of {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, query: torch.Tensor, feat: torch.Tensor, query_pos: torch.Tensor | None = None,
                feat_pos: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q(query if query_pos is None else query + query_pos)
        k = self.k(feat if feat_pos is None else feat + feat_pos)
        v = self.v(feat)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class ConvFFN(nn.Module):
    """Linear → 3×3 depthwise convolution on each level's own grid → GELU → Linear, over the
    concatenated tokens of the levels of ``shapes`` (rows, cols), in that order."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = self.fc1(tokens)
        levels = torch.split(x, [h * w for h, w in shapes], dim=1)
        x = torch.cat([self.dwconv(tokens_to_map(level, h, w)).flatten(2).transpose(1, 2)
                       for level, (h, w) in zip(levels, shapes)], dim=1)
        return self.fc2(self.act(x))


class Injector(nn.Module):
    """ViT tokens += γ · attention(ViT tokens → spatial-prior tokens); γ (per channel) starts at
    ``init_value`` (0: the frozen ViT starts unchanged)."""

    def __init__(self, dim: int, heads: int, inner: int, init_value: float = 0.0):
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        self.attn = Attention(dim, heads, inner)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, x_pos: torch.Tensor, c_pos: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), self.feat_norm(c), x_pos, c_pos)


class Extractor(nn.Module):
    """Spatial-prior tokens += attention(spatial-prior tokens → ViT tokens), then += ConvFFN."""

    def __init__(self, dim: int, heads: int, inner: int, hidden: int):
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        self.attn = Attention(dim, heads, inner)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = ConvFFN(dim, hidden)

    def forward(self, c: torch.Tensor, x: torch.Tensor, c_pos: torch.Tensor, x_pos: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        c = c + self.attn(self.query_norm(c), self.feat_norm(x), c_pos, x_pos)
        return c + self.ffn(self.ffn_norm(c), shapes)


class Interaction(nn.Module):
    """One injector and one (or, last, three) extractors around a group of ViT blocks."""

    def __init__(self, dim: int, heads: int, inner: int, hidden: int, extractors: int = 1, init_value: float = 0.0):
        super().__init__()
        self.injector = Injector(dim, heads, inner, init_value)
        self.extractors = nn.ModuleList(Extractor(dim, heads, inner, hidden) for _ in range(extractors))


class ViTAdapter(nn.Module):
    """The adapter around an encoder offering ``embed_tokens``, ``blocks`` (and ``norm``):
    ``adapter(encoder, x [B, C, H, W])`` → four maps [B, D, ⌈H/s⌉, ⌈W/s⌉], s = 4, 8, 16, 32.
    ``groups``: the (start, stop) block ranges of the four interactions."""

    def __init__(self, dim: int, in_chans: int, groups: list[tuple[int, int]], heads: int, attn_ratio: float = 0.5,
                 ffn_ratio: float = 0.25, spm_width: int = 64, extra_extractors: int = 2, init_value: float = 0.0):
        super().__init__()
        if len(groups) != 4:
            raise ValueError(f"the ViT-Adapter has four interactions, not {len(groups)}")
        self.dim = dim
        self.groups = [tuple(g) for g in groups]
        inner, hidden = int(dim * attn_ratio), int(dim * ffn_ratio)
        self.spm = SpatialPrior(in_chans, dim, spm_width)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.interactions = nn.ModuleList(
            Interaction(dim, heads, inner, hidden, 1 + (extra_extractors if i == len(groups) - 1 else 0), init_value)
            for i in range(len(groups)))
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        self._positions: dict[tuple[int, ...], torch.Tensor] = {}
        self.apply(self._init_weights)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _pos(self, shapes: list[tuple[int, int]], height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """[1, Σ rows·cols, D]: the sin-cos positions of the grids' tokens, one grid after another
        (computed once per size; a constant in an export)."""
        key = (height, width, *(n for shape in shapes for n in shape))
        if key not in self._positions:
            self._positions[key] = torch.cat([sincos_positions(self.dim, h, w, height, width) for h, w in shapes])
        return self._positions[key].to(device=like.device, dtype=like.dtype).unsqueeze(0)

    def interact(self, encoder: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The spatial prior's maps c1…c4 after the interactions (before the ViT features are
        added) and the ViT's patch tokens after each group as maps [B, D, h, w]."""
        if x.ndim == 5:  # [B, C, T, H, W]
            if x.shape[2] != 1:
                raise one_date_error(x.shape[2])
            x = x[:, :, 0]
        tokens, prefix, grid = encoder.embed_tokens(x)
        t, h, w = (int(n) for n in grid) if len(grid) == 3 else (1, *(int(n) for n in grid))
        if t != 1:
            raise one_date_error(t)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        c1, *levels = self.spm(x)
        shapes = [(int(c.shape[-2]), int(c.shape[-1])) for c in levels]
        c = torch.cat([(level + self.level_embed[i, :, None, None]).flatten(2).transpose(1, 2)
                       for i, level in enumerate(levels)], dim=1)
        c_pos = self._pos(shapes, height, width, c)
        x_pos = self._pos([(h, w)], height, width, c)
        norm = getattr(encoder, "norm", None)
        vit = []
        for (start, stop), interaction in zip(self.groups, self.interactions):
            patches = interaction.injector(tokens[:, prefix:], c, x_pos, c_pos)
            tokens = torch.cat([tokens[:, :prefix], patches], dim=1)
            for block in encoder.blocks[start:stop]:  # frozen: checkpointed in training (engine.models.blocks)
                tokens = run_block(block, tokens, checkpoint_block(block))
            patches = tokens[:, prefix:]
            for extractor in interaction.extractors:
                c = extractor(c, patches, c_pos, x_pos, shapes)
            if stop == len(encoder.blocks) and norm is not None:  # as the encoder's own last features
                patches = norm(tokens)[:, prefix:]
            vit.append(tokens_to_map(patches, h, w))
        c2, c3, c4 = (tokens_to_map(level, rows, cols)
                      for level, (rows, cols) in zip(torch.split(c, [r * k for r, k in shapes], dim=1), shapes))
        rows, cols = int(c1.shape[-2]), int(c1.shape[-1])
        up = self.up(c2)
        if (2 * shapes[0][0], 2 * shapes[0][1]) != (rows, cols):  # odd 1/4 sides: the 1/8 level rounded up
            up = up[..., :rows, :cols]
        return [c1 + up, c2, c3, c4], vit

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        maps, vit = self.interact(encoder, x)
        out = []
        for level, feature, norm in zip(maps, vit, self.norms):
            # sizes as plain numbers: an export must know the maps' channels (ONNX batch norm
            # refuses an unknown count, which a resize to traced sizes would leave)
            size = (int(level.shape[-2]), int(level.shape[-1]))
            if (int(feature.shape[-2]), int(feature.shape[-1])) != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            out.append(norm(level + feature))
        return out


def one_date_error(frames: int) -> EngineError:
    return EngineError(f"the ViT-Adapter takes one date, not {frames}",
                       hint="use one --image (one date) with --tuning vit-adapter, or another tuning method "
                            "(lora, vpt, full) for a time series")


def interaction_groups(depth: int, feature_layers) -> list[tuple[int, int]]:
    """The four block ranges, each ending at a feature layer (or, without four of them, the
    blocks split evenly)."""
    layers = sorted(int(i) for i in feature_layers or ())
    if len(layers) != 4 or layers[0] < 0 or layers[-1] >= depth:
        layers = [depth * (i + 1) // 4 - 1 for i in range(4)]
    starts = [0] + [i + 1 for i in layers[:-1]]
    return [(s, i + 1) for s, i in zip(starts, layers)]


def _heads(encoder: nn.Module, inner: int) -> int:
    """The ViT's own number of heads (a divisor of the attention width), else width / 32."""
    attn = getattr(encoder.blocks[0], "attn", None)
    heads = int(getattr(attn, "num_heads", 0) or getattr(getattr(encoder, "spec", None), "num_heads", 0) or 0)
    heads = heads or max(1, inner // 32)
    while inner % heads:
        heads -= 1
    return heads


def _in_chans(encoder: nn.Module) -> int:
    chans = getattr(encoder, "in_chans", None)
    if chans is None and getattr(encoder, "first_layer_key", None):
        chans = encoder.get_parameter(encoder.first_layer_key).shape[1]
    if chans is None:
        raise ValueError("the encoder tells neither in_chans nor first_layer_key: the spatial prior needs its bands")
    return int(chans)


def attach_vit_adapter(encoder: nn.Module, attn_ratio: float = 0.5, ffn_ratio: float = 0.25, spm_width: int = 64,
                       extra_extractors: int = 2) -> ViTAdapter:
    """Build the ViT-Adapter around ``encoder`` (in place, as ``encoder.adapter``; its
    ``forward`` then returns the adapter's pyramid) and return it: out_channels [D] * 4, strides
    4, 8, 16, 32. Call before loading weights (the checkpoint has no ``adapter.*`` keys)."""
    for needed in ("embed_tokens", "blocks", "embed_dim"):
        if not hasattr(encoder, needed):
            raise EngineError(f"the ViT-Adapter needs a ViT encoder ({type(encoder).__name__} has no {needed})",
                              hint="use lora, full or linear-probe with this backbone")
    frames = int(getattr(encoder, "num_frames", 1) or 1)
    if frames != 1:
        raise one_date_error(frames)
    dim = int(encoder.embed_dim)
    inner = int(dim * attn_ratio)
    adapter = ViTAdapter(dim, _in_chans(encoder), interaction_groups(len(encoder.blocks), encoder.feature_layers),
                         _heads(encoder, inner), attn_ratio=attn_ratio, ffn_ratio=ffn_ratio, spm_width=spm_width,
                         extra_extractors=extra_extractors)
    param = next(encoder.parameters(), None)
    if param is not None:
        adapter.to(device=param.device)
    encoder.adapter = adapter
    encoder.out_channels = [dim] * 4
    encoder.strides = [4, 8, 16, 32]
    return adapter
