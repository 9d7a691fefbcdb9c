"""SSL4EO-S12 / DeCUR ResNet-50 and timm backbones (``timm:NAME``): published key layouts load
exactly, features equal independent references (torchvision, timm's own forward), bands adapt
by name, and every supported tuning method trains a step and exports to ONNX.

Cheap by construction: the ResNet-50 is built on the meta device (no initialisation) and only
its key layout and one 64 px forward are checked; tuning runs on timm resnet18 and a 4-block
ViT-Tiny at 64 px. Checkpoints are made here, nothing is downloaded."""
from __future__ import annotations

import math

import pytest
import torch

import engine.models  # noqa: F401 - torchvision fix before timm
import timm  # noqa: E402
from engine.models.checkpoints import load_backbone_weights  # noqa: E402
from engine.models.families import build_encoder, encoder_state, encoder_summary  # noqa: E402
from engine.models.registry import BAND_ALIASES, get_backbone_spec, is_backbone  # noqa: E402
from engine.models.resnet import FP32Conv2d  # noqa: E402
from engine.models.segmentor import build_segmentor  # noqa: E402
from engine.models.timm_backbones import timm_spec  # noqa: E402
from engine.protocol import EngineError, Reporter  # noqa: E402
from engine.tuning import TuningConfig, apply_tuning, merge  # noqa: E402
from tests.conftest import step_and_export  # noqa: E402

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
TINY_VIT = dict(depth=4)  # ViT-Tiny (width 192) with 4 blocks, positions at its 224 px grid


def meta_encoder(spec, bands, size=64):
    with torch.device("meta"):
        return build_encoder(spec, bands, size)


def synthetic_state(shapes: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of a ResNet state dict's shapes, scaled so activations stay moderate
    through 50 layers: He-scaled convolutions, BatchNorm near identity (the last of each block
    small, as zero-init residuals keep it), positive running variances."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in shapes.items():
        shape = tuple(t.shape)
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif k.endswith("running_mean") or k.endswith(".bias"):
            out[k] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BatchNorm weight
            out[k] = (1 + 0.1 * torch.randn(shape, generator=g)) * (0.2 if ".bn3." in k else 1.0)
        else:
            out[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[1] * math.prod(shape[2:])))
    return out


def decur_file(tmp_path, spec_name: str, prefix: str = "", meta: bool = True):
    """A DeCUR backbone file in its published layout (torchvision resnet50 keys, no ``fc``),
    optionally under a key prefix: meta tensors (keys and shapes only) or real values."""
    spec = get_backbone_spec(spec_name)
    shapes = meta_encoder(spec, list(spec.bands)).state_dict()
    state = shapes if meta else synthetic_state(shapes)
    path = tmp_path / f"{spec_name}{prefix.replace('.', '_')}{'_meta' if meta else ''}.pth"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path, state


def torchvision_features(state: dict, in_chans: int, x: torch.Tensor) -> list[torch.Tensor]:
    """layer1…layer4 of torchvision's own resnet50 given ``state``: the independent reference."""
    import torchvision

    with torch.device("meta"):
        ref = torchvision.models.resnet50()
        ref.conv1 = torch.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    ref = ref.to_empty(device="cpu")
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    ref.eval()
    out = []
    with torch.inference_mode():
        y = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            y = layer(y)
            out.append(y)
    return out


# --- SSL4EO-S12 / DeCUR ResNet-50 --------------------------------------------------------------

@pytest.mark.parametrize("name,prefix", [("decur_rn50_s2", ""), ("decur_rn50_s2", "module."),
                                         ("decur_rn50_s1", ""), ("decur_rn50_s1", "backbone.")])
def test_decur_files_load_key_exact(tmp_path, name, prefix):
    """The published backbone files (and prefixed copies) map onto the encoder's keys exactly:
    torchvision's resnet50 names, no fc, no key missing or left over."""
    spec = get_backbone_spec(name)
    path, shapes = decur_file(tmp_path, name, prefix)
    assert "conv1.weight" in shapes and "layer4.2.bn3.running_var" in shapes and not any("fc" in k for k in shapes)
    assert tuple(shapes["conv1.weight"].shape) == (64, len(spec.bands), 7, 7)
    encoder = meta_encoder(spec, list(spec.bands))
    raw = torch.load(path, weights_only=True)
    assert set(encoder_state(spec, raw)) == set(encoder.state_dict())
    loaded = load_backbone_weights(encoder, spec, path, list(spec.bands), Reporter("quiet"))  # strict
    assert loaded.matched_bands == {b: i for i, b in enumerate(spec.bands)} and not loaded.fresh_bands


def test_decur_joint_file_gives_each_spec_its_own_backbone(tmp_path):
    """The joint SAR-MS checkpoint holds both backbones (``module.backbone_1.`` SAR, 2 bands;
    ``module.backbone_2.`` MS, 13 bands) and projectors: each spec takes the one that fits."""
    s1, s2 = get_backbone_spec("decur_rn50_s1"), get_backbone_spec("decur_rn50_s2")
    joint = {**{f"module.backbone_1.{k}": v for k, v in meta_encoder(s1, list(s1.bands)).state_dict().items()},
             **{f"module.backbone_2.{k}": v for k, v in meta_encoder(s2, list(s2.bands)).state_dict().items()},
             "module.projector1.0.weight": torch.empty(8192, 2048, device="meta"),
             "module.bn.running_mean": torch.empty(8192, device="meta")}
    path = tmp_path / "rn50_ssl4eo-s12_joint_decur_ep100.pth"
    torch.save(joint, path)
    for spec in (s1, s2):
        state = encoder_state(spec, torch.load(path, weights_only=True))
        assert state["conv1.weight"].shape[1] == len(spec.bands)
        load_backbone_weights(meta_encoder(spec, list(spec.bands)), spec, path, list(spec.bands), Reporter("quiet"))


def test_decur_features_equal_torchvision_and_bands_adapt_by_name(tmp_path):
    """The loaded encoder's four maps are torchvision's resnet50 layer1…layer4 on the same
    weights; a 6-band raster named by its Sentinel-2 bands gets those bands' pretrained channels."""
    spec = get_backbone_spec("decur_rn50_s2")
    path, state = decur_file(tmp_path, "decur_rn50_s2", meta=False)
    encoder = meta_encoder(spec, S2).to_empty(device="cpu")
    loaded = load_backbone_weights(encoder, spec, path, S2, Reporter("quiet"))
    assert loaded.matched_bands == {b: i for i, b in enumerate(S2)}  # B8 → NIR_BROAD, B8A → NIR_NARROW
    assert encoder.strides == [4, 8, 16, 32] and encoder.out_channels == [256, 512, 1024, 2048]
    encoder.eval()
    x = torch.randn(1, 13, 64, 64)
    with torch.inference_mode():
        ours = encoder(x)
    for a, b in zip(ours, torchvision_features(state, 13, x)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)

    six = ["B2", "B3", "B4", "B8A", "B11", "B12"]
    small = meta_encoder(spec, six).to_empty(device="cpu")
    loaded = load_backbone_weights(small, spec, path, six, Reporter("quiet"))
    assert loaded.matched_bands == {"B2": 1, "B3": 2, "B4": 3, "B8A": 8, "B11": 11, "B12": 12}
    assert torch.equal(small.conv1.weight, state["conv1.weight"][:, [1, 2, 3, 8, 11, 12]])
    assert torch.equal(small.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_decur_s1_bands_by_name_and_s2_stem_stays_fp32_under_bf16(tmp_path):
    """S1 (VV, VH) channels follow the names, not the order; the 13-band 7×7 stem computes in
    fp32 under bf16 autocast (torch 2.13's CPU bf16 convolution of that shape is wrong), and the
    bf16 features stay close to fp32."""
    spec = get_backbone_spec("decur_rn50_s1")
    assert BAND_ALIASES["VV"] == "VV" and BAND_ALIASES["VH"] == "VH"
    path, state = decur_file(tmp_path, "decur_rn50_s1", meta=False)
    encoder = meta_encoder(spec, ["vh", "VV"]).to_empty(device="cpu")
    loaded = load_backbone_weights(encoder, spec, path, ["vh", "VV"], Reporter("quiet"))
    assert loaded.matched_bands == {"vh": 1, "VV": 0} and not loaded.fresh_bands
    assert torch.equal(encoder.conv1.weight, state["conv1.weight"][:, [1, 0]])

    s2 = get_backbone_spec("decur_rn50_s2")
    encoder = meta_encoder(s2, S2).to_empty(device="cpu")
    encoder.load_state_dict(synthetic_state(encoder.state_dict(), seed=1))
    encoder.eval()
    x = torch.randn(2, 13, 64, 64)
    with torch.inference_mode():
        stem, full = encoder.conv1(x), encoder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_stem, low = encoder.conv1(x), encoder(x)
    assert low_stem.dtype == torch.float32 and torch.equal(low_stem, stem)
    for a, b in zip(low, full):
        assert (a.float() - b).abs().max() / b.abs().max() < 0.1


def test_decur_specs_are_listed_with_their_facts():
    for name, chans in (("decur_rn50_s2", 13), ("decur_rn50_s1", 2)):
        spec = get_backbone_spec(name)
        assert spec.family == "resnet" and spec.hub_repo == "wangyi111/DeCUR" and spec.hub_file.endswith(".pth")
        assert len(spec.bands) == len(spec.mean) == len(spec.std) == chans
        encoder = meta_encoder(spec, list(spec.bands))
        assert round(encoder_summary(spec)[0] / 1e6, 1) == 23.5  # torchvision's resnet50 without its fc
        assert encoder.chip_multiple == spec.patch_size == 32 and spec.embed_dim == encoder.out_channels[-1]
        assert encoder.first_layer_key == "conv1.weight" and "vpt" not in encoder.methods


def test_resnet_lora_targets_the_block_convolutions_and_batchnorm_keeps_its_statistics():
    """LoRA adapts conv1-conv3 of every bottleneck (not the stem or the downsample shortcuts);
    a frozen backbone's BatchNorm statistics do not move in training, so the saved adapters
    are the whole change; the merged model computes what the adapted one did."""
    spec = get_backbone_spec("decur_rn50_s2")
    torch.manual_seed(0)
    model = build_segmentor(spec, 13, 64, 2, "linear")
    model.encoder.load_state_dict(synthetic_state(model.encoder.state_dict()))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    apply_tuning(model, TuningConfig("lora", rank=4, alpha=4))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.encoder.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 16 * 3 and all(n.split(".")[-1] in ("conv1", "conv2", "conv3") for n in adapted)
    assert not any("downsample" in n or n == "conv1" for n in adapted)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 13, 64, 64)), torch.randint(0, 2, (2, 64, 64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.encoder.state_dict()
    for k, v in before.items():  # weights and BatchNorm buffers alike (peft renames to base_layer)
        key = k if k in after else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[key], v), k
    model.eval()
    x = torch.randn(1, 13, 64, 64)
    with torch.inference_mode():
        y = model(x)
        assert torch.allclose(merge(model)(x), y, atol=1e-4)


# --- timm ViTs and CNNs ------------------------------------------------------------------------

def test_timm_specs_come_from_the_model_config_without_downloading():
    vit = get_backbone_spec("timm:vit_small_patch16_224")
    assert (vit.family, vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size) == ("timm", 384, 12, 6, 16)
    assert vit.feature_layers == (2, 5, 8, 11) and vit.bands == ("RED", "GREEN", "BLUE")
    assert vit.hub_repo.startswith("timm/vit_small_patch16_224") and vit.hub_file == "model.safetensors"
    assert round(encoder_summary(vit)[0] / 1e6, 1) == 21.7 and is_backbone("timm:vit_small_patch16_224")
    cnn = get_backbone_spec("timm:resnet50")
    assert cnn.feature_layers == (1, 2, 3, 4) and cnn.patch_size == 32 and cnn.embed_dim == 2048
    with pytest.raises(EngineError, match="unknown timm model 'no_such_net'") as err:
        get_backbone_spec("timm:no_such_net")
    assert "timm.list_models" in err.value.hint


@pytest.mark.parametrize("arch,args,size", [("vit_tiny_patch16_224", dict(depth=4, img_size=64), 64),
                                            ("vit_small_patch14_reg4_dinov2", dict(depth=1, img_size=56), 56)])
def test_timm_vit_state_dict_loads_key_exact_and_matches_timm(tmp_path, arch, args, size):
    """A timm ViT's own state dict (as the hub's model.safetensors holds it, and prefixed in a
    .pth) loads with no key missing or left over; the features are timm's own (CLS and register
    tokens first; the last block after the final norm)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, **args).eval()
    spec = timm_spec(f"timm:{arch}", **args)
    files = [tmp_path / "model.safetensors", tmp_path / "w.pth"]
    save_file(ref.state_dict(), str(files[0]))
    torch.save({f"model.{k}": v for k, v in ref.state_dict().items()}, files[1])
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        final, inter = ref.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC")
    for path in files:
        encoder = build_encoder(spec, ["red", "green", "blue"], size)
        assert isinstance(encoder.patch_embed.proj, FP32Conv2d)  # fp32 under bf16 autocast, as Prithvi's
        load_backbone_weights(encoder, spec, path, ["red", "green", "blue"], Reporter("quiet"))  # strict
        encoder.eval()
        with torch.inference_mode():
            tokens, maps = encoder.forward_features(x), encoder(x)
        assert len(tokens) == spec.depth
        for i, (spatial, prefix) in enumerate(inter):
            expected = final if i == spec.depth - 1 else torch.cat([prefix, spatial], dim=1)
            assert torch.allclose(tokens[i], expected, atol=1e-5), i
        grid = size // spec.patch_size
        for layer, m in zip(spec.feature_layers, maps):
            assert m.shape == (2, spec.embed_dim, grid, grid)
            assert torch.allclose(m.flatten(2).transpose(1, 2), tokens[layer][:, encoder.num_prefix:], atol=1e-6)
    # another chip size: the positions resampled bicubically as timm's resample_abs_pos_embed does
    # (without antialiasing, which ONNX cannot export; timm's dynamic-size models antialias)
    from timm.layers import resample_abs_pos_embed

    for side in (grid // 2, 2 * grid):
        expected = resample_abs_pos_embed(ref.pos_embed, (side, side), (grid, grid), antialias=False,
                                          num_prefix_tokens=0 if ref.no_embed_class else ref.num_prefix_tokens)
        assert torch.allclose(encoder.positions(side, side), expected, atol=1e-6)
    with torch.inference_mode():
        assert encoder(torch.randn(1, 3, 2 * size, 2 * size))[0].shape == (1, spec.embed_dim, 2 * grid, 2 * grid)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto", "mobilenetv3_small_050"])
def test_timm_cnn_state_dict_loads_key_exact_and_matches_timm(tmp_path, arch):
    """A timm CNN's own state dict (head included, under a ``module.`` prefix) loads strictly,
    also where timm's extractor renames modules (convnext's ``stages.0`` → ``stages_0``); the four
    maps are timm's own last four feature levels."""
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False).eval()
    spec = timm_spec(f"timm:{arch}")
    path = tmp_path / "w.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    encoder = build_encoder(spec, ["Red", "Green", "Blue"], 64)
    loaded = load_backbone_weights(encoder, spec, path, ["Red", "Green", "Blue"], Reporter("quiet"))
    assert loaded.matched_bands == {"Red": 0, "Green": 1, "Blue": 2}
    encoder.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ours = encoder(x)
        theirs = ref.forward_intermediates(x, indices=list(spec.feature_layers), intermediates_only=True)
    assert [m.shape[1] for m in ours] == encoder.out_channels and len(ours) == 4
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert [x.shape[-1] // m.shape[-1] for m in ours] == encoder.strides


def test_timm_fresh_bands_and_unsupported_methods(tmp_path):
    """RGB channels go to the raster's red, green and blue bands by name; a band beyond RGB starts
    fresh (with a warning). VPT and the ViT-Adapter are refused for a CNN with a clear error."""
    spec = timm_spec("timm:resnet18")
    ref = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    bands = ["B04", "B03", "B02", "B08"]
    encoder = build_encoder(spec, bands, 64)
    fresh = encoder.conv1.weight.detach().clone()
    reporter = Reporter("quiet")
    loaded = load_backbone_weights(encoder, spec, path, bands, reporter)
    assert loaded.matched_bands == {"B04": 0, "B03": 1, "B02": 2} and loaded.fresh_bands == ["B08"]
    assert torch.equal(encoder.conv1.weight[:, :3], ref.conv1.weight) and torch.equal(encoder.conv1.weight[:, 3],
                                                                                       fresh[:, 3])
    assert any("B08" in m for m in reporter.warnings)
    for method in ("vpt", "vit-adapter"):
        with pytest.raises(EngineError, match="does not suit"):
            build_segmentor(spec, 3, 64, 2, method=method)
    with pytest.raises(EngineError, match="does not suit"):
        apply_tuning(build_segmentor(spec, 3, 64, 2), TuningConfig("vpt"))


def _cases():
    cases = []
    for arch, methods in (("resnet18", ("lora", "dora", "full", "linear-probe")),
                          ("vit_tiny_patch16_224", ("lora", "dora", "vpt", "vit-adapter", "full", "linear-probe"))):
        cases += [(arch, m, d) for m in methods for d in ("unet", "linear")]
        cases += [(arch, "lora", d) for d in ("upernet", "fcn")]
    return cases


@pytest.mark.parametrize("arch,method,decoder", _cases())
def test_every_method_and_decoder_trains_a_step_and_exports(tmp_path, arch, method, decoder):
    """As tests/test_models.py for Prithvi: logits at the input's size, a step changes what
    trains and only that, and the merged model exports to ONNX with PyTorch's outputs (the ViT at
    64 px with its positions resampled from the 224 px grid)."""
    spec = timm_spec(f"timm:{arch}", **(TINY_VIT if arch.startswith("vit") else {}))
    torch.manual_seed(0)
    model = apply_tuning(build_segmentor(spec, 3, 64, 3, decoder, method=method),
                         TuningConfig(method, rank=4, alpha=4, prompt_tokens=5))
    changed, _, _ = step_and_export(model, tmp_path, 3, chip=64)
    if method in ("lora", "dora"):
        assert any("lora_" in n for n in changed)
