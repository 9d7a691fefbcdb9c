"""Any timm model as a backbone: ``--backbone timm:NAME`` (``timm:vit_small_patch16_224``,
``timm:resnet50``, a pretrained tag too: ``timm:vit_small_patch16_224.dino``).

The spec is read from the timm model itself, built on the meta device (no weights made, nothing
downloaded). Two kinds:

- ViTs (timm's ``VisionTransformer``): the timm model's own modules under their own names
  (``patch_embed``, ``cls_token``, ``reg_token``, ``pos_embed``, ``norm_pre``, ``blocks``,
  ``norm``), the fused ``attn.qkv`` split into q, k, v (``SplitQKV``, as for Prithvi) so LoRA
  adapts q and v; features from four evenly spaced blocks, like the Prithvi specs. Learned
  positions stay at the pretrained grid (they load as published) and are resampled bicubically
  for another chip size. Methods: LoRA, DoRA, deep VPT, the ViT-Adapter, full, linear probe.
- CNNs: timm's ``features_only`` extractor (``engine.models.resnet.CNNEncoder``), the last four
  feature levels with their own strides and channels (``feature_info``). Methods: LoRA, DoRA
  (peft's Conv2d adapters), full, linear probe.

timm models are RGB: their bands are RED, GREEN, BLUE, so a raster's red, green and blue bands
get the pretrained input channels and any other band starts fresh (``load_backbone_weights``).
Weights: ``--weights hub``/``auto`` fetch ``model.safetensors`` of the model's Hugging Face
repository (``timm/NAME.TAG``, from its pretrained config), ``--weights FILE`` reads a timm state
dict (``timm.create_model(NAME).state_dict()``; any key prefix, the classifier head dropped).
"""
from __future__ import annotations

import math
from functools import lru_cache

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.models.blocks import ViTBlocks
from engine.models.prithvi import SplitQKV
from engine.models.registry import BackboneSpec
from engine.models.resnet import build_cnn, cnn_encoder_state, feature_net, keep_fp32, select_prefix
from engine.protocol import EngineError

PREFIX = "timm:"
RGB = ("RED", "GREEN", "BLUE")
VIT_HEAD = ("head.", "head_dist.", "fc_norm.", "attn_pool.")  # a ViT's classifier parts: not the encoder
SUPPORTED = "a ViT (vit_*, deit_*) or a convolutional network (resnet*, convnext*, regnet*, efficientnet*)"


def timm_spec(name: str, **model_args) -> BackboneSpec:
    """The spec of timm model ``name`` (``timm:NAME`` or ``NAME``, with or without a pretrained
    tag). ``model_args`` go to ``timm.create_model`` (e.g. ``depth=2``, ``img_size=64`` for small
    test models; a card records only the name, so models made with them are for the Python API)."""
    return _timm_spec(name[len(PREFIX):] if name.startswith(PREFIX) else name, tuple(sorted(model_args.items())))


@lru_cache(maxsize=64)
def _timm_spec(arch: str, model_args: tuple) -> BackboneSpec:
    if not arch or not timm.is_model(arch):
        raise EngineError(f"unknown timm model {arch!r}",
                          hint="list timm's names with: python -c \"import timm; print(timm.list_models('vit_*'))\" "
                               "(a pattern such as 'resnet*'), and pass --backbone timm:NAME")
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **dict(model_args))
    except Exception as exc:  # noqa: BLE001 - an unknown pretrained tag, bad arguments, …
        raise EngineError(f"timm cannot build {arch!r}: {type(exc).__name__}: {exc}",
                          hint="check the name and pretrained tag with timm.list_models(pretrained=True)") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    in_chans = int(cfg.get("input_size", (3,))[0])
    licence = cfg.get("license") or "see the model card"
    common = dict(
        bands=RGB if in_chans == 3 else tuple(f"BAND_{i + 1}" for i in range(in_chans)),
        mean=tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))[:in_chans],
        std=tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))[:in_chans],
        hub_repo=cfg.get("hf_hub_id") or f"timm/{arch}", hub_file="model.safetensors",
        licence=licence, weights_licence=licence)
    if is_vit(model):
        problem = vit_problem(model)
        if problem:
            raise EngineError(f"timm model {arch!r} is a ViT GeoPEFT cannot adapt ({problem})",
                              hint=f"choose {SUPPORTED}")
        depth, dim = len(model.blocks), int(model.embed_dim)
        return BackboneSpec(PREFIX + arch, "timm", dim, depth, int(model.blocks[0].attn.num_heads),
                            int(model.patch_embed.patch_size[0]), spaced_layers(depth),
                            options=(("model", arch), ("kind", "vit"), ("kwargs", model_args)), **common)
    info = getattr(model, "feature_info", None) or []
    if len(info) < 4:
        raise EngineError(f"timm model {arch!r} offers {len(info)} feature levels; GeoPEFT needs four",
                          hint=f"choose {SUPPORTED}")
    levels = tuple(range(len(info) - 4, len(info)))
    with torch.device("meta"):
        net = feature_net(arch, in_chans, levels, dict(model_args))
    channels, strides = net.feature_info.channels(), net.feature_info.reduction()
    return BackboneSpec(PREFIX + arch, "timm", int(channels[-1]), len(info), 1, int(max(strides)), levels,
                        options=(("model", arch), ("kind", "cnn"), ("kwargs", model_args),
                                 ("first_conv", cfg.get("first_conv") or "")), **common)


def spaced_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks ending with the last, as the Prithvi specs take them (12 blocks:
    2, 5, 8, 11; 24: 5, 11, 17, 23)."""
    return tuple(max(0, math.ceil(depth * k / 4) - 1) for k in (1, 2, 3, 4))


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def vit_problem(model: nn.Module) -> str | None:
    """Why a timm ViT cannot be used here (None: it can)."""
    if type(model) is not VisionTransformer:
        return f"{type(model).__name__} adds tokens or layers of its own"
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed) or type(pe.proj) is not nn.Conv2d or pe.proj.kernel_size != pe.proj.stride \
            or pe.patch_size[0] != pe.patch_size[1]:
        return "not a square convolutional patch embedding"
    if model.num_prefix_tokens != int(model.cls_token is not None) + int(model.num_reg_tokens or 0):
        return "prefix tokens other than CLS and registers"
    for block in model.blocks:
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
            return "blocks without a fused q, k, v projection of the model's width"
    return None


class TimmViT(ViTBlocks, nn.Module):
    """A timm ``VisionTransformer``'s encoder: ``forward`` gives the outputs of the spec's four
    feature layers as images [B, D, H/p, W/p]; ``forward_features`` every block's tokens (prefix
    tokens first; the last block's after the final norm)."""

    lora_targets = r"blocks\.\d+\.(attn\.qkv\.[qv]|mlp\.(fc1|fc1_g|fc1_x|fc2))"
    methods = ("lora", "dora", "vpt", "vit-adapter", "full", "linear-probe")
    first_layer_key = "patch_embed.proj.weight"
    optional_keys = ()

    def __init__(self, spec: BackboneSpec, in_chans: int, img_size: int):
        super().__init__()
        arch = spec.option("model")
        vit = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans,
                                **dict(spec.option("kwargs", ())))
        problem = vit_problem(vit)
        if problem:
            raise EngineError(f"timm model {arch!r} is a ViT GeoPEFT cannot adapt ({problem})",
                              hint=f"choose {SUPPORTED}")
        self.spec = spec
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_frames = 1
        self.patch_embed = vit.patch_embed
        keep_fp32(self.patch_embed.proj)
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        for block in self.blocks:  # the same maths as the fused projection (merge fuses it back)
            fused = block.attn.qkv
            split = SplitQKV(fused.in_features, bias=fused.bias is not None)
            with torch.no_grad():
                for part, w in zip((split.q, split.k, split.v), fused.weight.chunk(3)):
                    part.weight.copy_(w)
                if fused.bias is not None:
                    for part, b in zip((split.q, split.k, split.v), fused.bias.chunk(3)):
                        part.bias.copy_(b)
            block.attn.qkv = split
        self.no_embed_class = bool(vit.no_embed_class)
        self.num_prefix = int(vit.num_prefix_tokens)
        self.pos_grid = tuple(int(n) for n in vit.patch_embed.grid_size)  # the grid pos_embed is laid out for
        self.embed_dim = int(vit.embed_dim)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid = (img_size // self.patch_size, img_size // self.patch_size)
        self.feature_layers = tuple(spec.feature_layers)
        self.out_channels = [self.embed_dim] * len(self.feature_layers)
        self.strides = [self.patch_size] * len(self.feature_layers)
        self.chip_multiple = self.patch_size
        self.adapter: nn.Module | None = None  # ViT-Adapter (engine.tuning.vit_adapter)
        self.prompts: nn.Parameter | None = None  # VPT (add_prompts)

    def positions(self, h: int, w: int) -> torch.Tensor | None:
        """The learned positions for an h × w token grid: as published on the pretrained grid,
        else resampled bicubically (without antialiasing, so an export runs it as an ONNX Resize)."""
        pos = self.pos_embed
        if pos is None or (h, w) == self.pos_grid:
            return pos
        n = 0 if self.no_embed_class else self.num_prefix
        gh, gw = self.pos_grid
        with torch.autocast(device_type=pos.device.type, enabled=False):
            grid = pos[:, n:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)
        return torch.cat([pos[:, :n], grid], dim=1)

    def embed_tokens(self, x: torch.Tensor):
        """Patch tokens with positions, prefix tokens (CLS, registers) first, as timm's own
        forward makes them: ([B, prefix + h*w, D], prefix, (1, h, w))."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise EngineError(f"input of {height} x {width} px: {self.spec.name} needs sides that are multiples of "
                              f"its patch size {p}")
        grid = (height // p, width // p)
        # the built size as plain numbers (an exported model's reshape must not depend on traced sizes)
        h, w = self.grid if grid == self.grid else grid
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = self.patch_embed.norm(tokens)
        pos = self.positions(h, w)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            tokens = tokens if pos is None else tokens + pos
            tokens = torch.cat([*prefix, tokens], dim=1) if prefix else tokens
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) if prefix else tokens
            tokens = tokens if pos is None else tokens + pos
        return self.norm_pre(self.pos_drop(tokens)), self.num_prefix, (1, h, w)

    def tokens_to_image(self, tokens: torch.Tensor, prefix: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """The patch tokens (prefix tokens dropped) as [B, D, h, w] (D a number, not -1: an
        exported model must know its channels)."""
        _, h, w = grid
        return tokens[:, prefix:].reshape(tokens.shape[0], h, w, self.embed_dim).permute(0, 3, 1, 2)

def build_encoder(spec: BackboneSpec, band_names: list[str], img_size: int, num_frames: int = 1,
                  metadata: bool = False) -> nn.Module:
    if num_frames != 1 or metadata:
        raise EngineError(f"{spec.name} takes one date without date/location inputs",
                          hint="use one --image, or a Prithvi backbone for time series and metadata")
    if spec.option("kind") == "vit":
        return TimmViT(spec, len(band_names), img_size)
    return build_cnn(spec, len(band_names), spec.option("model"), dict(spec.option("kwargs", ())),
                     spec.option("first_conv") or None)


def encoder_state(state: dict, spec: BackboneSpec) -> dict:
    """A timm state dict of the spec's model (``timm.create_model(NAME).state_dict()``, the hub's
    ``model.safetensors``; any key prefix) as the encoder's keys: the classifier dropped, and for
    a ViT the fused q, k, v split."""
    if spec.option("kind") != "vit":
        return cnn_encoder_state(state, spec, spec.option("model"), tuple(spec.option("kwargs", ())),
                                 spec.option("first_conv") or "")
    state = select_prefix(state, TimmViT.first_layer_key, len(spec.bands))
    out = {}
    for k, v in state.items():
        if k.startswith(VIT_HEAD):
            continue
        if k.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            stem, kind = k.rsplit(".", 1)
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{stem}.{name}.{kind}"] = part.clone()
            continue
        out[k] = v
    return out
