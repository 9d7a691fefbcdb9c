"""Backbone, checkpoint loading, tuning and merging."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.models  # noqa: F401 - torchvision fix before timm
from engine.models.checkpoints import load_backbone_weights, prithvi_encoder_state, read_state_dict
from engine.models.prithvi import sincos_3d
from engine.models.registry import BACKBONES, get_backbone_spec
from engine.models.segmentor import build_segmentor
from engine.protocol import EngineError, Reporter
from engine.tuning import TuningConfig, apply_tuning, count_parameters, merge, trainable_state_dict
from tests.conftest import make_prithvi_checkpoint, step_and_export

HLS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]


def test_sincos_positions_follow_prithvi_layout():
    pos = sincos_3d(192, (1, 4, 4))[0].numpy()
    assert pos.shape == (17, 192)
    assert np.all(pos[0] == 0)  # CLS row
    # width part (first 72 dims) depends on the column only; height part (next 72) on the row only
    grid = pos[1:].reshape(4, 4, 192)
    assert np.allclose(grid[0, :, :72], grid[3, :, :72]) and not np.allclose(grid[:, 0, :72], grid[:, 3, :72])
    assert np.allclose(grid[:, 0, 72:144], grid[:, 3, 72:144])
    assert np.allclose(grid[..., 144:], grid[0, 0, 144:])  # one frame: temporal part constant
    assert np.allclose(grid[0, 1, :36], np.sin(1.0 / 10000 ** (np.arange(36) / 36)))


@pytest.mark.parametrize("layout", ["mae", "flat"])
def test_published_layouts_load_strictly_and_split_qkv(tmp_path, layout):
    path = make_prithvi_checkpoint(tmp_path / "w.pt", layout=layout)
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    model = build_segmentor(spec, 6, 64, 3)
    loaded = load_backbone_weights(model.encoder, spec, path, HLS, Reporter("quiet"))
    assert loaded.matched_bands == {b: i for i, b in enumerate(HLS)} and not loaded.fresh_bands
    raw = torch.load(path, weights_only=True)
    prefix = "encoder." if layout == "mae" else ""
    fused = raw[f"{prefix}blocks.3.attn.qkv.weight"]
    block = model.encoder.blocks[3].attn.qkv
    assert torch.equal(torch.cat([block.q.weight, block.k.weight, block.v.weight]), fused)
    # the split projection computes exactly what the fused one did
    x = torch.randn(2, 5, 192)
    expected = torch.nn.functional.linear(x, fused, raw[f"{prefix}blocks.3.attn.qkv.bias"])
    assert torch.allclose(block(x), expected, atol=1e-6)
    assert loaded.sha256 and len(loaded.sha256) == 64


def test_bands_matched_by_name_and_unknown_bands_start_fresh(tmp_path):
    path = make_prithvi_checkpoint(tmp_path / "w.pt")
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    model = build_segmentor(spec, 3, 64, 2)
    fresh = model.encoder.patch_embed.proj.weight.detach().clone()
    reporter = Reporter("quiet")
    loaded = load_backbone_weights(model.encoder, spec, path, ["B12", "B4", "thermal"], reporter)
    w = model.encoder.patch_embed.proj.weight
    src = prithvi_encoder_state(read_state_dict(path))["patch_embed.proj.weight"]
    assert torch.equal(w[:, 0], src[:, 5]) and torch.equal(w[:, 1], src[:, 2])  # SWIR_2, RED
    assert torch.equal(w[:, 2], fresh[:, 2])
    assert loaded.fresh_bands == ["thermal"]
    assert any("thermal" in m for m in reporter.warnings)


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    model = build_segmentor(spec, 6, 64, 2)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EngineError, match="cannot read checkpoint"):
        load_backbone_weights(model.encoder, spec, bad, HLS, Reporter("quiet"))
    other = make_prithvi_checkpoint(tmp_path / "100m.pt", backbone="prithvi_eo_v2_100")
    with pytest.raises(EngineError, match="does not fit backbone|does not match backbone"):
        load_backbone_weights(model.encoder, spec, other, HLS, Reporter("quiet"))


def test_patch_embedding_stays_fp32_under_bf16_autocast():
    """torch 2.13's CPU bf16 16×16 convolution is wrong; the layer must run in fp32."""
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    model = build_segmentor(spec, 6, 64, 2).eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.inference_mode():
        ref = model.encoder.patch_embed(x.unsqueeze(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encoder.patch_embed(x.unsqueeze(2))
            out = model(x)
    assert low.dtype == torch.float32 and torch.allclose(low, ref)
    full = model(x)
    assert (out.float() - full).abs().max() / full.abs().max() < 0.1  # bf16 elsewhere, still close


def test_lora_trains_adapters_only_and_merges_exactly(tmp_path):
    path = make_prithvi_checkpoint(tmp_path / "w.pt")
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    model = build_segmentor(spec, 6, 64, 3)
    load_backbone_weights(model.encoder, spec, path, HLS, Reporter("quiet"))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    apply_tuning(model, TuningConfig("lora"))
    counts = count_parameters(model)
    lora_names = [n for n, p in model.named_parameters() if "lora_" in n]
    # r16 on q, v, fc1, fc2 of 12 blocks of width 192 (mlp 768)
    assert counts["adapter"] == 12 * 16 * ((192 + 192) * 2 + (192 + 768) * 2)
    assert all(any(t in n for t in ("qkv.q", "qkv.v", "fc1", "fc2")) for n in lora_names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 6, 64, 64)), torch.randint(0, 3, (2, 64, 64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.encoder.state_dict()
    for k, v in before.items():  # every pretrained tensor is untouched (peft renames to base_layer)
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], v), k
    assert any(not torch.all(p == 0) for n, p in model.named_parameters() if "lora_B" in n)
    saved = trainable_state_dict(model)
    assert not any("base_layer" in k or k.startswith("encoder.blocks") and "lora_" not in k for k in saved)
    model.eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.inference_mode():
        y = model(x)
        merged = merge(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(x), y, atol=1e-4)


@pytest.mark.parametrize("method,frozen_encoder", [("linear-probe", True), ("full", False), ("dora", True)])
def test_other_tuning_methods(method, frozen_encoder):
    model = apply_tuning(build_segmentor("prithvi_eo_v2_tiny", 6, 64, 2), TuningConfig(method))
    base = [p for n, p in model.encoder.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base) == frozen_encoder
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_unknown_names_are_refused():
    with pytest.raises(EngineError, match="unknown backbone"):
        get_backbone_spec("resnet9000")
    with pytest.raises(EngineError, match="unknown tuning"):
        apply_tuning(build_segmentor("prithvi_eo_v2_tiny", 6, 64, 2), TuningConfig("magic"))
    with pytest.raises(EngineError, match="chip size"):
        build_segmentor("prithvi_eo_v2_tiny", 6, 100, 2)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_specs_are_consistent(name):
    spec = BACKBONES[name]
    assert spec.embed_dim % spec.num_heads == 0
    assert len(spec.feature_layers) == 4 and max(spec.feature_layers) == spec.depth - 1
    assert len(spec.bands) == len(spec.mean) == len(spec.std)


@pytest.mark.parametrize("decoder", ["unet", "upernet", "fcn", "linear"])
@pytest.mark.parametrize("method", ["lora", "dora", "vpt", "vit-adapter", "linear-probe", "full"])
def test_every_method_and_decoder_trains_a_step_and_exports(tmp_path, method, decoder):
    """Each tuning method × decoder: logits at the input's size, a step changes what trains and
    only that, and the merged model exports to ONNX with the PyTorch outputs."""
    model = apply_tuning(build_segmentor("prithvi_eo_v2_tiny", 6, 32, 3, decoder, method=method), TuningConfig(method))
    step_and_export(model, tmp_path, 6)


@pytest.mark.parametrize("name", ["prithvi_eo_v2_100", "prithvi_eo_v2_300"])
@pytest.mark.parametrize("method", ["lora", "dora", "vpt", "vit-adapter", "linear-probe"])
def test_trainable_encoder_parameters_follow_closed_formulas(name, method):
    """Trainable encoder parameters of ViT-B- (100M) and 300M-shaped backbones: LoRA
    r(d_in + d_out) on q, v (D -> D) and fc1, fc2 (D <-> 4D) of every block; DoRA adds a magnitude
    per output (D, D, 4D, D); VPT depth x tokens x D; a linear probe none; the ViT-Adapter its
    modules (see ``vit_adapter`` below; independent of depth and heads)."""
    spec = get_backbone_spec(name)
    if method == "vit-adapter":  # the adapter is built with the model; on meta: only shapes count
        with torch.device("meta"):
            model = apply_tuning(build_segmentor(spec, 6, 32, 2, method=method), TuningConfig(method))
    else:
        model = apply_tuning(build_segmentor(spec, 6, 32, 2), TuningConfig(method))
    d, depth, r = spec.embed_dim, spec.depth, 16
    lora = depth * r * (2 * (d + d) + 2 * (d + 4 * d))
    expected = {"lora": lora, "dora": lora + depth * (d + d + 4 * d + d), "vpt": depth * 100 * d,
                "vit-adapter": vit_adapter(d, bands=6), "linear-probe": 0}[method]
    trainable = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert trainable == expected


def vit_adapter(d: int, bands: int, w: int = 64) -> int:
    """The ViT-Adapter's parameters for width D, from its architecture (engine.tuning.vit_adapter):
    attention width a = D/2, ConvFFN hidden f = D/4, spatial prior widths w, 2w, 4w, 4w."""
    a, f = d // 2, d // 4
    spatial_prior = (9 * bands * w + 9 * w * w + 9 * w * w  # stem: three 3x3 convolutions (no bias)
                     + 9 * w * 2 * w + 9 * 2 * w * 4 * w + 9 * 4 * w * 4 * w  # 1/8, 1/16, 1/32: 3x3 stride 2
                     + 2 * (3 * w + 2 * w + 4 * w + 4 * w)  # their six BatchNorms (weight, bias)
                     + (w + 2 * w + 4 * w + 4 * w) * d + 4 * d)  # 1x1 projections to D (with bias)
    level_embed = 3 * d
    attention = 3 * (d * a + a) + a * d + d  # q, k, v: D -> a; out: a -> D
    conv_ffn = d * f + f + 9 * f + f + f * d + d  # Linear, 3x3 depthwise (with bias), Linear
    injector = 2 * 2 * d + attention + d  # query and feature LayerNorms, attention, gamma
    extractor = 3 * 2 * d + attention + conv_ffn  # query, feature and FFN LayerNorms
    interactions = 4 * injector + (4 + 2) * extractor  # four interactions, the last with two extra extractors
    up = 2 * 2 * d * d + d  # 2x2 stride-2 transposed convolution 1/8 -> 1/4
    output_norms = 4 * 2 * d  # BatchNorm of each level
    return spatial_prior + level_embed + interactions + up + output_norms


def test_vpt_prompts_change_the_features_and_leave_their_layout():
    """Deep prompts enter each block and leave it: same token layout as without; with the prompts
    zeroed-out of attention (a model without them) the features differ."""
    plain = build_segmentor("prithvi_eo_v2_tiny", 6, 32, 2).eval()
    prompted = apply_tuning(build_segmentor("prithvi_eo_v2_tiny", 6, 32, 2), TuningConfig("vpt", prompt_tokens=7))
    prompted.load_state_dict(plain.state_dict(), strict=False)
    prompted.eval()
    x = torch.randn(1, 6, 32, 32)
    with torch.inference_mode():
        a, b = plain.encoder.forward_features(x), prompted.encoder.forward_features(x)
    assert prompted.encoder.prompts.shape == (12, 7, 192)
    assert [t.shape for t in a] == [t.shape for t in b] == [(1, 5, 192)] * 12
    assert not torch.allclose(a[-1], b[-1], atol=1e-4)
