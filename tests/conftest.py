"""Shared test helpers: run the engine CLI as the plugin does, and find the test data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEN1FLOODS11 = REPO / "tests" / "data"  # copied from Sen1Floods11 (CC BY 4.0), see tests/data/README.md
ENGINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_engine(*args, expect_ok: bool = True, timeout: float = 600) -> dict:
    """Run ``python -m engine ARGS --events jsonl``; return the ``done`` summary (and the
    events under the key ``_events``, stderr under ``_stderr``, exit status under ``_rc``)."""
    cmd = [sys.executable, "-m", "engine", *[str(a) for a in args], "--events", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENGINE_ENV, timeout=timeout)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    done = next((e for e in events if e["event"] == "done"), {})
    if expect_ok:
        assert proc.returncode == 0 and done.get("ok"), f"engine failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return {**done, "_events": events, "_stderr": proc.stderr, "_rc": proc.returncode}


# A model trained in seconds: enough for tests of what is done with a model, not of its quality.
TINY = ["--weights", "none", "--epochs", "1", "--chip-size", "32", "--batch-size", "8", "--chips-per-epoch", "16"]


@pytest.fixture(scope="session")
def small_scene(tmp_path_factory):
    """A 96 px synthetic scene for the tiny model."""
    from engine.data.demo import make_demo_scene

    return make_demo_scene(tmp_path_factory.mktemp("small_scene"), size=96, seed=1)


@pytest.fixture(scope="session")
def tiny_model(small_scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    run_engine("train", "--image", small_scene.image, "--labels", small_scene.labels, *TINY, "--out", out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    run_engine("export", "--model", tiny_model, "--out", out)
    return out


@pytest.fixture(scope="session")
def demo_scene(tmp_path_factory):
    """A small synthetic scene (256 px) shared by the engine tests."""
    from engine.data.demo import make_demo_scene

    return make_demo_scene(tmp_path_factory.mktemp("scene"), size=256, seed=0)


def make_prithvi_checkpoint(path: Path, backbone: str = "prithvi_eo_v2_tiny", layout: str = "mae",
                            seed: int = 0) -> Path:
    """A checkpoint laid out like the published Prithvi files (random values): fused qkv,
    fixed pos_embed, TL scalars, and for ``mae`` the ``encoder.``/``decoder.`` prefixes; for
    ``flat`` the legacy V1 layout with ``decoder_*`` keys and ``mask_token``."""
    from collections import OrderedDict

    import torch

    import engine.models  # noqa: F401 - torchvision fix before timm
    from engine.models.prithvi import PrithviViT, sincos_3d
    from engine.models.registry import get_backbone_spec

    torch.manual_seed(seed)
    spec = get_backbone_spec(backbone)
    enc = PrithviViT(spec, len(spec.bands), 224)
    for p in enc.parameters():  # make every tensor distinct from a fresh init
        torch.nn.init.normal_(p, std=0.02)
    own = enc.state_dict()
    encoder = OrderedDict()
    for k, v in own.items():
        if ".attn.qkv." in k:
            stem, rest = k.split(".attn.qkv.")
            which, kind = rest.split(".")
            if which == "q":
                encoder[f"{stem}.attn.qkv.{kind}"] = torch.cat(
                    [own[f"{stem}.attn.qkv.{w}.{kind}"] for w in "qkv"], dim=0)
            continue
        encoder[k] = v
    encoder["pos_embed"] = sincos_3d(spec.embed_dim, (1, 14, 14))
    encoder["temporal_embed_enc.scale"] = torch.tensor([0.1])
    encoder["location_embed_enc.scale"] = torch.tensor([0.1])
    decoder = {"decoder_embed.weight": torch.randn(512, spec.embed_dim) * 0.02,
               "decoder_pred.weight": torch.randn(16 * 16 * 6, 512) * 0.02}
    if layout == "mae":
        state = OrderedDict([(f"encoder.{k}", v) for k, v in encoder.items()] +
                            [(f"decoder.{k}", v) for k, v in decoder.items()])
    else:
        state = OrderedDict(list(encoder.items()) + list(decoder.items()) +
                            [("mask_token", torch.zeros(1, 1, 512))])
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def prithvi_checkpoint(tmp_path_factory) -> Path:
    return make_prithvi_checkpoint(tmp_path_factory.mktemp("weights") / "Prithvi_EO_V2_tiny_TL.pt")


def step_and_export(model, tmp_path: Path, chans: int, chip: int = 32, classes: int = 3) -> tuple[set, set, Path]:
    """A training step on ``model`` (a tuned Segmentor) changes what trains and only that, the
    decoder among it; the merged model exports to ONNX (dynamic batch, opset 17, as engine.export
    does) with the PyTorch outputs. Returns (changed, trainable parameter names, the ONNX path)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from engine.models.segmentor import Probabilities
    from engine.tuning import merge

    model.train()
    x = torch.randn(2, chans, chip, chip)
    logits = model(x)
    assert logits.shape == (2, classes, chip, chip)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, classes, (2, chip, chip))).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any(n.startswith("decoder.") for n in changed)
    model.eval()
    merged = Probabilities(merge(model)).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.inference_mode():
        expected = merged(x).numpy()
    path = tmp_path / "m.onnx"
    torch.onnx.export(merged, (x[:1],), str(path), input_names=["x"], output_names=["p"], opset_version=17,
                      dynamo=False, dynamic_axes={"x": {0: "batch"}, "p": {0: "batch"}})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    return changed, trainable, path
