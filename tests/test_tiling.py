"""Tiled, streamed prediction equals a naive whole-image computation.

The reference here holds the whole raster in memory, runs every tile of the tiling rule and
blends them into one full-size accumulator: no strips, no rolling buffer, no reader/writer
threads. ``predict`` must give the same pixels: exactly for a stub runner whose output depends on
the pixel value *and* its place in the tile (so every weight matters), and on interior pixels for
a real trained model. Odd sizes, nodata holes, 1 and 13 bands, any batch size, row and column ranges.
(A killed engine: tests/faults/test_runtime.py.)
"""
from __future__ import annotations


import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

import engine.inference.predict as predict_module
from engine.data.chips import blend_weights, normalise, tile_starts
from engine.data.rasters import RasterStack
from engine.inference.predict import PROBABILITY_NODATA, predict, predict_strips

CLASSES = [{"value": 0, "name": "a", "colour": "#000000"}, {"value": 1, "name": "b", "colour": "#ff0000"},
           {"value": 5, "name": "c", "colour": "#00ff00"}]


class PlacedRunner:
    """Probabilities from each band's value and the pixel's place in the tile: a seam, a wrong
    weight or a shifted tile changes the blend."""

    device = "cpu"

    def __init__(self, bands: int, size: int = 48):
        self.card = {"classes": CLASSES, "chip_size": size,
                     "input": {"bands": list(range(1, bands + 1)), "band_names": [None] * bands,
                               "mean": [50.0] * bands, "std": [20.0] * bands}}
        self.calls = []
        i = np.arange(size, dtype=np.float32)
        self.place = np.sin(i[:, None] / 7.0) * np.cos(i[None, :] / 5.0)

    def __call__(self, batch):
        self.calls.append(len(batch))
        s = batch.mean(1)  # (B, h, w)
        logits = np.stack([s, -s + self.place, 0.5 * self.place - 0.2 * batch[:, -1]], 1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)


def write_raster(path, data: np.ndarray, nodata=0):
    bands, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=data.dtype, nodata=nodata,
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 6000000)) as dst:
        dst.write(data)
    return str(path)


def random_image(bands, h, w, seed=0, holes=True):
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 120, (bands, h, w)).astype(np.uint16)
    if holes:
        data[:, 10:30, 20:60] = 0      # a nodata hole inside
        data[:, h - 7:, :15] = 0       # and one at the edge
        data[2 % bands, 40:45, 5:9] = 0  # a hole in one band only
    return data


def naive_blend(runner, image: str, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [K, H, W], valid [H, W]): every tile of the whole raster, one accumulator."""
    size = runner.card["chip_size"]
    inp = runner.card["input"]
    with RasterStack([image], inp["bands"]) as stack:
        H, W = stack.grid.height, stack.grid.width
        data, valid = stack.read(Window(0, 0, max(W, size), max(H, size)))
    x = normalise(data, valid, inp["mean"], inp["std"])
    weights = blend_weights(size, overlap)
    acc = np.zeros((len(runner.card["classes"]),) + valid.shape, np.float32)
    wsum = np.zeros(valid.shape, np.float32)
    stride = size - overlap
    for r in tile_starts(H, size, stride):
        for c in tile_starts(W, size, stride):
            if not valid[r:r + size, c:c + size].any():
                continue
            p = runner(x[None, :, r:r + size, c:c + size])[0]
            acc[:, r:r + size, c:c + size] += p * weights
            wsum[r:r + size, c:c + size] += weights
    return acc[:, :H, :W] / np.maximum(wsum[:H, :W], 1e-12), valid[:H, :W] & (wsum[:H, :W] > 0)


def expected_outputs(p, ok):
    values = np.array([c["value"] for c in CLASSES])
    labels = values[p.argmax(0)].astype(np.uint8)
    labels[~ok] = 255
    pct = np.round(p * 100).astype(np.uint8)
    pct[:, ~ok] = PROBABILITY_NODATA
    return labels, pct


def read(path):
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.mark.parametrize("bands, height, width, batch_size, overlap, panel", [
    (1, 157, 203, 8, 12, None),     # odd sizes, one band
    (13, 100, 131, 3, 12, None),    # 13 bands, batch not dividing the tiles of a row
    (6, 96, 96, 1, 0, None),        # no overlap, one tile at a time
    (4, 30, 70, 16, 12, None),      # smaller than a tile in one direction
    (3, 77, 301, 4, 12, 64),        # a wide raster in panels of 64 columns (the last one wider)
    (2, 60, 260, 5, 0, 64),         # panels without overlap
])
def test_streamed_prediction_equals_a_whole_image_blend(monkeypatch, tmp_path, bands, height, width, batch_size,
                                                        overlap, panel):
    runner = PlacedRunner(bands)
    monkeypatch.setattr(predict_module, "load_runner", lambda *a, **k: runner)
    if panel:
        monkeypatch.setattr(predict_module, "PANEL", panel)
        assert len(predict_module.panels(width, 48)) > 2
    image = write_raster(tmp_path / "image.tif", random_image(bands, height, width))
    out, probs = tmp_path / "out.tif", tmp_path / "p.tif"
    predict("stub", [image], out, probabilities=probs, batch_size=batch_size, overlap=overlap)
    labels, pct = expected_outputs(*naive_blend(runner, image, overlap))
    assert np.array_equal(read(out)[0], labels)
    assert np.array_equal(read(probs), pct)
    assert max(runner.calls) <= batch_size


@pytest.mark.parametrize("dtype, nodata", [("int16", -9999), ("float32", float("nan")), ("uint8", 0)])
def test_other_input_types_and_their_nodata(monkeypatch, tmp_path, dtype, nodata):
    """int16 with a negative nodata, float32 with NaN, uint8: the same pixels as the blend."""
    runner = PlacedRunner(3)
    monkeypatch.setattr(predict_module, "load_runner", lambda *a, **k: runner)
    data = random_image(3, 90, 117, seed=5).astype(dtype)
    data[:, 10:30, 20:60] = nodata
    data[2, 40:45, 5:9] = nodata
    if dtype == "int16":
        data[0, 50:60, 50:60] = -300  # negative values are data, not nodata
    image = write_raster(tmp_path / "image.tif", data, nodata=nodata)
    out, probs = tmp_path / "out.tif", tmp_path / "p.tif"
    predict("stub", [image], out, probabilities=probs)
    labels, pct = expected_outputs(*naive_blend(runner, image, 12))
    got = read(out)[0]
    assert np.array_equal(got, labels)
    assert np.array_equal(read(probs), pct)
    assert (got[10:30, 20:60] == 255).all() and (got[40:45, 5:9] == 255).all()
    assert (got[50:60, 50:60] != 255).all()


def test_any_batch_size_and_any_split_into_row_ranges_give_the_same_pixels(tmp_path):
    runner = PlacedRunner(3)
    image = write_raster(tmp_path / "image.tif", random_image(3, 211, 120, seed=3))
    inp = runner.card["input"]

    def strips(batch_size, rows=None):
        with RasterStack([image], inp["bands"]) as stack:
            got = list(predict_strips(stack, runner, inp["mean"], inp["std"], 48, 12, batch_size, rows=rows))
        return np.concatenate([s.probabilities for s in got], 1), [s.row for s in got]

    whole, starts = strips(8)
    assert whole.shape == (3, 211, 120) and starts[0] == 0
    for batch_size in (1, 5):
        assert np.array_equal(strips(batch_size)[0], whole)
    for cuts in ([0, 100, 211], [0, 1, 37, 38, 150, 211], [0, 211]):  # cuts inside and between tile rows
        parts = [strips(8, (a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
        assert [p[1][0] for p in parts] == cuts[:-1]
        assert np.array_equal(np.concatenate([p[0] for p in parts], 1), whole)
    for cuts in ([0, 50, 120], [0, 1, 49, 120]):  # and columns (panels), at any column
        with RasterStack([image], inp["bands"]) as stack:
            parts = [np.concatenate([s.probabilities for s in predict_strips(
                stack, runner, inp["mean"], inp["std"], 48, 12, 8, cols=(a, b))], 1) for a, b in zip(cuts[:-1], cuts[1:])]
        assert np.array_equal(np.concatenate(parts, 2), whole)


def test_a_real_model_matches_the_whole_image_blend_inside(tiny_model, small_scene, tmp_path):
    """The trained tiny model (fp32) through predict vs the naive blend of the same runner."""
    from engine.inference.runners import load_runner

    runner = load_runner(tiny_model, "cpu", precision="32")
    classes = runner.card["classes"]
    size = int(runner.card["chip_size"])
    probs = tmp_path / "p.tif"
    predict(tiny_model, [small_scene.image], tmp_path / "out.tif", probabilities=probs, precision="32",
            device="cpu", batch_size=5)
    p, ok = naive_blend(runner, small_scene.image, size // 4)
    got = read(probs).astype(int)
    want = np.round(p * 100).astype(int)
    inner = (slice(None), slice(8, -8), slice(8, -8))  # interior pixels
    assert ok[inner[1:]].all()
    assert np.abs(got[inner] - want[inner]).max() <= 1  # batch composition changes the last bit only
    with rasterio.open(tmp_path / "out.tif") as ds:
        labels = ds.read(1)
    values = np.array([c["value"] for c in classes])
    sure = np.abs(p[0] - p[1]) > 0.02 if len(classes) == 2 else np.ones(p.shape[1:], bool)
    assert np.array_equal(labels[inner[1:]][sure[inner[1:]]], values[p.argmax(0)][inner[1:]][sure[inner[1:]]])
