"""The analyst's loop in the engine: train on a few labels, look at the map, add labels where the
model is unsure, continue training from the model (``train --init-from``); previews while training;
the learning curves in the card."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from tests.conftest import ENGINE_ENV, REPO, run_engine

import engine.models  # noqa: F401 - before lightning (tests/README: torchvision shim)
from engine.demo import add_labels, first_labels, split_labels

FAST = ["--weights", "none", "--batch-size", "8", "--chips-per-epoch", "32", "--seed", "0"]


def most_uncertain_boxes(uncertainty, labelled, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """The ``count`` squares of ``size`` px with the highest mean uncertainty among those the
    analyst can label (inside ``labelled``, the training part of the scene)."""
    with rasterio.open(uncertainty) as u, rasterio.open(labelled) as t:
        unc, known = u.read(1).astype(float), t.read(1) != t.nodata
    unc[unc == 255] = np.nan
    boxes = []
    for r in range(0, unc.shape[0] - size + 1, size):
        for c in range(0, unc.shape[1] - size + 1, size):
            if known[r:r + size, c:c + size].mean() >= 0.9:
                boxes.append((np.nanmean(unc[r:r + size, c:c + size]), (r, c, size, size)))
    boxes.sort(key=lambda b: -b[0])
    return [b for _, b in boxes[:count]]


@pytest.fixture(scope="module")
def loop(demo_scene, tmp_path_factory):
    """Round 1 on four 12 px squares (one per class); round 2 from it, with the true labels added
    in the eight most uncertain 24 px squares of the training part."""
    tmp = tmp_path_factory.mktemp("loop")
    train_labels, test_labels = split_labels(demo_scene.labels, tmp)
    first = first_labels(train_labels, tmp / "first.tif")
    m1, m2 = tmp / "round1", tmp / "round2"
    run_engine("train", "--image", demo_scene.image, "--labels", first, *FAST, "--epochs", "12", "--out", m1)
    run_engine("predict", "--model", m1, "--image", demo_scene.image, "--out", tmp / "p1.tif",
               "--uncertainty", tmp / "u1.tif")
    boxes = most_uncertain_boxes(tmp / "u1.tif", train_labels, 24, 8)
    second = add_labels(first, train_labels, boxes, tmp / "second.tif")
    r2 = run_engine("train", "--image", demo_scene.image, "--labels", second, "--init-from", m1, *FAST,
                    "--epochs", "12", "--out", m2)
    run_engine("predict", "--model", m2, "--image", demo_scene.image, "--out", tmp / "p2.tif")
    scores = [run_engine("evaluate", "--prediction", tmp / p, "--labels", test_labels)["miou"]
              for p in ("p1.tif", "p2.tif")]
    return {"m1": m1, "m2": m2, "scores": scores, "r2": r2, "first": first, "second": second, "tmp": tmp}


def test_continued_model_names_its_parent_and_keeps_its_choices(loop):
    parent = json.loads((loop["m1"] / "card.json").read_text())
    child = json.loads((loop["m2"] / "card.json").read_text())
    assert child["parent"]["path"] == str(loop["m1"].resolve())
    assert child["parent"]["weights_sha256"] == parent["files"]["weights_sha256"]
    assert child["parent"]["best_val_miou"] == parent["training"]["best_val_miou"]
    for key in ("decoder", "tuning", "classes", "chip_size"):
        assert child[key] == parent[key], key
    # the parent's normalisation, not statistics of the new labels' pixels
    assert child["input"]["mean"] == parent["input"]["mean"] and child["input"]["std"] == parent["input"]["std"]
    assert child["training"]["labels"] == str(loop["second"].resolve())


def test_corrections_raise_held_out_miou(loop):
    before, after = loop["scores"]
    assert after >= before, loop["scores"]


def test_history_in_the_card_matches_the_metric_events(loop):
    card = json.loads((loop["m2"] / "card.json").read_text())
    history = card["training"]["history"]
    assert [row["epoch"] for row in history] == list(range(1, 13))
    sent = {e["epoch"]: e["value"] for e in loop["r2"]["_events"]
            if e["event"] == "metric" and e["name"] == "val_miou"}
    assert {row["epoch"]: row["val_miou"] for row in history} == pytest.approx(sent, abs=1e-5)
    assert all(isinstance(row["train_loss"], float) for row in history)


def test_warm_start_loads_the_parents_tensors(loop):
    """Before any step, the continued model's trained tensors are exactly its parent's."""
    from safetensors.torch import load_file

    from engine.card import read_card
    from engine.models.registry import get_backbone_spec
    from engine.models.segmentor import build_segmentor
    from engine.protocol import Reporter
    from engine.training.warmstart import Parent, load_parent_tensors
    from engine.tuning import TuningConfig, apply_tuning

    card, _ = read_card(loop["m1"])
    model = build_segmentor(get_backbone_spec(card["backbone"]["name"]), len(card["input"]["bands"]),
                            card["chip_size"], len(card["classes"]), card["decoder"])
    apply_tuning(model, TuningConfig(**card["tuning"]))
    assert load_parent_tensors(model, Parent(loop["m1"]), Reporter("quiet")) > 0
    state = model.state_dict()
    for key, tensor in load_file(str(loop["m1"] / "adapter.safetensors")).items():
        assert (state[key] == tensor).all(), key


def test_init_from_refuses_what_does_not_fit_the_parent(loop, demo_scene, tmp_path):
    base = ["train", "--image", demo_scene.image, "--labels", loop["second"], "--init-from", loop["m1"], *FAST,
            "--epochs", "1"]
    r = run_engine(*base, "--backbone", "prithvi_eo_v2_100", "--out", tmp_path / "x", expect_ok=False)
    assert r["_rc"] == 2 and "--backbone prithvi_eo_v2_100 (the parent has prithvi_eo_v2_tiny)" in r["_stderr"]
    r = run_engine(*base, "--out", loop["m1"], expect_ok=False)
    assert r["_rc"] == 2 and "would replace it" in r["_stderr"]
    with rasterio.open(loop["second"]) as src:
        profile, data = src.profile, src.read(1)
    data[data == 4] = 7  # a class the parent does not have
    new_class = tmp_path / "new_class.tif"
    with rasterio.open(new_class, "w", **profile) as dst:
        dst.write(data, 1)
    r = run_engine("train", "--image", demo_scene.image, "--labels", new_class, "--init-from", loop["m1"], *FAST,
                   "--out", tmp_path / "y", expect_ok=False)
    assert r["_rc"] == 2 and "class(es) 7 that the model training continues from (round1) does not have" in r["_stderr"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_previews_every_n_epochs_and_on_request(demo_scene, loop, tmp_path):
    """Every 2nd epoch, and once when the request file is written during training; each preview
    is a class raster of the preview extent on the image's grid; only the two newest stay."""
    previews, request = tmp_path / "previews", tmp_path / "request.json"
    with rasterio.open(demo_scene.image) as src:
        grid = src.transform
        left, top = grid @ (40, 30)
        right, bottom = grid @ (140, 110)
    cmd = [sys.executable, "-m", "engine", "train", "--image", str(demo_scene.image), "--labels", str(loop["first"]),
           *FAST, "--epochs", "6", "--out", str(tmp_path / "m"), "--preview-dir", str(previews),
           "--preview-every", "2", "--preview-extent", f"{left},{bottom},{right},{top}",
           "--preview-request", str(request), "--events", "jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                            env=ENGINE_ENV)
    events, asked_in = [], None
    for line in proc.stdout:
        event = json.loads(line)
        events.append(event)
        if asked_in is None and event["event"] == "progress" and event.get("stage") == "train" \
                and event.get("epoch") == 3:
            request.write_text(json.dumps({"extent": f"{left},{bottom},{right},{top}"}))
            asked_in = time.monotonic()
    assert proc.wait(timeout=300) == 0
    shown = [e for e in events if e["event"] == "artifact" and e["kind"] == "preview"]
    epochs = [e["epoch"] for e in shown]
    # epochs 2, 4 and 6, and the asked one in epoch 3 (or 4, on a slow machine)
    assert len(shown) == 4 and {2, 4, 6} <= set(epochs) and epochs[1] in (3, 4), epochs
    kept = sorted(previews.glob("*.tif"))
    assert [p.name for p in kept] == sorted(p.split("/")[-1] for p in (shown[-2]["path"], shown[-1]["path"]))
    with rasterio.open(kept[-1]) as ds, rasterio.open(demo_scene.image) as image:
        assert (ds.width, ds.height) == (100, 80)
        assert ds.transform.a == image.transform.a and ds.transform @ (0, 0) == image.transform @ (40, 30)
        assert ds.crs == image.crs
        values = set(np.unique(ds.read(1)).tolist())
        assert values <= {1, 2, 3, 4} and values


def test_a_continued_run_never_keeps_worse_than_its_parent(loop):
    """The parent is scored on the run's validation labels before training (epoch 0): the kept
    model scores at least that."""
    import re

    child = json.loads((loop["m2"] / "card.json").read_text())["training"]
    said = re.search(r"continues from scores validation mIoU ([0-9.]+)", loop["r2"]["_stderr"])
    assert said and child["best_val_miou"] >= float(said.group(1)) - 5e-4


def test_keep_best_keeps_the_starting_weights_unless_an_epoch_beats_them():
    """KeepBest with a baseline: the weights scored before training are epoch 0 and stay kept
    when no epoch scores higher (here epoch 1 changes the weights and scores lower)."""
    from types import SimpleNamespace

    import torch

    from engine.training.task import KeepBest

    model = torch.nn.Linear(2, 2)
    module = SimpleNamespace(model=model, last_val={"miou": 0.5})
    trainer = SimpleNamespace(current_epoch=0, sanity_checking=False)
    keep = KeepBest(has_validation=True, baseline=True)
    keep.on_sanity_check_end(trainer, module)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    module.last_val = {"miou": 0.4}
    keep.on_validation_end(trainer, module)
    assert keep.best_epoch == 0 and keep.best_score == 0.5
    assert all((keep.best_state[k] == start[k]).all() for k in start)
    module.last_val = {"miou": 0.6}
    trainer.current_epoch = 1
    keep.on_validation_end(trainer, module)
    assert keep.best_epoch == 2 and (keep.best_state["weight"] == model.weight).all()
    resumed = KeepBest(has_validation=True, baseline=True)  # a resumed run: its restored best stays
    resumed.load_state_dict(keep.state_dict())
    module.last_val = {"miou": 0.55}
    resumed.on_sanity_check_end(trainer, module)
    assert resumed.best_epoch == 2
