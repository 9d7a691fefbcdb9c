"""The public backbone API (``engine.models.create_backbone``), every block's tokens, and the
Prithvi -TL temporal/location encoders, checked against computations written here from the
published key layout (fused qkv, fixed sin-cos positions) rather than with the engine's modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.models  # noqa: F401 - torchvision fix before timm
from engine.models import create_backbone
from engine.models.prithvi import sincos_1d, sincos_3d
from engine.models.registry import get_backbone_spec
from engine.protocol import EngineError
from tests.conftest import make_prithvi_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_prithvi_checkpoint(tmp_path_factory.mktemp("w") / "Prithvi_EO_V2_tiny_TL.pt", seed=3)
    state = torch.load(path, weights_only=True)
    state["encoder.temporal_embed_enc.scale"] = torch.tensor([0.37])  # distinct values: loaded, not left at init
    state["encoder.location_embed_enc.scale"] = torch.tensor([0.21])
    torch.save(state, path)
    return path, {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


def reference_tokens(enc: dict, x: torch.Tensor, heads: int, extra: torch.Tensor | None = None) -> list:
    """Every block's tokens from the raw published tensors: Conv3d patch embedding, fixed 3-D
    sin-cos positions (+ ``extra`` on the patch tokens), CLS, pre-norm blocks with the fused qkv,
    exact GELU, LayerNorm eps 1e-5; the last block's output after the final norm."""
    b, c, t, h, w = x.shape
    dim = enc["cls_token"].shape[-1]
    p = enc["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv3d(x, enc["patch_embed.proj.weight"], enc["patch_embed.proj.bias"], stride=(1, p, p))
    tokens = tokens.flatten(2).transpose(1, 2)
    pos = torch.from_numpy(np.asarray(sincos_3d(dim, (t, h // p, w // p)))).float()
    tokens = tokens + pos[:, 1:]
    if extra is not None:
        tokens = tokens + extra
    tokens = torch.cat([enc["cls_token"].expand(b, -1, -1) + pos[:, :1], tokens], dim=1)
    out = []
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("blocks."))
    for i in range(depth):
        g = lambda name: enc[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(tokens, (dim,), g("norm1.weight"), g("norm1.bias"), eps=1e-5)
        q, k, v = F.linear(y, g("attn.qkv.weight"), g("attn.qkv.bias")).reshape(b, -1, 3, heads, dim // heads) \
            .permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, dim)
        tokens = tokens + F.linear(y, g("attn.proj.weight"), g("attn.proj.bias"))
        y = F.layer_norm(tokens, (dim,), g("norm2.weight"), g("norm2.bias"), eps=1e-5)
        y = F.linear(F.gelu(F.linear(y, g("mlp.fc1.weight"), g("mlp.fc1.bias"))), g("mlp.fc2.weight"), g("mlp.fc2.bias"))
        tokens = tokens + y
        out.append(tokens)
    out[-1] = F.layer_norm(out[-1], (dim,), enc["norm.weight"], enc["norm.bias"], eps=1e-5)
    return out


def metadata_reference(values: np.ndarray, dim: int, scale: float) -> torch.Tensor:
    """(a, b) pairs → [sin-cos(a) in the first half | sin-cos(b) in the second] × scale (numpy, fp64)."""
    half = dim // 2
    flat = values.reshape(-1, 2)
    emb = np.concatenate([sincos_1d(half, flat[:, 0]), sincos_1d(dim - half, flat[:, 1])], axis=1) * scale
    return torch.from_numpy(emb.reshape(*values.shape[:-1], dim)).float()


def test_every_block_equals_the_reference_computation(checkpoint):
    path, enc = checkpoint
    model = create_backbone("prithvi_eo_v2_tiny", weights=path).eval()
    x = torch.randn(2, 6, 1, 64, 48)  # not the size it was built for: positions recomputed
    with torch.inference_mode():
        tokens = model.forward_features(x)
        expected = reference_tokens(enc, x, heads=3)
    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    assert len(tokens) == spec.depth
    for got, want in zip(tokens, expected):
        assert got.shape == (2, 1 + 4 * 3, spec.embed_dim)
        assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    assert model.temporal_embed_enc.scale.item() == pytest.approx(0.37)  # the TL scales load by key
    assert model.location_embed_enc.scale.item() == pytest.approx(0.21)


@pytest.mark.parametrize("frames", [1, 3])
def test_tl_encoders_with_and_without_coordinates(checkpoint, frames):
    """Year/day of year per frame and lat/lon per image, for 1 and 3 frames of a model pretrained
    on 1 frame (TerraTorch fails when the frame count differs from pretraining's)."""
    path, enc = checkpoint
    model = create_backbone("prithvi_eo_v2_tiny", weights=path).eval()
    x = torch.randn(2, 6, frames, 32, 32)
    dates = np.array([[[2020 + f, 100 + 30 * f] for f in range(frames)], [[2024, 5 + f] for f in range(frames)]],
                     np.float64)
    where = np.array([[46.2, 6.1], [-33.9, 151.2]])
    temporal = metadata_reference(dates, 192, 0.37).repeat_interleave(4, dim=1)  # each frame's 2 x 2 patches
    location = metadata_reference(where, 192, 0.21)[:, None]
    with torch.inference_mode():
        plain = model.forward_features(x)[-1]
        both = model.forward_features(x, torch.from_numpy(dates).float(), torch.from_numpy(where).float())[-1]
        expected = reference_tokens(enc, x, heads=3, extra=temporal + location)[-1]
        only_place = model.forward_features(x, location_coords=torch.from_numpy(where).float())[-1]
    assert both.shape == plain.shape == (2, 1 + frames * 4, 192)
    assert torch.allclose(both, expected, atol=2e-4)
    assert not torch.allclose(both, plain, atol=1e-3) and not torch.allclose(only_place, plain, atol=1e-3)


def test_a_four_frame_tl_model_takes_one_frame_with_coordinates():
    """TerraTorch divides by the pretraining frame count and fails here; the repeat must follow the
    input's frames."""
    model = create_backbone("prithvi_eo_v2_100", num_frames=4, img_size=32).eval()
    assert model.spec.frames == 4 and model.has_metadata
    with torch.inference_mode():
        out = model.forward_features(torch.randn(1, 6, 1, 32, 32), torch.tensor([[[2023.0, 200.0]]]),
                                     torch.tensor([[10.0, 20.0]]))
    assert out[-1].shape == (1, 1 + 4, 768) and torch.isfinite(out[-1]).all()


def test_coordinates_for_a_model_without_tl_encoders_are_refused():
    model = create_backbone("prithvi_eo_v2_300")  # not -TL
    assert not model.has_metadata
    with pytest.raises(EngineError, match="without temporal/location encoders"):
        model.forward_features(torch.randn(1, 6, 1, 32, 32), location_coords=torch.zeros(1, 2))


def test_segmentation_features_are_the_chosen_blocks_tokens(checkpoint):
    """``forward`` (what the decoders read) = ``forward_features`` at the spec's feature layers,
    CLS dropped, as images."""
    path, _ = checkpoint
    model = create_backbone("prithvi_eo_v2_tiny", weights=path, img_size=64).eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.inference_mode():
        maps, tokens = model(x), model.forward_features(x)
    for layer, image in zip(get_backbone_spec("prithvi_eo_v2_tiny").feature_layers, maps):
        assert torch.equal(image, tokens[layer][:, 1:].transpose(1, 2).reshape(2, 192, 4, 4))


def test_bands_by_name_and_unknown_names():
    model = create_backbone("prithvi_eo_v2_tiny", bands=["RED", "NIR_NARROW", "B11", "EXTRA"])
    assert model.patch_embed.proj.weight.shape[1] == 4
    with pytest.raises(EngineError, match="unknown backbone"):
        create_backbone("no_such_model")


@pytest.mark.parametrize("name,bands,size,blocks", [("clay_v1", ["B02", "B03", "B04", "705nm"], 32, 12),
                                                     ("decur_rn50_s2", None, 64, 4),
                                                     ("timm:vit_tiny_patch16_224", None, 32, 12)])
def test_create_backbone_builds_every_family(name, bands, size, blocks):
    """One API for every family: transformers give every block's tokens, a CNN its four stages."""
    model = create_backbone(name, bands=bands, img_size=size).eval()
    channels = len(bands) if bands else len(model.spec.bands) if hasattr(model, "spec") else 3
    with torch.inference_mode():
        out = model.forward_features(torch.randn(1, channels, size, size))
    assert len(out) == blocks and all(torch.isfinite(o).all() for o in out)
