"""The fault catalogue, part 2 (issue 9): models and safe loading. Every case goes through the
real CLI and must end with exit status 2, one ``error`` event whose message names the file (or
lists the valid names) with a hint saying what to do, no traceback, and nothing at the output path.

=====================================================  ===============================================================
case                                                   what the user sees (error message … / hint …)
=====================================================  ===============================================================
train --backbone nope                                  unknown backbone 'nope' / choose one of: prithvi_eo_v1_100, … (the
                                                       registry's names)
train --tuning nope                                    unknown tuning method 'nope' / choose one of: auto, lora, dora, …
train --decoder nope                                   unknown decoder 'nope' / choose one of: auto, unet, linear
train --weights missing.pt                             weights file missing.pt not found (PATH) / pass a local checkpoint
                                                       file, 'auto', 'hub' or 'none'
train --weights half.pt (a real checkpoint cut in two) cannot read checkpoint half.pt: the file is truncated or corrupt …
                                                       (N bytes; RuntimeError: …) / download half.pt again …
train --weights resnet.pth (a timm ResNet)             checkpoint resnet.pth does not match backbone prithvi_eo_v2_tiny: 0
                                                       of N tensors match, N missing, 0 with another shape, M unexpected
                                                       (…). The file holds M tensors, … a ResNet-style CNN … / pass the
                                                       weights of prithvi_eo_v2_tiny (…), or pick the --backbone …
train --backbone prithvi_eo_v2_100 --weights tiny.pt   … K of N tensors match … with another shape … a ViT encoder of width
                                                       192, 12 blocks (as prithvi_eo_v2_tiny)
train --weights evil.pt (os.system in __reduce__)      checkpoint evil.pt holds pickled Python objects (posix.system), not
                                                       only tensors: … not loaded / only if you trust where evil.pt comes
                                                       from, pass --trust-checkpoint … (the payload does NOT run)
train --weights old.pt (dict with argparse.Namespace)  refused as above (argparse.Namespace); with --trust-checkpoint it
                                                       trains; predict from that model without the flag is refused
                                                       (names old.pt and the flag), with it predicts
model folder: adapter.safetensors is a torch pickle    trained weights adapter.safetensors are a pickled PyTorch file …
                                                       never unpickled / train the model again (payload does NOT run)
model folder: card names adapter.pt                    model card …/card.json: files.weights 'adapter.pt' should name a
                                                       .safetensors file … never unpickled
predict a 4-band raster with a 6-band model folder     four.tif has 4 band(s), the model takes 6 (bands 1,…,6 …: BLUE, …)
                                                       / … add the missing 2 … select them … with --bands …
predict a 4-band raster with a 6-band ONNX             the same (predict's checks run on the ONNX card)
predict --model random.onnx / truncated.onnx           cannot load ONNX model X.onnx: the file is corrupt, truncated or not
                                                       an ONNX model (N bytes; …) / export the model again …
ONNX whose card lists other bands than its network     edited.onnx takes 6 bands but its model card lists 4 … / export
card_version 99                                        model card …/card.json has card version 99, newer than this engine
                                                       understands (versions 1 to 2) / update GeoPEFT …
card with an unknown field (top level / in tuning)     model card …/card.json: unknown field colour_map … / … remove the
                                                       field, or update GeoPEFT
card with a wrong type (chip_size "32", std str)       model card …/card.json: chip_size should be an integer, not a string
card with an unknown decoder name                      model card …/card.json: unknown decoder 'fpn' (this engine knows:
                                                       unet, linear)
--model no_such_folder                                 model not found: … / pass the folder written by 'train' …
folder without card.json                               empty is not a GeoPEFT model folder: it holds no card.json …
card.json whose weights file is gone                   trained weights adapter.safetensors missing from the model folder …
                                                       / copy the whole model folder … again, or train the model again
=====================================================  ===============================================================

Decided for the card: unknown fields are refused (not warned about), at the top level and in every
section the engine acts on; only ``training``, ``export.agreement`` and
``backbone.weights.matched_bands`` are free-form (see ``engine.card``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from engine.card import CARD_VERSION
from tests.conftest import TINY, make_prithvi_checkpoint, run_engine

FAST = ["--epochs", "1", "--chip-size", "32", "--batch-size", "8", "--chips-per-epoch", "16"]


def refused(*args, name: str, out: Path, hint: str | None = None) -> dict:
    """Run the CLI, expect a clean refusal naming ``name``; nothing written at ``out``. The error."""
    r = run_engine(*args, expect_ok=False, timeout=300)
    assert r["_rc"] == 2, f"exit {r['_rc']}:\n{r['_stderr'][-3000:]}"
    assert "Traceback" not in r["_stderr"], r["_stderr"][-3000:]
    errors = [e for e in r["_events"] if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["error_type"] == "EngineError", errors
    error = errors[0]
    assert name in error["message"], error
    assert error.get("hint"), error
    if hint:
        assert hint in error["hint"], error
    assert r["_events"][-1]["event"] == "done" and r["_events"][-1]["ok"] is False
    assert not out.exists(), f"{out} was written"
    # nothing beside it either (partial files, staging folders); the output lock of engine.reliability aside
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".geopeft-lock")] == []
    return error


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def train_args(scene, *extra):
    return ["train", "--image", scene.image, "--labels", scene.labels, *extra]


# -- names from the registries -----------------------------------------------------------------

def test_unknown_backbone_lists_the_registry(small_scene, out_dir):
    from engine.models.registry import BACKBONES

    out = out_dir / "model"
    error = refused(*train_args(small_scene, *TINY, "--backbone", "prithvi_eo_v9", "--out", out),
                    name="prithvi_eo_v9", out=out)
    assert all(name in error["hint"] for name in BACKBONES)


def test_unknown_tuning_method_lists_the_registry(small_scene, out_dir):
    from engine.tuning import METHODS

    out = out_dir / "model"
    error = refused(*train_args(small_scene, *TINY, "--tuning", "qlora", "--out", out), name="qlora", out=out)
    assert all(name in error["hint"] for name in ("auto", *METHODS))


def test_unknown_decoder_lists_the_registry(small_scene, out_dir):
    from engine.models.decoders import DECODERS

    out = out_dir / "model"
    error = refused(*train_args(small_scene, *TINY, "--decoder", "fpn", "--out", out), name="fpn", out=out)
    assert all(name in error["hint"] for name in ("auto", *DECODERS))


# -- checkpoints given with --weights ----------------------------------------------------------

def test_missing_checkpoint(small_scene, out_dir, tmp_path):
    out = out_dir / "model"
    refused(*train_args(small_scene, *FAST, "--weights", tmp_path / "Prithvi_missing.pt", "--out", out),
            name="Prithvi_missing.pt", out=out, hint="checkpoint file")


def test_truncated_checkpoint(small_scene, out_dir, tmp_path, prithvi_checkpoint):
    half = tmp_path / "Prithvi_half.pt"
    data = prithvi_checkpoint.read_bytes()
    half.write_bytes(data[:len(data) // 2])
    out = out_dir / "model"
    error = refused(*train_args(small_scene, *FAST, "--weights", half, "--out", out), name="Prithvi_half.pt", out=out,
                    hint="again")
    assert "truncated" in error["message"] and f"{len(data) // 2:,} bytes" in error["message"]


def test_checkpoint_of_a_resnet(small_scene, out_dir, tmp_path):
    import torch

    import engine.models  # noqa: F401 - torchvision fix before timm
    import timm

    path = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    out = out_dir / "model"
    error = refused(*train_args(small_scene, *FAST, "--weights", path, "--out", out), name="resnet10t.pth", out=out,
                    hint="--backbone")
    message = error["message"]
    assert "0 of " in message and "missing" in message and "unexpected" in message and "another shape" in message
    assert "ResNet" in message and "conv1." in message


def test_checkpoint_of_another_prithvi_size(small_scene, out_dir, prithvi_checkpoint):
    out = out_dir / "model"
    error = refused(*train_args(small_scene, *FAST, "--backbone", "prithvi_eo_v2_100", "--weights", prithvi_checkpoint,
                                "--out", out), name=prithvi_checkpoint.name, out=out, hint="Prithvi_EO_V2_100M_TL.pt")
    message = error["message"]
    assert "with another shape" in message and not re.search(r"(?<!\d)0 with another shape", message)
    assert "width 192, 12 blocks" in message and "prithvi_eo_v2_tiny" in message


# -- pickles -----------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _malicious_checkpoint(path: Path, marker: Path, real: Path | None = None) -> Path:
    import torch

    state = torch.load(real, weights_only=True) if real else {"w": torch.zeros(2)}
    torch.save({"model": state, "hook": _Payload(marker)}, path)
    return path


def test_malicious_pickle_does_not_run(small_scene, out_dir, tmp_path, prithvi_checkpoint):
    import torch

    marker = tmp_path / "PWNED"
    evil = _malicious_checkpoint(tmp_path / "evil.pt", marker, prithvi_checkpoint)
    out = out_dir / "model"
    error = refused(*train_args(small_scene, *FAST, "--weights", evil, "--out", out), name="evil.pt", out=out,
                    hint="--trust-checkpoint")
    assert "pickled Python objects" in error["message"] and "system" in error["message"]
    assert not marker.exists(), "the checkpoint's code ran"
    # the payload is live: unpickling it in full does run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_pickled_checkpoint_with_trust(small_scene, out_dir, tmp_path, prithvi_checkpoint):
    """An old-style checkpoint (training options as an argparse.Namespace beside the weights):
    refused by default, loaded with --trust-checkpoint; a model trained on it needs the flag again
    where the checkpoint is read back (predict, export)."""
    import torch

    old = tmp_path / "old_style.pt"
    torch.save({"model": torch.load(prithvi_checkpoint, weights_only=True), "epoch": 400,
                "args": argparse.Namespace(lr=1.5e-4, mask_ratio=0.75)}, old)
    out = out_dir / "model"
    error = refused(*train_args(small_scene, *FAST, "--weights", old, "--out", out), name="old_style.pt", out=out,
                    hint="--trust-checkpoint")
    assert "argparse.Namespace" in error["message"]

    done = run_engine(*train_args(small_scene, *FAST, "--weights", old, "--trust-checkpoint", "--out", out))
    card = json.loads((out / "card.json").read_text())
    assert card["backbone"]["weights"]["source"] == "file" and card["tuning"]["method"] == "lora"
    assert done["out"] == str(out)

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    classes = pred_dir / "classes.tif"
    refused("predict", "--model", out, "--image", small_scene.image, "--out", classes, name="old_style.pt",
            out=classes, hint="--trust-checkpoint")
    run_engine("predict", "--model", out, "--image", small_scene.image, "--out", classes, "--trust-checkpoint")
    assert classes.exists()


def test_model_folder_weights_that_are_a_pickle(tiny_model, small_scene, tmp_path, out_dir):
    import torch

    model = shutil.copytree(tiny_model, tmp_path / "model")
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(2), "hook": _Payload(marker)}, model / "adapter.safetensors")
    out = out_dir / "classes.tif"
    refused("predict", "--model", model, "--image", small_scene.image, "--out", out, "--trust-checkpoint",
            name="adapter.safetensors", out=out, hint="train the model again")
    assert not marker.exists(), "the model folder's weights were unpickled"


def test_model_card_naming_a_pickle(tiny_model, small_scene, tmp_path, out_dir):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    card = json.loads((model / "card.json").read_text())
    card["files"]["weights"] = "adapter.pt"
    (model / "card.json").write_text(json.dumps(card))
    out = out_dir / "classes.tif"
    error = refused("predict", "--model", model, "--image", small_scene.image, "--out", out, name="card.json", out=out)
    assert "adapter.pt" in error["message"] and ".safetensors" in error["message"]


# -- bands -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_bands(small_scene, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("four") / "four_bands.tif"
    with rasterio.open(small_scene.image) as src:
        profile, data, names = src.profile, src.read([1, 2, 3, 4]), src.descriptions[:4]
    profile.update(count=4)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, 1):
            if name:
                dst.set_band_description(i, name)
    return path


@pytest.mark.parametrize("kind", ["folder", "onnx"])
def test_four_band_raster_on_a_six_band_model(kind, tiny_model, tiny_onnx, four_bands, out_dir):
    model = tiny_model if kind == "folder" else tiny_onnx
    out = out_dir / "classes.tif"
    error = refused("predict", "--model", model, "--image", four_bands, "--out", out, name="four_bands.tif", out=out,
                    hint="--bands")
    assert "has 4 band(s), the model takes 6" in error["message"]


# -- ONNX files --------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_onnx(damage, tiny_onnx, small_scene, tmp_path, out_dir):
    path = tmp_path / f"{damage}.onnx"
    data = tiny_onnx.read_bytes()
    path.write_bytes(np.random.default_rng(0).bytes(4096) if damage == "random" else data[:len(data) // 2])
    out = out_dir / "classes.tif"
    error = refused("predict", "--model", path, "--image", small_scene.image, "--out", out, name=path.name, out=out,
                    hint="export the model again")
    assert "corrupt" in error["message"]


def test_onnx_card_with_other_bands_than_its_network(tiny_onnx, small_scene, tmp_path, out_dir):
    import onnx

    proto = onnx.load(str(tiny_onnx))
    entry = next(p for p in proto.metadata_props if p.key == "geopeft_card")
    card = json.loads(entry.value)
    for key in ("bands", "band_names", "mean", "std"):
        card["input"][key] = card["input"][key][:4]
    entry.value = json.dumps(card)
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    out = out_dir / "classes.tif"
    error = refused("predict", "--model", path, "--image", small_scene.image, "--out", out, name="edited.onnx",
                    out=out, hint="export")
    assert "takes 6 bands but its model card lists 4" in error["message"]


# -- model cards -------------------------------------------------------------------------------

def _edited_model(tiny_model, tmp_path, edit) -> Path:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    card = json.loads((model / "card.json").read_text())
    edit(card)
    (model / "card.json").write_text(json.dumps(card))
    return model


@pytest.mark.parametrize("edit, words, hint", [
    (lambda c: c.update(card_version=99), ["card version 99", f"versions 1 to {CARD_VERSION}"], "update GeoPEFT"),
    (lambda c: c.update(colour_map="viridis"), ["unknown field colour_map"], "remove the field"),
    (lambda c: c["tuning"].update(qlora_bits=4), ["unknown field tuning.qlora_bits"], "remove the field"),
    (lambda c: c.update(chip_size="32"), ["chip_size should be an integer", "string"], None),
    (lambda c: c["input"].update(std="1,2,3"), ["input.std should be a list"], None),
    (lambda c: c.update(decoder="fpn"), ["unknown decoder 'fpn'", "unet, upernet, fcn, linear"], "update GeoPEFT"),
], ids=["future-version", "unknown-field", "unknown-tuning-field", "chip-size-string", "std-string",
        "unknown-decoder"])
def test_bad_model_card(edit, words, hint, tiny_model, small_scene, tmp_path, out_dir):
    model = _edited_model(tiny_model, tmp_path, edit)
    out = out_dir / "classes.tif"
    error = refused("predict", "--model", model, "--image", small_scene.image, "--out", out, name="card.json",
                    out=out, hint=hint)
    assert all(w in error["message"] for w in words), error


def test_missing_model_folder(small_scene, tmp_path, out_dir):
    out = out_dir / "classes.tif"
    refused("predict", "--model", tmp_path / "no_such_model", "--image", small_scene.image, "--out", out,
            name="no_such_model", out=out, hint="folder written by 'train'")


def test_folder_without_card(small_scene, tmp_path, out_dir):
    (tmp_path / "empty_model").mkdir()
    out = out_dir / "classes.tif"
    error = refused("predict", "--model", tmp_path / "empty_model", "--image", small_scene.image, "--out", out,
                    name="empty_model", out=out, hint="card.json")
    assert "card.json" in error["message"]


def test_weights_file_named_by_the_card_missing(tiny_model, small_scene, tmp_path, out_dir):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "adapter.safetensors").unlink()
    out = out_dir / "classes.tif"
    refused("predict", "--model", model, "--image", small_scene.image, "--out", out, name="adapter.safetensors",
            out=out, hint="model folder")


# -- the schema itself (no CLI) ----------------------------------------------------------------

def test_card_schema_matches_the_tuning_config():
    """The card's tuning section becomes TuningConfig(**tuning): the schema must know exactly its fields."""
    from engine.card import SCHEMA, TUNING_FIELDS
    from engine.tuning import TuningConfig

    assert set(TUNING_FIELDS) == {f.name for f in dataclasses.fields(TuningConfig)}
    assert set(SCHEMA.keys["tuning"].keys) == set(TUNING_FIELDS)


def test_written_cards_validate(tiny_model, tiny_onnx):
    import onnx

    from engine.card import read_card, validate_card

    read_card(tiny_model)
    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx), load_external_data=False).metadata_props}
    validate_card(json.loads(meta["geopeft_card"]), "onnx")
