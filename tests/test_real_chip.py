"""The real Sen1Floods11 chip (Sentinel-2, hand-labelled water): train on the left part,
predict the whole chip, score the right part, and compare with a per-pixel classifier trained
on the same pixels. From random weights a spatial model has little to add to per-pixel
spectra here, so it must come within a few points of the classifier; much worse means the
pipeline loses information (blocky outputs, misaligned grids, wrong normalisation)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from tests.conftest import SEN1FLOODS11, run_engine

BANDS = "2,3,4,9,12,13"  # B2 B3 B4 B8A B11 B12: the HLS bands Prithvi was pretrained on
CUT = 320  # columns [0, CUT) train, [CUT, 512) test
MARGIN = 0.04  # "within a few points" of mIoU


def _split_labels(tmp_path):
    with rasterio.open(SEN1FLOODS11 / "Spain_7370579_LabelHand.tif") as src:
        profile, labels = src.profile, src.read(1)
    paths = {}
    for name, cols in (("train", slice(0, CUT)), ("test", slice(CUT, None))):
        part = np.full_like(labels, -1)
        part[:, cols] = labels[:, cols]
        paths[name] = tmp_path / f"labels_{name}.tif"
        with rasterio.open(paths[name], "w", **profile) as dst:
            dst.write(part, 1)
    return labels, paths


def _pixel_classifier_miou(labels):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from engine.metrics import confusion, scores

    with rasterio.open(SEN1FLOODS11 / "Spain_7370579_S2Hand.tif") as src:
        image = src.read([int(b) for b in BANDS.split(",")]).astype(np.float32)
    valid = (image != 0).all(axis=0)
    train = valid & (labels >= 0)
    train[:, CUT:] = False
    test = valid & (labels >= 0)
    test[:, :CUT] = False
    clf = HistGradientBoostingClassifier(random_state=0).fit(image[:, train].T, labels[train])
    pred = clf.predict(image[:, test].T)
    return scores(confusion(labels[test], pred, 2), ["0", "1"])["miou"]


@pytest.mark.timeout(600)
def test_real_chip_matches_pixel_classifier(tmp_path):
    labels, paths = _split_labels(tmp_path)
    image = SEN1FLOODS11 / "Spain_7370579_S2Hand.tif"
    run_engine("train", "--image", image, "--bands", BANDS, "--labels", paths["train"],
               "--ignore-index", "-1", "--weights", "none", "--chip-size", "64", "--batch-size", "16",
               "--epochs", "1000", "--max-time", "90s", "--out", tmp_path / "model")
    run_engine("predict", "--model", tmp_path / "model", "--image", image, "--out", tmp_path / "pred.tif")
    result = run_engine("evaluate", "--prediction", tmp_path / "pred.tif", "--labels", paths["test"],
                        "--ignore-index", "-1", "--out", tmp_path / "metrics.json")
    model_miou = result["miou"]
    baseline = _pixel_classifier_miou(labels)
    print(f"\nreal chip, held-out right part: model mIoU {model_miou:.4f}, "
          f"per-pixel gradient boosting mIoU {baseline:.4f}")
    (tmp_path / "compare.json").write_text(json.dumps({"model": model_miou, "baseline": baseline}))
    with rasterio.open(tmp_path / "pred.tif") as pred, rasterio.open(image) as src:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        values = pred.read(1)
        assert set(np.unique(values)) <= {0, 1, pred.nodata}
        assert (values[(src.read(1) == 0)] == pred.nodata).all()  # nodata stays nodata
    assert model_miou >= baseline - MARGIN, (model_miou, baseline)
