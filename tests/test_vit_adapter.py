"""The ViT-Adapter (engine.tuning.vit_adapter) around a frozen ViT: the ViT starts unchanged,
the pyramid's shapes and strides for any patch and chip, gradients, ONNX export, bf16, one date."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import engine.models  # noqa: F401 - torchvision fix before timm
from engine.models.checkpoints import load_backbone_weights
from engine.models.registry import get_backbone_spec
from engine.models.segmentor import Probabilities, build_segmentor
from engine.protocol import EngineError, Reporter
from engine.tuning import TuningConfig, apply_tuning, count_parameters, merge, trainable_state_dict
from engine.tuning.vit_adapter import ViTAdapter, interaction_groups
from tests.conftest import make_prithvi_checkpoint

TINY = get_backbone_spec("prithvi_eo_v2_tiny")
HLS = list(TINY.bands)


def adapted(spec=TINY, chip: int = 64, decoder: str = "unet", seed: int = 0):
    torch.manual_seed(seed)
    return apply_tuning(build_segmentor(spec, 6, chip, 3, decoder, method="vit-adapter"), TuningConfig("vit-adapter"))


def shake_gammas(model, std: float = 0.1) -> None:
    """Non-zero γ: the injectors then change the ViT's tokens (as after some training)."""
    with torch.no_grad():
        for interaction in model.encoder.adapter.interactions:
            interaction.injector.gamma.normal_(0.0, std)


def test_interactions_end_at_the_feature_layers():
    assert interaction_groups(12, (2, 5, 8, 11)) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert interaction_groups(24, (5, 11, 17, 23)) == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert interaction_groups(8, (0, 7)) == [(0, 2), (2, 4), (4, 6), (6, 8)]  # not four: split evenly


def test_frozen_vit_is_unchanged_at_initialisation(tmp_path):
    """γ = 0: the ViT's tokens after each group are the encoder's own features, to the bit, with
    published weights loaded after the adapter was built (its keys are not the checkpoint's)."""
    model = adapted()
    encoder = model.encoder
    loaded = load_backbone_weights(encoder, TINY, make_prithvi_checkpoint(tmp_path / "w.pt"), HLS, Reporter("quiet"))
    assert not loaded.fresh_bands
    encoder.eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        _, vit = encoder.adapter.interact(encoder, x)
        adapter, encoder.adapter = encoder.adapter, None
        plain = encoder(x)  # the encoder alone: its feature layers, the last after the final norm
        encoder.adapter = adapter
        assert len(vit) == len(plain) == 4
        for ours, own in zip(vit, plain):
            assert torch.equal(ours, own)
        shake_gammas(model)  # the injectors are wired in: with γ ≠ 0 the tokens move
        _, moved = encoder.adapter.interact(encoder, x)
    assert not torch.allclose(moved[0], plain[0])


@pytest.mark.parametrize("patch,depth,chip,size", [
    (16, 12, 64, (64, 64)),  # Prithvi tiny as registered
    (16, 12, 64, (64, 96)),  # a non-square input
    (8, 4, 64, (64, 96)),    # patch 8: the ViT grid at 1/8, resized to every level
    (14, 4, 56, (56, 70)),   # patch 14: sides not multiples of 32 (levels rounded up)
])
def test_pyramid_has_strides_4_8_16_32_for_any_patch(patch, depth, chip, size):
    spec = dataclasses.replace(TINY, patch_size=patch, depth=depth,
                               feature_layers=TINY.feature_layers if depth == 12 else tuple(range(depth)))
    model = adapted(spec, chip).eval()
    d = spec.embed_dim
    assert model.encoder.out_channels == [d] * 4 and model.encoder.strides == [4, 8, 16, 32]
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        maps = model.encoder(x)
        logits = model(x)
    h, w = size
    assert [tuple(m.shape) for m in maps] == [(2, d, math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]
    assert logits.shape == (2, 3, h, w)
    assert all(torch.isfinite(m).all() for m in maps)


def test_only_the_adapter_trains_and_the_frozen_backbone_gets_no_gradients():
    model = adapted()
    model.train()
    x = torch.randn(2, 6, 64, 64)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (2, 64, 64))).backward()
    for name, p in model.encoder.named_parameters():
        if name.startswith("adapter."):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    grads = {n: p.grad for n, p in model.encoder.adapter.named_parameters()}
    for name in ("spm.stem.0.weight", "level_embed", "interactions.0.injector.gamma",
                 "interactions.0.extractors.0.attn.q.weight", "interactions.3.extractors.2.ffn.dwconv.weight",
                 "up.weight", "norms.0.weight"):
        assert grads[name].abs().sum() > 0, name
    # γ = 0 at the start: the injectors' attention learns once γ has moved
    assert grads["interactions.0.injector.attn.q.weight"].abs().sum() == 0
    counts = count_parameters(model)
    adapter = sum(p.numel() for p in model.encoder.adapter.parameters())
    assert counts["adapter"] == adapter
    assert counts["trainable"] == adapter + sum(p.numel() for m in (model.neck, model.decoder) for p in m.parameters())
    saved = trainable_state_dict(model)
    assert "encoder.adapter.norms.0.running_mean" in saved and "encoder.adapter.spm.stem.1.running_var" in saved
    assert not any(k.startswith("encoder.blocks.") for k in saved)


def test_checkpointed_frozen_blocks_give_the_same_gradients():
    """The frozen blocks run checkpointed in training (engine.models.blocks): the adapter's
    gradients are those of the plain loop, to the bit."""
    from engine.models.blocks import checkpointing

    model = adapted()
    shake_gammas(model)
    model.train()
    x, y = torch.randn(2, 6, 64, 64), torch.randint(0, 3, (2, 64, 64))
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with checkpointing(enabled):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.encoder.adapter.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_onnx_export_with_dynamic_batch_equals_torch(tmp_path):
    import onnxruntime as ort

    model = adapted()
    shake_gammas(model)
    merged = Probabilities(merge(model)).eval()
    x = torch.randn(3, 6, 64, 64)
    path = tmp_path / "adapter.onnx"
    torch.onnx.export(merged, (x[:1],), str(path), input_names=["x"], output_names=["p"], opset_version=17,
                      dynamo=False, dynamic_axes={"x": {0: "batch"}, "p": {0: "batch"}})  # as engine.export does
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        with torch.inference_mode():
            expected = merged(x[:batch]).numpy()
        got = session.run(None, {"x": x[:batch].numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


def test_bf16_autocast_is_close_to_fp32():
    model = adapted()
    shake_gammas(model)
    model.eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        reference = model.encoder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encoder(x)
            logits = model(x)
    assert torch.isfinite(logits.float()).all()
    for ref, got in zip(reference, low):
        assert ((got.float() - ref).norm() / ref.norm()) < 3e-2


def test_more_than_one_date_is_refused_clearly():
    with pytest.raises(EngineError, match="one date"):
        build_segmentor(TINY, 12, 64, 2, method="vit-adapter", num_frames=2)
    encoder = adapted().encoder
    with pytest.raises(EngineError, match="one date"):
        encoder(torch.randn(1, 6, 2, 64, 64))  # [B, C, T, H, W] with two frames


def test_adapter_needs_a_vit_model_built_with_it():
    with pytest.raises(ValueError, match="vit-adapter"):
        apply_tuning(build_segmentor(TINY, 6, 64, 2), TuningConfig("vit-adapter"))
    assert isinstance(adapted().encoder.adapter, ViTAdapter)
