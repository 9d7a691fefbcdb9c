"""The real Sen1Floods11 chip (Sentinel-2, all 13 bands, hand-labelled water) as an analyst
with a few labels meets it: train on one half with the default options, predict the whole chip,
score the other half, and compare with a per-pixel classifier trained on the same pixels. Both
halves in turn. No pretrained weights here (tests never download), so the engine's defaults
must still learn what the pixels say; much worse means the defaults (chip size, sampling,
class weights, method, learning rate) do not suit a small labelled area."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from tests.conftest import SEN1FLOODS11, run_engine

IMAGE = SEN1FLOODS11 / "Spain_7370579_S2Hand.tif"
LABELS = SEN1FLOODS11 / "Spain_7370579_LabelHand.tif"
CUT = 256  # columns [0, CUT) and [CUT, 512): the two halves
# Of mIoU, below the per-pixel classifier. One training run on one chip varies with the seed: on the
# left half, seed 0 scored 0.836 with crops drawn from torch's global generator and 0.815 with the
# per-chip generators that make resumed runs exact (a400bd0); seed 1 scores 0.845. 0.05 covers that
# spread; a smaller margin would test the seed's luck, not the defaults.
MARGIN = 0.05


def _halves(tmp_path, train_half: str):
    with rasterio.open(LABELS) as src:
        profile, labels = src.profile, src.read(1)
    sides = {"left": slice(0, CUT), "right": slice(CUT, None)}
    test_half = "right" if train_half == "left" else "left"
    paths = {}
    for role, half in (("train", train_half), ("test", test_half)):
        part = np.full_like(labels, -1)
        part[:, sides[half]] = labels[:, sides[half]]
        paths[role] = tmp_path / f"labels_{role}.tif"
        with rasterio.open(paths[role], "w", **profile) as dst:
            dst.write(part, 1)
        paths[role + "_mask"] = part
    return paths


def _pixel_classifier_miou(train: np.ndarray, test: np.ndarray) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from engine.metrics import confusion, scores

    with rasterio.open(IMAGE) as src:
        image = src.read().astype(np.float32)
    valid = (image != 0).all(axis=0)
    fit, score = valid & (train >= 0), valid & (test >= 0)
    clf = HistGradientBoostingClassifier(random_state=0).fit(image[:, fit].T, train[fit])
    return scores(confusion(test[score], clf.predict(image[:, score].T), 2), ["0", "1"])["miou"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("train_half", ["left", "right"])
def test_defaults_on_the_real_chip_come_close_to_a_pixel_classifier(train_half, tmp_path):
    paths = _halves(tmp_path, train_half)
    # Only what describes the data: -1 means "no label" in this label raster (it has no nodata tag).
    done = run_engine("train", "--image", IMAGE, "--labels", paths["train"], "--ignore-index", "-1",
                      "--out", tmp_path / "model", timeout=900)
    run_engine("predict", "--model", tmp_path / "model", "--image", IMAGE, "--out", tmp_path / "pred.tif")
    result = run_engine("evaluate", "--prediction", tmp_path / "pred.tif", "--labels", paths["test"],
                        "--ignore-index", "-1")
    baseline = _pixel_classifier_miou(paths["train_mask"], paths["test_mask"])
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    print(f"\nreal chip, trained on the {train_half} half, scored on the other: model mIoU {result['miou']:.4f}, "
          f"per-pixel gradient boosting {baseline:.4f} (chip {card['chip_size']}, {card['tuning']['method']}, "
          f"lr {card['training']['lr']}, {card['training']['epochs']} epochs, best {card['training']['best_epoch']})")
    for choice in ("chip size", "tuning full", "learning rate"):  # the log says what was chosen and why
        assert choice in done["_stderr"]
    with rasterio.open(tmp_path / "pred.tif") as pred, rasterio.open(IMAGE) as src:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        values = pred.read(1)
        assert set(np.unique(values)) <= {0, 1, pred.nodata}
        assert (values[(src.read(1) == 0)] == pred.nodata).all()  # nodata stays nodata
    assert result["miou"] >= baseline - MARGIN, (result["miou"], baseline)
