"""``demo``: the whole path on the built-in synthetic scene, with a short summary.

demo-data → train (default options) → predict → evaluate → export ONNX → predict with ONNX → evaluate.
The scene is split in two: training labels come from the left part only, and the scores are
on the right part, which training never saw.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import rasterio

from engine.card import read_card
from engine.data.demo import make_demo_scene
from engine.data.rasters import atomic_output
from engine.protocol import Reporter

SCENE_SIZE = 512
TRAIN_FRACTION = 0.6  # left 60 % of the scene for training, the rest held out


def split_labels(labels: Path, folder: Path, train_fraction: float = TRAIN_FRACTION) -> tuple[Path, Path]:
    """Two label rasters on the scene's grid: the left part (training) and the rest (held out)."""
    with rasterio.open(labels) as src:
        profile = src.profile
        data = src.read(1)
        cmap = src.colormap(1)
        tags = src.tags()  # class names (GEOPEFT_CLASSES)
    cut = int(data.shape[1] * train_fraction)
    outputs = []
    for name, keep in (("labels_train.tif", slice(0, cut)), ("labels_test.tif", slice(cut, None))):
        part = np.full_like(data, profile["nodata"])
        part[:, keep] = data[:, keep]
        path = folder / name
        with atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.write(part, 1)
            dst.write_colormap(1, cmap)
            dst.update_tags(**tags)
        outputs.append(path)
    return outputs[0], outputs[1]


def _write_like(src_path: Path, data: np.ndarray, path: Path) -> Path:
    """A label raster with ``src_path``'s profile, colour table and class names."""
    with rasterio.open(src_path) as src:
        profile, cmap, tags = src.profile, src.colormap(1), src.tags()
    with atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data.astype(profile["dtype"]), 1)
        dst.write_colormap(1, cmap)
        dst.update_tags(**tags)
    return path


def first_labels(labels: Path, out: Path, square: int = 12, per_class: int = 1, seed: int = 0) -> Path:
    """An analyst's first, deliberately incomplete labels: ``per_class`` squares of ``square`` px
    per class, each where that class fills the square, from the labelled part of ``labels``."""
    with rasterio.open(labels) as src:
        truth, nodata = src.read(1), src.nodata
    rng = np.random.default_rng(seed)
    first = np.full_like(truth, nodata if nodata is not None else 0)
    classes = [v for v in np.unique(truth) if v != nodata]
    for value in classes:
        placed = 0
        ys, xs = np.nonzero(truth == value)
        for k in rng.permutation(len(ys)):
            y, x = ys[k], xs[k]
            box = truth[y:y + square, x:x + square]
            if box.shape == (square, square) and (box == value).all() and (first[y:y + square, x:x + square] ==
                                                                           first.flat[0]).all():
                first[y:y + square, x:x + square] = value
                placed += 1
                if placed == per_class:
                    break
    return _write_like(labels, first, out)


def add_labels(current: Path, truth: Path, boxes: list[tuple[int, int, int, int]], out: Path) -> Path:
    """``current`` labels plus the true labels (``truth``) inside ``boxes`` (row, col, height,
    width): what an analyst adds where the model was unsure."""
    with rasterio.open(current) as a, rasterio.open(truth) as b:
        labels, reference, nodata = a.read(1), b.read(1), b.nodata
    for r, c, h, w in boxes:
        part = reference[r:r + h, c:c + w]
        keep = part != nodata if nodata is not None else np.ones(part.shape, bool)
        labels[r:r + h, c:c + w][keep] = part[keep]
    return _write_like(current, labels, out)


def run_demo(out: str | os.PathLike, reporter: Reporter, max_time: str = "4m") -> dict:
    from engine.evaluate import evaluate
    from engine.export import export_onnx
    from engine.inference.predict import predict
    from engine.training.train import TrainConfig, run_training

    out = Path(out)
    times = {}
    t0 = time.monotonic()
    scene = make_demo_scene(out / "data", size=SCENE_SIZE)
    train_labels, test_labels = split_labels(scene.labels, out / "data")
    times["demo-data"] = time.monotonic() - t0
    steps = [
        ("train", f"python -m engine train --image {scene.image} --labels {train_labels} "
                  f"--max-time {max_time} --out {out / 'model'}"),
    ]
    reporter.info("$ " + steps[0][1])
    t0 = time.monotonic()
    trained = run_training(TrainConfig(images=[str(scene.image)], labels=str(train_labels), out=str(out / "model"),
                                       max_time=max_time, weights="auto"), reporter)
    times["train"] = time.monotonic() - t0
    if not trained.get("out"):
        return {"cancelled": True}
    results = {}
    for runner, model in (("pytorch", out / "model"), ("onnx", out / "model.onnx")):
        if runner == "onnx":
            reporter.info(f"$ python -m engine export --model {out / 'model'} --out {model}")
            t0 = time.monotonic()
            exported = export_onnx(out / "model", model, reporter)
            times["export"] = time.monotonic() - t0
        pred = out / f"prediction_{runner}.tif"
        reporter.info(f"$ python -m engine predict --model {model} --image {scene.image} --out {pred}")
        t0 = time.monotonic()
        predict(model, [str(scene.image)], pred, reporter=reporter)
        times[f"predict ({runner})"] = time.monotonic() - t0
        reporter.info(f"$ python -m engine evaluate --prediction {pred} --labels {test_labels}")
        results[runner] = evaluate(pred, test_labels, out / f"metrics_{runner}.json", reporter=reporter)
    with rasterio.open(out / "prediction_pytorch.tif") as a, rasterio.open(out / "prediction_onnx.tif") as b:
        agreement = float((a.read(1) == b.read(1)).mean())
    counts = trained["trainable_parameters"]
    card, _ = read_card(out / "model")
    adapter_mb = (out / "model" / "adapter.safetensors").stat().st_size / 2 ** 20
    summary_lines = [
        "", "GeoPEFT demo summary", "=" * 60,
        f"scene: {SCENE_SIZE}x{SCENE_SIZE} px, 6 bands, 4 classes; trained on the left "
        f"{int(TRAIN_FRACTION * 100)} %, scored on the held-out right part",
        f"model: {card['backbone']['name']} + {card['decoder']}, tuning {card['tuning']['method']}, "
        f"chip {card['chip_size']} px, lr {card['training']['lr']:g}; {counts:,} trainable parameters, "
        f"model folder {adapter_mb:.1f} MiB; weights: {'pretrained' if not any('RANDOM' in w for w in reporter.warnings) else 'RANDOM (offline)'}",
        f"training: {trained['epochs']} epochs, {trained['steps']} steps, best validation mIoU "
        f"{trained['best_val_miou']:.3f}",
        f"held-out mIoU: PyTorch {results['pytorch']['miou']:.3f}, ONNX {results['onnx']['miou']:.3f}; "
        f"pixel accuracy {results['pytorch']['pixel_accuracy']:.3f}",
        f"ONNX vs PyTorch: max abs diff {exported['max_abs_diff']:.1e} on random input; "
        f"{agreement * 100:.3f} % identical pixels",
        "times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
        "", results["onnx"]["table"], "",
        f"outputs in {out}/: model/, model.onnx, prediction_pytorch.tif, prediction_onnx.tif, metrics_*.json",
    ]
    text = "\n".join(summary_lines)
    if reporter.mode == "human":
        print(text)
    (out / "summary.txt").write_text(text + "\n")
    return {"out": str(out), "miou_pytorch": results["pytorch"]["miou"], "miou_onnx": results["onnx"]["miou"],
            "agreement": agreement, "max_abs_diff": exported["max_abs_diff"], "times_s": times}
