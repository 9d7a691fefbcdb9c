"""Convolutional encoders: the SSL4EO-S12 / DeCUR ResNet-50 (family ``resnet``) and any timm CNN
(``timm:NAME``, via ``engine.models.timm_backbones``), built as timm's own ``features_only``
extractor so the state-dict keys are the published ones (torchvision/timm ``resnet50``:
``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` … ``layer4.2.bn3.*``; no ``fc``).

- ``forward`` returns the last four feature levels (a ResNet's layer1…layer4 at strides 4, 8,
  16, 32: already a pyramid, so the segmentor feeds them straight to the decoder).
- The stem convolution runs in fp32 even under bf16 autocast (``FP32Conv2d``): torch 2.13's
  CPU bf16 convolution with a big kernel (7 × 7) and ≥ 6 input channels returns wrong values.
- While the backbone is frozen (LoRA, DoRA, linear probe) its BatchNorm layers stay in eval
  mode: their running statistics belong to the pretrained weights, and would otherwise drift
  with every training batch without being saved with the adapters. With ``full`` fine-tuning
  they train (and are saved) as usual.
- Tuning: LoRA/DoRA (peft's Conv2d adapters), full fine-tuning or a linear probe; VPT and the
  ViT-Adapter need a transformer and are refused.

Input normalisation: every backbone gets the input standardised with the user's own training
statistics (``engine.data.chips.band_statistics``); the published pretraining statistics in the
registry are kept for reference (see the DeCUR entry in ``engine.models.registry``).
"""
from __future__ import annotations

import re
from functools import lru_cache

import timm
import torch
from timm.models import FeatureListNet
from torch import nn

from engine.models.registry import BackboneSpec
from engine.protocol import EngineError

# LoRA on a ResNet: the convolutions of every residual block (a bottleneck's 1×1 reduce, 3×3 and
# 1×1 expand, ``conv1``-``conv3``; a basic block's two 3×3) - where nearly all of the weights
# and the computation are, as q, v and the MLP are in a ViT. Not the stem (it is the band-
# adapted layer, trained only when bands are fresh) nor the 1×1 ``downsample`` shortcuts (one per
# stage, a projection only).
RESNET_LORA_TARGETS = r"layer\d+\.\d+\.conv\d"
CNN_METHODS = ("lora", "dora", "full", "linear-probe")


class FP32Conv2d(nn.Conv2d):
    """A Conv2d that always computes in fp32, even under autocast (same parameters and keys):
    torch 2.13's CPU bf16 convolution with a big kernel (a ResNet's 7 × 7 stem, a ViT's 16 × 16
    patch embedding) and ≥ 6 input channels returns wrong values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def keep_fp32(conv: nn.Module) -> nn.Module:
    """Make a plain ``nn.Conv2d`` an ``FP32Conv2d`` in place (other layer types are left as
    they are)."""
    if type(conv) is nn.Conv2d:
        conv.__class__ = FP32Conv2d
    return conv


class CNNEncoder(nn.Module):
    """The modules of a timm ``FeatureListNet`` (the same objects and names, so the same keys),
    run in order, returning the outputs of its return layers: the last four feature levels.

    ``out_channels``/``strides`` from timm's ``feature_info``; ``chip_multiple`` is the largest
    stride. Strides other than 4, 8, 16, 32 (a network with a stride-2 level among its last four,
    or a dilated one) are kept as they are: the pyramid decoders resize each level to the next
    finer one, so they read any increasing strides."""

    methods = CNN_METHODS
    optional_keys = ()

    def __init__(self, net: nn.Module, spec: BackboneSpec, in_chans: int, first_layer_key: str | None):
        super().__init__()
        if str(getattr(net, "output_fmt", "NCHW")).split(".")[-1] != "NCHW":
            raise EngineError(f"{spec.name} gives {net.output_fmt} feature maps; GeoPEFT reads NCHW maps only",
                              hint="choose a convolutional timm model (resnet*, convnext*, regnet*, efficientnet*)")
        for name, module in net.items():
            self.add_module(name, module)
        self.return_layers = dict(net.return_layers)
        info = net.feature_info
        self.out_channels = list(info.channels())
        self.strides = list(info.reduction())
        if len(self.out_channels) != 4:
            raise EngineError(f"{spec.name} gives {len(self.out_channels)} feature levels; the decoders need four")
        self.chip_multiple = max(self.strides)
        # the last map's stride and width, as a ViT's patch size and width (what embed reads)
        self.patch_size, self.embed_dim = self.strides[-1], self.out_channels[-1]
        self.spec = spec
        self.in_chans = in_chans
        self.first_layer_key = first_layer_key
        if first_layer_key:
            keep_fp32(self.get_submodule(first_layer_key.rsplit(".", 1)[0]))
        self.lora_targets = lora_targets_of(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' feature maps (a CNN has no tokens): what ``forward`` returns."""
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, module in self.named_children():
            x = module(x)
            if name in self.return_layers:
                out.append(x)
        return out

    def train(self, mode: bool = True) -> CNNEncoder:
        super().train(mode)
        if mode:  # frozen BatchNorm keeps its pretrained statistics (module docstring)
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and \
                        not any(p.requires_grad for p in m.parameters(recurse=False)):
                    m.eval()
        return self


def feature_net(arch: str, in_chans: int, levels: tuple[int, ...], kwargs: dict) -> nn.Module:
    """timm's features_only extractor of ``arch`` (random weights, nothing downloaded) as a
    ``FeatureListNet``: timm's own where it makes one, else one over the plain model (for the
    EfficientNet/MobileNet families, whose own extractor classes run the same modules in order)."""
    try:
        net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=levels, in_chans=in_chans,
                                **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds for a model it cannot build this way
        raise EngineError(f"timm cannot build {arch!r} as a feature extractor: {type(exc).__name__}: {exc}",
                          hint="choose a convolutional timm model (resnet*, convnext*, regnet*, efficientnet*) "
                               "or a ViT (vit_*)") from None
    if isinstance(net, FeatureListNet):
        return net
    if type(net).__name__ in ("EfficientNetFeatures", "MobileNetV3Features"):
        model = timm.create_model(arch, pretrained=False, in_chans=in_chans, **kwargs)
        return FeatureListNet(model, out_indices=levels, flatten_sequential=True)
    raise EngineError(f"timm's feature extractor for {arch!r} ({type(net).__name__}) is not supported",
                      hint="choose a convolutional timm model (resnet*, convnext*, regnet*, efficientnet*) "
                           "or a ViT (vit_*)")


def lora_targets_of(encoder: nn.Module) -> str:
    """A ResNet's residual-block convolutions (``RESNET_LORA_TARGETS``); for other CNNs every
    dense (not grouped or depthwise) convolution and Linear layer except the stem's."""
    names = [n for n, _ in encoder.named_modules()]
    if any(re.fullmatch(RESNET_LORA_TARGETS, n) for n in names):
        return RESNET_LORA_TARGETS
    stem = encoder.first_layer_key.rsplit(".", 1)[0] if encoder.first_layer_key else None
    dense = [n for n, m in encoder.named_modules() if n != stem and
             (isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1)]
    return "(" + "|".join(re.escape(n) for n in dense) + ")"


def build_cnn(spec: BackboneSpec, in_chans: int, arch: str, kwargs: dict, first_conv: str | None) -> CNNEncoder:
    net = feature_net(arch, in_chans, tuple(spec.feature_layers), kwargs)
    return CNNEncoder(net, spec, in_chans, first_layer_in(net.state_dict(), first_conv))


def first_layer_in(keys, first_conv: str | None) -> str | None:
    """The encoder's key of timm's ``first_conv`` weight (its name may be flattened: ``stem_0``)."""
    if not first_conv:
        return None
    return normalised(keys).get(_norm(first_conv + ".weight"))


def _norm(key: str) -> str:
    return key.replace("_", ".")


def normalised(keys) -> dict[str, str]:
    """Keys by their name with ``_`` read as ``.``: timm's feature extractors flatten nested
    containers (``stages.0`` becomes ``stages_0``), this maps the plain model's names to theirs."""
    return {_norm(k): k for k in keys}


def select_prefix(state: dict[str, torch.Tensor], anchor: str, channels: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors under the key prefix (``module.``, ``backbone.``, ``model.encoder.``, …) whose
    ``anchor`` (the first layer's weight) heads the most keys, with the prefix removed. Between
    equally good prefixes (the DeCUR joint file's ``module.backbone_1.`` SAR and
    ``module.backbone_2.`` optical backbones), the one whose first layer takes ``channels``
    bands. No anchor anywhere: ``state`` as it is (the strict check then says what is wrong)."""
    prefixes = [k[: -len(anchor)] for k in state if k == anchor or k.endswith("." + anchor)]
    if not prefixes:
        return dict(state)

    def score(prefix: str) -> tuple[int, bool]:
        w = state[prefix + anchor]
        return (sum(k.startswith(prefix) for k in state),
                channels is not None and w.ndim > 1 and w.shape[1] == channels)

    best = max(prefixes, key=score)
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


@lru_cache(maxsize=32)
def _key_sets(arch: str, in_chans: int, levels: tuple[int, ...], kwargs: tuple) -> tuple[frozenset, frozenset]:
    """(the plain timm model's keys, the feature extractor's keys), built on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, in_chans=in_chans, **dict(kwargs))
        net = feature_net(arch, in_chans, levels, dict(kwargs))
    return frozenset(model.state_dict()), frozenset(net.state_dict())


def cnn_encoder_state(state: dict[str, torch.Tensor], spec: BackboneSpec, arch: str, kwargs: tuple,
                      first_conv: str) -> dict[str, torch.Tensor]:
    """A timm/torchvision state dict of ``arch`` (any key prefix; a classifier head or ``fc``
    included or not) as the encoder's keys: tensors of the feature extractor renamed to its keys,
    the parts of the plain model it leaves out (head, final convolution and norm) dropped,
    anything else kept (so the strict check reports it)."""
    if first_conv:
        state = select_prefix(state, first_conv + ".weight", len(spec.bands))
    model_keys, net_keys = _key_sets(arch, len(spec.bands), tuple(spec.feature_layers), kwargs)
    ours = normalised(net_keys)
    out = {}
    for k, v in state.items():
        if _norm(k) in ours:
            out[ours[_norm(k)]] = v
        elif k not in model_keys:
            out[k] = v
    return out


def build_encoder(spec: BackboneSpec, band_names: list[str], img_size: int, num_frames: int = 1,
                  metadata: bool = False) -> CNNEncoder:
    if num_frames != 1 or metadata:
        raise EngineError(f"{spec.name} takes one date without date/location inputs",
                          hint="use one --image, or a Prithvi backbone for time series and metadata")
    return build_cnn(spec, len(band_names), spec.option("model", "resnet50"), dict(spec.option("kwargs", ())),
                     "conv1")


def encoder_state(state: dict, spec: BackboneSpec) -> dict:
    """A DeCUR/SSL4EO ResNet-50 checkpoint (the backbone file, a ``module.``/``backbone.``-prefixed
    one, or the joint SAR-MS file) as the encoder's keys; ``fc.*`` dropped."""
    return cnn_encoder_state(state, spec, spec.option("model", "resnet50"), tuple(spec.option("kwargs", ())),
                             "conv1")
