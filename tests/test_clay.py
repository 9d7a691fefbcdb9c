"""Clay v1 / v1.5: published checkpoint layout, features against a computation written here from
the raw published tensors (dynamic patch embedding, GSD-scaled sin-cos positions, bias-free fused
qkv blocks), bands by wavelength, every tuning method with a step and an ONNX export, bf16."""
from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import engine.models  # noqa: F401 - torchvision fix before timm
from engine.models.checkpoints import load_backbone_weights
from engine.models.clay import WaveEncoder
from engine.models.registry import get_backbone_spec
from engine.models.segmentor import build_segmentor
from engine.protocol import EngineError, Reporter
from engine.tuning import TuningConfig, apply_tuning, merge
from tests.conftest import step_and_export as shared_step_and_export

S2 = ["BLUE", "GREEN", "RED", "REDEDGE_1", "REDEDGE_2", "REDEDGE_3", "NIR_BROAD", "NIR_NARROW", "SWIR_1", "SWIR_2"]
S2_WAVES = [0.493, 0.56, 0.665, 0.704, 0.74, 0.783, 0.842, 0.865, 1.61, 2.19]
DIM, DEPTH, HEADS, P = 32, 4, 2, 8
TINY = replace(get_backbone_spec("clay_v1"), name="clay_tiny_test", embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
               feature_layers=(0, 1, 2, 3))


def published_encoder_shapes(dim: int, depth: int, patch: int) -> dict[str, tuple]:
    """The Clay encoder's tensors as the published code names them (``Encoder``: ``cls_token``,
    ``patch_embedding`` = DynamicEmbedding with a torch TransformerEncoder, ``transformer`` =
    vit-pytorch's simple ViT layers), written out by hand."""
    w, gen = 128, "patch_embedding.weight_generator."
    shapes = {"cls_token": (1, 1, dim),
              gen + "weight_tokens": (128, w), gen + "bias_token": (1, w),
              gen + "encoder.layers.0.self_attn.in_proj_weight": (3 * w, w),
              gen + "encoder.layers.0.self_attn.in_proj_bias": (3 * w,),
              gen + "encoder.layers.0.self_attn.out_proj.weight": (w, w),
              gen + "encoder.layers.0.self_attn.out_proj.bias": (w,),
              gen + "encoder.layers.0.linear1.weight": (2048, w), gen + "encoder.layers.0.linear1.bias": (2048,),
              gen + "encoder.layers.0.linear2.weight": (w, 2048), gen + "encoder.layers.0.linear2.bias": (w,),
              gen + "fc_weight.weight": (patch * patch * dim, w), gen + "fc_weight.bias": (patch * patch * dim,),
              gen + "fc_bias.weight": (dim, w), gen + "fc_bias.bias": (dim,),
              "patch_embedding.fclayer.l1.weight": (w, w), "patch_embedding.fclayer.l1.bias": (w,),
              "patch_embedding.fclayer.l2.weight": (w, w), "patch_embedding.fclayer.l2.bias": (w,),
              "transformer.norm.weight": (dim,), "transformer.norm.bias": (dim,)}
    for norm in ("norm1", "norm2"):
        shapes[gen + f"encoder.layers.0.{norm}.weight"] = shapes[gen + f"encoder.layers.0.{norm}.bias"] = (w,)
    for i in range(depth):
        s = f"transformer.layers.{i}."
        shapes.update({s + "0.norm.weight": (dim,), s + "0.norm.bias": (dim,), s + "0.to_qkv.weight": (3 * dim, dim),
                       s + "0.to_out.weight": (dim, dim), s + "1.net.0.weight": (dim,), s + "1.net.0.bias": (dim,),
                       s + "1.net.1.weight": (4 * dim, dim), s + "1.net.1.bias": (4 * dim,),
                       s + "1.net.3.weight": (dim, 4 * dim), s + "1.net.3.bias": (dim,)})
    return shapes


def random_encoder(dim: int, depth: int, patch: int, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values: LayerNorm weights near 1, other weights and biases small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in published_encoder_shapes(dim, depth, patch).items():
        t = torch.randn(shape, generator=g)
        norm = k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "net.0.weight"))
        out[k] = t if k == "cls_token" else 1 + 0.1 * t if norm else 0.02 * t
    return out


def save_checkpoint(path, enc: dict, layout: str = "lightning", hparams=None):
    """``lightning``: as ``clay-v1-base.ckpt`` / ``clay-v1.5.ckpt`` (``state_dict`` with the whole
    ClayMAE under ``model.``: encoder, MAE decoder, teacher, projection); ``bare``: the encoder's
    own tensors only."""
    if layout == "bare":
        torch.save(dict(enc), path)
        return path
    extra = {"model.decoder.enc_to_dec.weight": torch.randn(16, DIM), "model.decoder.mask_patch": torch.randn(16),
             "model.decoder.transformer.layers.0.0.to_qkv.weight": torch.randn(48, 16),
             "model.decoder.embed_to_pixels.weight_generator.encoder.layers.0.linear1.weight": torch.randn(2048, 128),
             "model.teacher.blocks.0.attn.qkv.weight": torch.randn(96, 32), "model.proj.weight": torch.randn(8, DIM)}
    state = {"state_dict": {**{f"model.encoder.{k}": v for k, v in enc.items()}, **extra},
             "epoch": 7, "global_step": 1000, "pytorch-lightning_version": "2.1.2",
             "hyper_parameters": hparams if hparams is not None else {"model_size": "base", "patch_size": 8}}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    enc = random_encoder(DIM, DEPTH, P, seed=5)
    return save_checkpoint(tmp_path_factory.mktemp("clay") / "clay-v1-base.ckpt", enc), enc


# ---- the reference: the published computation from the raw tensors, plain torch ops ----

def ref_layer_norm(x, enc, key):
    return F.layer_norm(x, x.shape[-1:], enc[f"{key}.weight"], enc[f"{key}.bias"], eps=1e-5)


def ref_patch_tokens(enc: dict, x: torch.Tensor, waves: list[float]) -> torch.Tensor:
    dim = enc["cls_token"].shape[-1]
    p = int(round((enc["patch_embedding.weight_generator.fc_weight.weight"].shape[0] / dim) ** 0.5))
    # wavelength → 1-D sin-cos, ω_i = 1 / 10000^(i / 63)
    omega = 1.0 / 10000 ** (torch.arange(64) / 63)
    wv = torch.tensor(waves)[:, None] * omega[None]
    e = torch.cat([wv.sin(), wv.cos()], dim=1)
    lin = lambda t, k: F.linear(t, enc[f"{k}.weight"], enc.get(f"{k}.bias"))  # noqa: E731
    e = e + F.gelu(lin(F.gelu(lin(e, "patch_embedding.fclayer.l1")), "patch_embedding.fclayer.l2"))
    gen = "patch_embedding.weight_generator."
    t = torch.cat([enc[gen + "weight_tokens"], e, enc[gen + "bias_token"]])
    # one post-norm TransformerEncoderLayer, 4 heads, GELU
    L = gen + "encoder.layers.0."
    q, k, v = F.linear(t, enc[L + "self_attn.in_proj_weight"], enc[L + "self_attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (z.reshape(-1, 4, 32).transpose(0, 1) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, dim=-1) @ v
    a = lin(a.transpose(0, 1).reshape(-1, 128), L + "self_attn.out_proj")
    y = ref_layer_norm(t + a, enc, L + "norm1")
    y = ref_layer_norm(y + lin(F.gelu(lin(y, L + "linear1")), L + "linear2"), enc, L + "norm2")
    weight = lin(y[128:-1] + t[128:-1], gen + "fc_weight")  # [C, (D p p)]
    bias = lin(y[-1], gen + "fc_bias")
    kernel = weight.reshape(len(waves), dim, p, p).permute(1, 0, 2, 3) * 0.02
    return F.conv2d(x, kernel, bias, stride=p).flatten(2).transpose(1, 2)


def ref_positions(h: int, w: int, dim: int, gsd: float) -> torch.Tensor:
    """posemb_sincos_2d_with_gsd over dim − 8 (fp32, as published) and 8 zero metadata dims."""
    d = dim - 8
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = torch.arange(d // 4) / (d // 4 - 1)
    omega = 1.0 / (10000 ** (2 * omega / d)) * gsd
    xo, yo = xx.flatten()[:, None] * omega[None], yy.flatten()[:, None] * omega[None]
    return torch.cat([xo.sin(), xo.cos(), yo.sin(), yo.cos(), torch.zeros(h * w, 8)], dim=1)


def reference_tokens(enc: dict, x: torch.Tensor, waves: list[float], heads: int, gsd: float = 10.0) -> list:
    b, _, height, width = x.shape
    dim = enc["cls_token"].shape[-1]
    tokens = ref_patch_tokens(enc, x, waves) + ref_positions(height // P, width // P, dim, gsd)
    tokens = torch.cat([enc["cls_token"].expand(b, -1, -1), tokens], dim=1)
    out = []
    depth = 1 + max(int(k.split(".")[2]) for k in enc if k.startswith("transformer.layers."))
    for i in range(depth):
        s = f"transformer.layers.{i}."
        y = ref_layer_norm(tokens, enc, s + "0.norm")
        q, k, v = F.linear(y, enc[s + "0.to_qkv.weight"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, -1, heads, dim // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1) @ v
        tokens = F.linear(a.transpose(1, 2).reshape(b, -1, dim), enc[s + "0.to_out.weight"]) + tokens
        y = ref_layer_norm(tokens, enc, s + "1.net.0")
        y = F.linear(F.gelu(F.linear(y, enc[s + "1.net.1.weight"], enc[s + "1.net.1.bias"])),
                     enc[s + "1.net.3.weight"], enc[s + "1.net.3.bias"])
        tokens = y + tokens
        out.append(tokens)
    out[-1] = ref_layer_norm(out[-1], enc, "transformer.norm")
    return out


# ---- tests ----

@pytest.mark.parametrize("layout", ["lightning", "bare"])
def test_published_layout_loads_by_key_and_merges_back_to_it(tmp_path, published, layout):
    _, enc = published
    path = published[0] if layout == "lightning" else save_checkpoint(tmp_path / "enc.pt", enc, "bare")
    model = build_segmentor(TINY, 10, 32, 3, band_names=S2)
    loaded = load_backbone_weights(model.encoder, TINY, path, S2, Reporter("quiet"))  # strict: raises on any mismatch
    assert loaded.matched_bands == {} and loaded.fresh_bands == []  # wavelength-conditioned: nothing to adapt
    qkv = model.encoder.blocks[2][0].to_qkv
    fused = enc["transformer.layers.2.0.to_qkv.weight"]
    assert torch.equal(torch.cat([qkv.q.weight, qkv.k.weight, qkv.v.weight]), fused)
    assert qkv.q.bias is None
    # merged (q, k, v fused back), the encoder's state is the published encoder exactly
    state = merge(model).encoder.state_dict()
    assert set(state) == set(enc)
    assert all(torch.equal(state[k], enc[k]) for k in enc)


def test_lightning_pickle_with_objects_needs_trust(tmp_path):
    enc = random_encoder(DIM, DEPTH, P, seed=1)
    path = save_checkpoint(tmp_path / "clay-v1.5.ckpt", enc, hparams=argparse.Namespace(model_size="large"))
    model = build_segmentor(TINY, 10, 32, 2, band_names=S2)
    with pytest.raises(EngineError, match="pickled Python objects"):
        load_backbone_weights(model.encoder, TINY, path, S2, Reporter("quiet"))
    load_backbone_weights(model.encoder, TINY, path, S2, Reporter("quiet"), trust=True)
    assert torch.equal(model.encoder.cls_token, enc["cls_token"])


def test_wave_generator_is_torchs_transformer_encoder_layer(published):
    """The published code builds the generator layer with torch's TransformerEncoder (post-norm,
    GELU, no dropout): same keys, and the same outputs from the same tensors."""
    _, enc = published
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(128, 4, activation="gelu", dropout=0.0),
                                      1, enable_nested_tensor=False).eval()
    prefix = "patch_embedding.weight_generator.encoder."
    ref.load_state_dict({k[len(prefix):]: v for k, v in enc.items() if k.startswith(prefix)})  # strict
    mine = WaveEncoder(128, 4, 2048)
    mine.load_state_dict({k[len(prefix):]: v for k, v in enc.items() if k.startswith(prefix)})
    t = torch.randn(139, 128)
    with torch.inference_mode():
        assert torch.allclose(mine(t), ref(t), atol=1e-5)


@pytest.mark.parametrize("bands,size", [(S2, (32, 32)), (["B04", "705nm", "nir08"], (40, 24))])
def test_every_block_equals_the_reference_computation(published, bands, size):
    """Every block's tokens from the raw published tensors (any band subset, by wavelength; a
    chip size other than the built one, not square: positions recomputed)."""
    path, enc = published
    model = build_segmentor(TINY, len(bands), 32, 2, band_names=bands)
    load_backbone_weights(model.encoder, TINY, path, bands, Reporter("quiet"))
    encoder = model.encoder.eval()
    waves = {"B04": 0.665, "705nm": 0.705, "nir08": 0.865}
    wavelengths = S2_WAVES if bands == S2 else [waves[b] for b in bands]
    assert torch.allclose(encoder.waves, torch.tensor(wavelengths))
    x = torch.randn(2, len(bands), *size)
    with torch.inference_mode():
        tokens = encoder.forward_features(x)
        expected = reference_tokens(enc, x, wavelengths, HEADS)
        maps = encoder(x)
    h, w = size[0] // P, size[1] // P
    assert len(tokens) == DEPTH
    for got, want in zip(tokens, expected):
        assert got.shape == (2, 1 + h * w, DIM)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    for layer, image in zip(TINY.feature_layers, maps):  # the decoders' input: those tokens as images
        assert image.shape == (2, DIM, h, w)
        assert torch.equal(image, tokens[layer][:, 1:].transpose(1, 2).reshape(2, DIM, h, w))


def test_cached_kernel_follows_new_weights(published):
    """Without gradients the generated kernel is kept; loading weights (or any in-place change)
    makes the next forward generate it again."""
    path, enc = published
    model = build_segmentor(TINY, 10, 32, 2, band_names=S2).eval()
    x = torch.randn(1, 10, 32, 32)
    with torch.no_grad():
        before = model.encoder.forward_features(x)[-1]
        load_backbone_weights(model.encoder, TINY, path, S2, Reporter("quiet"))
        after = model.encoder.forward_features(x)[-1]
        assert torch.allclose(after, reference_tokens(enc, x, S2_WAVES, HEADS)[-1], atol=1e-4)
        model.encoder.patch_embedding.fclayer.l1.bias.add_(0.5)
        assert not torch.allclose(model.encoder.forward_features(x)[-1], after, atol=1e-3)
    assert not torch.allclose(before, after, atol=1e-3)


def test_bands_without_a_known_wavelength_are_refused_clearly():
    with pytest.raises(EngineError, match="'thermal' has no known centre wavelength") as err:
        build_segmentor(TINY, 2, 32, 2, band_names=["B04", "thermal"])
    assert "--band-names" in err.value.hint and "665nm" in err.value.hint
    with pytest.raises(EngineError, match="band 2 \\(unnamed\\)"):
        build_segmentor(TINY, 2, 32, 2, band_names=["B04", ""])


def test_encoder_sizes_are_the_published_ones():
    """Clay v1.5's specification gives its encoder as 311 M parameters; v1 is a ViT-B (92 M with
    the wavelength-conditioned embedding)."""
    from engine.models.families import build_encoder, encoder_summary
    for name, millions in (("clay_v1", 92.1), ("clay_v1_5", 311.4)):
        spec = get_backbone_spec(name)
        assert round(encoder_summary(spec)[0] / 1e6, 1) == millions
        with torch.device("meta"):
            encoder = build_encoder(spec, list(spec.bands), 64)
        assert [band for band in spec.bands] == S2 and encoder.first_layer_key is None


def test_bf16_autocast_keeps_the_patch_embedding_fp32_and_features_close(published):
    path, _ = published
    model = build_segmentor(TINY, 10, 32, 2, band_names=S2)
    load_backbone_weights(model.encoder, TINY, path, S2, Reporter("quiet"))
    encoder = model.encoder.eval()
    x = torch.randn(2, 10, 32, 32)
    with torch.inference_mode():
        full = encoder(x)
        ref_patch = encoder.patch_embedding(x, encoder.waves)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            patch = encoder.patch_embedding(x, encoder.waves)
            low = encoder(x)
    assert patch.dtype == torch.float32 and torch.equal(patch, ref_patch)
    assert not torch.equal(low[0].float(), full[0])  # the blocks' matmuls ran in bf16
    for a, b in zip(low, full):
        assert ((a.float() - b).norm() / b.norm()) < 0.05


def step_and_export(model, tmp_path, chans: int, chip: int = 32, classes: int = 3) -> None:
    """tests.conftest.step_and_export, and the kernel generator trains exactly when the backbone
    does (else its kernel is cached), and the exported graph holds the generated kernel as a
    constant, not the generator's weights."""
    import onnx

    changed, trainable, path = shared_step_and_export(model, tmp_path, chans, chip, classes)
    generator = {n for n in trainable if ".patch_embedding." in n}
    assert (generator <= changed) if generator else not any(".patch_embedding." in n for n in changed)
    assert not any("weight_generator" in t.name for t in onnx.load(str(path)).graph.initializer)


CASES = [(m, d) for m in ("lora", "dora", "vpt", "full", "linear-probe", "vit-adapter") for d in ("unet", "linear")] \
    + [("lora", "upernet"), ("lora", "fcn")]


@pytest.mark.parametrize("method,decoder", CASES)
def test_every_method_trains_a_step_and_exports(tmp_path, method, decoder):
    if method == "vit-adapter":
        pytest.importorskip("engine.tuning.vit_adapter")
    torch.manual_seed(0)
    bands = ["B02", "B03", "B04", "B8A"]
    model = build_segmentor(TINY, 4, 32, 3, decoder, band_names=bands, method=method)
    apply_tuning(model, TuningConfig(method, prompt_tokens=5))
    if method in ("lora", "dora"):
        adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
        assert adapted == {f"encoder.transformer.layers.{i}.{m}" for i in range(DEPTH)
                           for m in ("0.to_qkv.q", "0.to_qkv.v", "1.net.1", "1.net.3")}
    if method in ("lora", "dora", "vpt", "linear-probe"):  # the backbone stays frozen
        assert not any(p.requires_grad for n, p in model.encoder.named_parameters()
                       if "lora_" not in n and n != "prompts")
    step_and_export(model, tmp_path, 4)


def test_vpt_prompts_leave_the_token_layout():
    plain = build_segmentor(TINY, 3, 32, 2, band_names=["B04", "B03", "B02"]).eval()
    prompted = apply_tuning(build_segmentor(TINY, 3, 32, 2, band_names=["B04", "B03", "B02"]),
                            TuningConfig("vpt", prompt_tokens=7))
    prompted.load_state_dict(plain.state_dict(), strict=False)
    prompted.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        a, b = plain.encoder.forward_features(x), prompted.encoder.forward_features(x)
    assert prompted.encoder.prompts.shape == (DEPTH, 7, DIM)
    assert [t.shape for t in a] == [t.shape for t in b] == [(1, 17, DIM)] * DEPTH
    assert not torch.allclose(a[-1], b[-1], atol=1e-4)
