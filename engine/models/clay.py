"""Clay v1 / v1.5 (Clay foundation, MAE + teacher) encoder: a ViT with a wavelength-conditioned
("dynamic", DOFA-style) patch embedding, laid out so the published checkpoints load by key.

The published Lightning checkpoints (``clay-v1-base.ckpt``, ``clay-v1.5.ckpt``) hold the whole
MAE under ``model.`` (``model.encoder.*``, ``model.decoder.*``, ``model.teacher.*``,
``model.proj.*``); ``encoder_state`` keeps ``model.encoder.*`` with the prefix stripped, so the
encoder's keys are the published ones, but for one difference:
- the fused, bias-free ``to_qkv`` Linear of every block is split into ``to_qkv.{q,k,v}`` (same
  maths) so LoRA can target q and v alone, as in the paper; ``engine.tuning.merge`` fuses them
  back for export.

Architecture (the published code's, re-written here):
- patch embedding: each band's centre wavelength (µm) → 1-D sin-cos (128 dims) → residual FC
  block (``fclayer``) → one post-norm transformer layer (d 128, 4 heads, FF 2048, GELU) over
  [128 learned weight tokens; the band tokens; a bias token] (``weight_generator``) → per band
  a p×p×D kernel (``fc_weight`` of band token + its layer output) and one bias (``fc_bias`` of the
  bias token's output); the input is convolved with kernel × 0.02 at stride p. Any number and
  order of bands works; no per-band weights are stored (``first_layer_key`` is None);
- positions: fixed 2-D sin-cos on the fly over D − 8 dims, frequencies scaled by the ground
  sampling distance (``gsd``: the spec's option, 10 m for Sentinel-2), then 8 metadata dims
  (week, hour, latitude, longitude as sin-cos) left at zero: no metadata, as the paper
  recommends for fine-tuning. CLS is prepended after, with no position;
- blocks: pre-norm ``x + attn(x)``, ``x + ff(x)``: attention = LayerNorm → ``to_qkv`` (no bias)
  → softmax attention (dim_head = D / heads) → ``to_out`` (no bias); feed-forward = LayerNorm,
  Linear, exact GELU, Linear (``net.0``, ``net.1``, ``net.3``); the final ``transformer.norm``.
LayerNorm eps 1e-5 throughout.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.blocks import ViTBlocks
from engine.models.prithvi import SplitQKV
from engine.models.registry import BackboneSpec, band_wavelength
from engine.protocol import EngineError

WAVE_DIM = 128  # the wavelength embedding's width
LATENT_TOKENS = 128  # weight tokens of the weight generator
WAVE_HEADS = 4
WAVE_FF = 2048  # the generator layer's feed-forward width (torch's TransformerEncoderLayer default)
META_DIMS = 8  # week, hour, lat, lon (sin, cos each): zeros here
KERNEL_SCALE = 0.02  # the generated kernel is scaled by this before the convolution


def wave_sincos(waves: torch.Tensor, dim: int = WAVE_DIM) -> torch.Tensor:
    """[C] wavelengths (µm) → [C, dim]: [sin | cos] of w × ω_i, ω_i = 1 / 10000^(i / (dim/2 − 1))."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32, device=waves.device) / (half - 1))
    angles = waves.float()[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def clay_positions(h: int, w: int, dim: int, gsd: float) -> torch.Tensor:
    """[h*w, dim] fixed positions, tokens row-major: dims [sin x | cos x | sin y | cos y] over
    ``dim − 8`` (x the column, y the row), each with ω_i = gsd / 10000^(2 (i / (q − 1)) / (dim − 8)),
    q = (dim − 8) / 4; then 8 zero (metadata) dims."""
    d = dim - META_DIMS
    q = d // 4
    omega = 1.0 / 10000 ** (2 * (np.arange(q, dtype=np.float64) / (q - 1)) / d) * gsd
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    x = np.outer(xx.ravel(), omega)
    y = np.outer(yy.ravel(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y), np.zeros((h * w, META_DIMS))], axis=1)
    return torch.from_numpy(pe).float()


class FCBlock(nn.Module):
    """x + GELU(l2(GELU(l1(x))))."""

    def __init__(self, size: int):
        super().__init__()
        self.l1 = nn.Linear(size, size)
        self.l2 = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.l2(F.gelu(self.l1(x))))


class WaveSelfAttention(nn.Module):
    """Multi-head self-attention over one unbatched sequence [S, d], with torch's
    ``MultiheadAttention`` parameter names (``in_proj_weight``/``in_proj_bias``, ``out_proj``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(-1, 3, self.heads, self.dim // self.heads).permute(1, 2, 0, 3).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # [heads, S, d/heads]
        return self.out_proj(y.transpose(0, 1).reshape(-1, self.dim))


class WaveEncoderLayer(nn.Module):
    """A post-norm transformer layer (torch's ``TransformerEncoderLayer`` names and maths, GELU,
    no dropout): x = norm1(x + attn(x)); x = norm2(x + linear2(GELU(linear1(x))))."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.self_attn = WaveSelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class WaveEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, depth: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(WaveEncoderLayer(dim, heads, ff) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class WeightGenerator(nn.Module):
    """Band tokens [C, 128] → (kernels [C, D·p·p] in (D, p, p) order, bias [D])."""

    def __init__(self, embed_dim: int, patch_size: int):
        super().__init__()
        self.encoder = WaveEncoder(WAVE_DIM, WAVE_HEADS, WAVE_FF)
        self.fc_weight = nn.Linear(WAVE_DIM, patch_size * patch_size * embed_dim)
        self.fc_bias = nn.Linear(WAVE_DIM, embed_dim)
        self.weight_tokens = nn.Parameter(torch.randn(LATENT_TOKENS, WAVE_DIM) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, WAVE_DIM) * 0.02)

    def forward(self, bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.weight_tokens, bands, self.bias_token], dim=0)
        out = self.encoder(x)
        n = self.weight_tokens.shape[0]
        return self.fc_weight(out[n:-1] + x[n:-1]), self.fc_bias(out[-1])


class DynamicPatchEmbedding(nn.Module):
    """[B, C, H, W] and the C bands' wavelengths → patch tokens [B, (H/p)(W/p), D], always in fp32
    (torch 2.13's CPU bf16 convolution with large kernels and several channels is wrong, and the
    generated kernels are small numbers).

    The kernel depends on the wavelengths and the generator's weights only, so where no gradient
    reaches the generator (a frozen backbone, no_grad/inference, an export trace) it is generated
    once and kept until those change (each tensor's storage and in-place version are the key):
    training with a frozen backbone skips the generator, and an exported graph holds the kernel
    as a constant of D·C·p² values (not the generator's ~6 M weights, which int8/fp16 exports
    would otherwise round before they make the patch embedding's fp32 convolution)."""

    def __init__(self, embed_dim: int, patch_size: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.weight_generator = WeightGenerator(embed_dim, patch_size)
        self.fclayer = FCBlock(WAVE_DIM)
        for m in self.modules():  # the published init (xavier, zero bias)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self._kernel: tuple | None = None  # (key, weight, bias) of the last generated kernel, without autograd

    def generate(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution (weight [D, C, p, p] × 0.02, bias [D]) for these wavelengths."""
        p, d = self.patch_size, self.embed_dim
        weight, bias = self.weight_generator(self.fclayer(wave_sincos(waves)))
        weight = weight.reshape(-1, d, p, p).transpose(0, 1)  # [C, (D p p)] → [D, C, p, p]
        return weight * KERNEL_SCALE, bias

    def kernel(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = list(self.parameters())
        tracing = torch.jit.is_tracing()
        if not tracing and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.generate(waves)  # the generator trains
        key = (waves.device, waves.data_ptr(), waves._version, torch.is_inference_mode_enabled(),
               *((t.data_ptr(), t._version) for t in params))
        if self._kernel is None or self._kernel[0] != key:
            state = torch._C._get_tracing_state() if tracing else None
            if state is not None:  # generated outside the trace: a constant of the exported graph
                torch._C._set_tracing_state(None)
            try:
                with torch.no_grad():
                    self._kernel = (key, *self.generate(waves))
            finally:
                if state is not None:
                    torch._C._set_tracing_state(state)
        return self._kernel[1], self._kernel[2]

    def forward(self, x: torch.Tensor, waves: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight, bias = self.kernel(waves)
            x = F.conv2d(x.float(), weight, bias, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)


class ClayAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.to_qkv = SplitQKV(dim, bias=False)  # fused (bias-free) in the checkpoints
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, -1, 3, self.heads, self.dim // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # scale dim_head^-0.5
        return self.to_out(y.transpose(1, 2).reshape(b, -1, self.dim))


class ClayFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClayBlock(nn.ModuleList):
    """One transformer layer, ``[attention, feed-forward]`` as the checkpoints name them (``.0``,
    ``.1``), callable as ``block(tokens)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__([ClayAttention(dim, heads), ClayFeedForward(dim, int(dim * mlp_ratio))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x) + x
        return self[1](x) + x


class ClayTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.layers = nn.ModuleList(ClayBlock(dim, heads, mlp_ratio) for _ in range(depth))


class ClayViT(ViTBlocks, nn.Module):
    """Encoder returning the outputs of ``spec.feature_layers`` as images [B, D, H/8, W/8]
    (``forward``), or every block's tokens (``forward_features``), for the bands whose
    wavelengths (µm) are ``waves``. Sides: any multiple of the patch (8)."""

    lora_targets = r"transformer\.layers\.\d+\.(0\.to_qkv\.[qv]|1\.net\.[13])"
    methods = ("lora", "dora", "vpt", "vit-adapter", "full", "linear-probe")
    first_layer_key = None  # wavelength-conditioned: no per-band weights
    optional_keys = ()

    def __init__(self, spec: BackboneSpec, waves: list[float], img_size: int, band_names: list[str] | None = None):
        super().__init__()
        d, p = spec.embed_dim, spec.patch_size
        if (d - META_DIMS) % 4 or d % spec.num_heads:
            raise ValueError(f"{spec.name}: width {d} must be 8 more than a multiple of 4 and divide into "
                             f"{spec.num_heads} heads")
        self.spec = spec
        self.in_chans = len(waves)
        self.band_names = list(band_names) if band_names is not None else None
        self.img_size = img_size
        self.embed_dim = d
        self.patch_size = p
        self.gsd = float(spec.option("gsd", 10.0))
        self.grid = (img_size // p, img_size // p)
        self.register_buffer("waves", torch.tensor(waves, dtype=torch.float32), persistent=False)
        self.register_buffer("pos_embed", clay_positions(*self.grid, d, self.gsd)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.patch_embedding = DynamicPatchEmbedding(d, p)
        self.transformer = ClayTransformer(d, spec.depth, spec.num_heads)
        for m in self.transformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_channels = [d] * len(spec.feature_layers)
        self.strides = [p] * len(spec.feature_layers)
        self.chip_multiple = p
        self.feature_layers = tuple(spec.feature_layers)
        self.adapter: nn.Module | None = None  # ViT-Adapter (engine.tuning.vit_adapter)
        self.prompts: nn.Parameter | None = None  # VPT (add_prompts)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    # the contract's names for the published ``transformer.layers`` / ``transformer.norm``
    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    @property
    def norm(self) -> nn.Module:
        return self.transformer.norm

    @property
    def has_metadata(self) -> bool:
        return False

    def set_coords(self, temporal_coords, location_coords) -> None:
        if temporal_coords is not None or location_coords is not None:
            raise EngineError(f"{self.spec.name} runs without date/location metadata here",
                              hint="leave --metadata out (Clay's authors recommend fine-tuning without it)")

    def _pos_embed(self, grid: tuple[int, int], device) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        if grid not in self._positions:
            self._positions[grid] = clay_positions(*grid, self.embed_dim, self.gsd)[None]
        return self._positions[grid].to(device)

    def embed_tokens(self, x: torch.Tensor):
        """Patch tokens with positions and CLS first: ([B, 1 + h*w, D], 1, (1, h, w))."""
        b, c, height, width = x.shape
        p = self.patch_size
        if c != self.in_chans:
            raise EngineError(f"input of {c} bands: this {self.spec.name} encoder was built for {self.in_chans}")
        if height % p or width % p:
            raise EngineError(f"input of {height} x {width} px: {self.spec.name} needs sides that are multiples of "
                              f"its patch size {p}")
        grid = (height // p, width // p)
        pos = self._pos_embed(grid, x.device)
        # the built size as plain numbers (an exported model's reshape must not depend on traced sizes)
        h, w = self.grid if grid == self.grid else grid
        tokens = self.patch_embedding(x, self.waves) + pos
        cls = self.cls_token.expand(b, -1, -1).to(tokens.dtype)
        return torch.cat([cls, tokens], dim=1), 1, (1, h, w)

    def tokens_to_image(self, tokens: torch.Tensor, prefix: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """Drop CLS; [B, h*w, D] → [B, D, h, w] (D a number, not -1: an exported model must know
        its channels)."""
        _, h, w = grid
        return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h, w)

def band_wavelengths(band_names: list[str]) -> list[float]:
    """Each band's centre wavelength (µm) from its name; an unknown one is an error naming it."""
    waves = []
    for i, name in enumerate(band_names):
        wave = band_wavelength(name) if name else None
        if wave is None:
            what = f"band {name!r}" if name else f"band {i + 1} (unnamed)"
            raise EngineError(f"{what} has no known centre wavelength: Clay builds its patch embedding from each "
                              "band's wavelength",
                              hint="name every band with --band-names, by its Sentinel-2/Landsat name (e.g. B04, red, "
                                   "nir08) or its wavelength (e.g. \"665nm\" or \"0.665um\")")
        waves.append(wave)
    return waves


def build_encoder(spec: BackboneSpec, band_names: list[str], img_size: int, num_frames: int = 1,
                  metadata: bool = False) -> ClayViT:
    if num_frames != 1:
        raise EngineError(f"{spec.name} takes one date, not {num_frames} frames",
                          hint="pass one --image, or a multi-temporal backbone (Prithvi)")
    if metadata:
        raise EngineError(f"{spec.name} runs without date/location metadata here",
                          hint="leave --metadata out (Clay's authors recommend fine-tuning without it)")
    return ClayViT(spec, band_wavelengths(band_names), img_size, band_names)


ENCODER_KEYS = ("cls_token", "patch_embedding.", "transformer.")


def encoder_state(state: dict, spec: BackboneSpec) -> dict:
    """The encoder's tensors as our keys: from the Lightning layout (``model.encoder.``, the
    ``state_dict`` wrapper already unwrapped by the reader), a ClayMAE state dict
    (``encoder.``) or a bare encoder; decoder, teacher, projection and anything else dropped;
    each fused ``to_qkv.weight`` split into ``to_qkv.{q,k,v}.weight``."""
    for prefix in ("model.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    else:
        enc = dict(state)
    out = {}
    for k, v in enc.items():
        if not k.startswith(ENCODER_KEYS):
            continue
        if k.endswith(".to_qkv.weight"):
            stem = k[:-len(".weight")]
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{stem}.{name}.weight"] = part.clone()
            continue
        out[k] = v
    return out
