"""``evaluate --report``: one self-contained HTML file (charts as PNG data URIs, the metrics'
tables, class areas, the model's training curves), written atomically."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from engine.card import CARD_VERSION
from engine.cli import build_parser
from engine.evaluate import evaluate
from engine.protocol import EngineError
from engine.reliability import output_paths
from engine.report import fmt_area, fmt_count, fmt_score
from tests.conftest import run_engine

PNG = b"\x89PNG\r\n\x1a\n"
SIDE = 96
PIXEL = 10.0  # metres: a pixel is 100 m²
# a class name that must be escaped in HTML
CLASSES = [{"value": 1, "name": "water <b>&", "colour": "#1f78b4"},
           {"value": 2, "name": "forest", "colour": "#33a02c"},
           {"value": 3, "name": "urban", "colour": "#e31a1c"}]
HISTORY = [{"epoch": e, "train_loss": round(1.0 / e, 4), "val_loss": None if e == 2 else round(1.3 / e, 4),
            "val_miou": round(0.4 + 0.08 * e, 4)} for e in range(1, 6)]


def make_card(history: list[dict] | None) -> dict:
    """A hand-made card in the format training writes (training.history as it records it)."""
    training = {"epochs": 5, "best_epoch": 4, "best_val_miou": 0.72}
    if history is not None:
        training["history"] = history
    return {"card_version": CARD_VERSION, "engine_version": "0.1.0", "backbone": {"name": "prithvi_eo_v2_tiny"},
            "decoder": "unet", "tuning": {"method": "lora", "rank": 16, "alpha": 16},
            "input": {"bands": [1, 2], "band_names": ["RED", "NIR_NARROW"], "mean": [0.0, 0.0], "std": [1.0, 1.0]},
            "classes": CLASSES, "chip_size": 32, "training": training}


def write_pair(folder: Path, tagged: bool = True, model_tag: str | None = "model") -> tuple[Path, Path, np.ndarray]:
    """pred.tif (classes 1-3, nodata 255 on the top rows, everywhere) and labels.tif (only the
    left half labelled, nodata 0): the whole raster's predicted counts differ from the counts
    under the labels. Returns (prediction, labels, predicted array)."""
    rng = np.random.default_rng(3)
    reference = np.kron(rng.integers(1, 4, (6, 6)), np.ones((16, 16), np.int64)).astype("uint8")
    predicted = reference.copy()
    noisy = rng.random(reference.shape) < 0.25
    predicted[noisy] = rng.integers(1, 4, int(noisy.sum()))
    predicted[:6] = 255
    reference[:, SIDE // 2:] = 0
    profile = {"driver": "GTiff", "width": SIDE, "height": SIDE, "count": 1, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": Affine(PIXEL, 0, 500000, 0, -PIXEL, 4000000),
               "tiled": True, "blockxsize": 32, "blockysize": 32}
    prediction, labels = folder / "pred.tif", folder / "labels.tif"
    with rasterio.open(labels, "w", nodata=0, **profile) as dst:
        dst.write(reference, 1)
    with rasterio.open(prediction, "w", nodata=255, **profile) as dst:
        dst.write(predicted, 1)
        tags = {}
        if tagged:
            tags["GEOPEFT_CLASSES"] = json.dumps(CLASSES)
        if model_tag:
            tags["GEOPEFT_MODEL"] = model_tag  # as predict writes it: the --model it was given
        dst.update_tags(**tags)
    return prediction, labels, predicted


def write_model(folder: Path, history: list[dict] | None) -> Path:
    model = folder / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps(make_card(history)))
    return model


class Page(HTMLParser):
    """The tables (by id: header and body rows of cell texts) and images (id -> src) of a report."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.headers: dict[str, list[str]] = {}
        self.images: dict[str, str] = {}
        self.ids: set[str] = set()
        self._table = self._row = self._cell = self._id = None
        self._head = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "table":
            self._id = attrs.get("id", "")
            self._table = self.tables.setdefault(self._id, [])
        elif tag == "thead":
            self._head = True
        elif tag == "tr" and self._table is not None:
            self._row = []
            if self._head:
                self.headers[self._id] = self._row
            else:
                self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images[attrs.get("id", f"image{len(self.images)}")] = attrs["src"]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "thead":
            self._head = False
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def rows(self, table: str) -> dict[str, list[str]]:
        """Body rows of a table by their first cell."""
        return {row[0]: row[1:] for row in self.tables[table]}


def png_images(page: Page) -> dict[str, bytes]:
    prefix = "data:image/png;base64,"
    found = {}
    for name, src in page.images.items():
        assert src.startswith(prefix), src[:40]
        found[name] = base64.b64decode(src[len(prefix):], validate=True)
    return found


def test_report_holds_charts_tables_equal_to_the_metrics_and_curves(tmp_path):
    prediction, labels, predicted = write_pair(tmp_path)
    write_model(tmp_path, HISTORY)  # found through the prediction's GEOPEFT_MODEL tag, beside it
    html_path = tmp_path / "out" / "report.html"
    done = run_engine("evaluate", "--prediction", prediction, "--labels", labels, "--out", tmp_path / "m.json",
                      "--report", html_path)
    artifacts = {e["kind"]: e["path"] for e in done["_events"] if e["event"] == "artifact"}
    assert artifacts["report"] == str(html_path) and done["report"] == str(html_path)
    metrics = json.loads((tmp_path / "m.json").read_text())
    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = Page(text)
    images = png_images(page)
    assert set(images) == {"scores-chart", "confusion-chart", "curves-chart"}
    assert all(data.startswith(PNG) and len(data) > 1000 for data in images.values())
    # self-contained: nothing fetched from elsewhere
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # escaped: the class name never appears as markup
    assert "<b>" not in text and "water &lt;b&gt;&amp;" in text
    summary = page.rows("summary")
    assert summary["mIoU"] == [fmt_score(metrics["miou"])]
    assert summary["pixel accuracy"] == [fmt_score(metrics["pixel_accuracy"])]
    assert summary["pixels scored"] == [fmt_count(metrics["pixels"])]
    per_class = page.rows("per-class")
    assert set(per_class) == set(metrics["class_names"])
    for name, pc in metrics["per_class"].items():
        assert per_class[name] == [fmt_score(pc["iou"]), fmt_score(pc["f1"]), fmt_score(pc["precision"]),
                                   fmt_score(pc["recall"]), fmt_count(pc["pixels"])]
    assert metrics["miou"] > 0.3
    # class areas: reference, prediction under the reference, prediction over the whole raster
    areas = page.rows("areas")
    header = page.headers["areas"]
    assert "m²" in header[2] and "whole raster" in header[5]
    matrix = np.array(metrics["confusion_matrix"])
    assert metrics["pixel_area"] == PIXEL * PIXEL and metrics["area_unit"] == "metre"
    for j, c in enumerate(CLASSES):
        whole = int((predicted == c["value"]).sum())
        ref = metrics["per_class"][c["name"]]["pixels"]
        assert metrics["predicted_pixels"][c["name"]] == whole
        assert areas[c["name"]] == [fmt_count(ref), fmt_area(ref * 100.0), fmt_count(matrix[:, j].sum()),
                                    fmt_area(matrix[:, j].sum() * 100.0), fmt_count(whole), fmt_area(whole * 100.0)]
        assert whole > matrix[:, j].sum()  # half the raster is unlabelled
    assert "no-curves" not in page.ids
    # written atomically: beside it, no temporary file or lock left
    assert sorted(os.listdir(html_path.parent)) == ["report.html"]
    assert sorted(os.listdir(tmp_path)) == ["labels.tif", "m.json", "model", "out", "pred.tif"]


def test_report_is_written_through_a_temporary_file(tmp_path, monkeypatch):
    prediction, labels, _ = write_pair(tmp_path, model_tag=None)
    out = tmp_path / "report.html"
    from engine.data import rasters
    real = rasters.atomic_output
    seen = []

    @contextlib.contextmanager
    def spy(path):
        with real(path) as tmp:
            yield tmp
            seen.append(tmp)
            assert Path(tmp).is_file() and Path(tmp) != Path(path) and not Path(path).exists()

    monkeypatch.setattr(rasters, "atomic_output", spy)
    evaluate(prediction, labels, report=out)
    assert len(seen) == 1 and out.is_file() and not seen[0].exists()
    assert sorted(os.listdir(tmp_path)) == ["labels.tif", "pred.tif", "report.html"]


@pytest.mark.parametrize("tagged", [True, False])
def test_whole_raster_counts_with_and_without_class_tags(tmp_path, tagged):
    """Tagged predictions skip unlabelled blocks for the metrics, but the report counts them."""
    prediction, labels, predicted = write_pair(tmp_path, tagged=tagged, model_tag=None)
    result = evaluate(prediction, labels, report=tmp_path / "r.html")
    values = {c["name"]: c["value"] for c in result["classes"]}
    assert result["predicted_pixels"] == {name: int((predicted == v).sum()) for name, v in values.items()}
    plain = evaluate(prediction, labels)
    assert plain["confusion_matrix"] == result["confusion_matrix"]
    assert ("predicted_pixels" in plain) == (not tagged)  # only counted when every block is read anyway


def test_card_without_history_and_no_card_are_said(tmp_path):
    prediction, labels, _ = write_pair(tmp_path)
    write_model(tmp_path, None)
    evaluate(prediction, labels, report=tmp_path / "a.html")
    page = Page((tmp_path / "a.html").read_text(encoding="utf-8"))
    assert "no-curves" in page.ids and "curves-chart" not in page.images
    assert "holds no training curves" in (tmp_path / "a.html").read_text(encoding="utf-8")
    assert len(png_images(page)) == 2
    (tmp_path / "model" / "card.json").unlink()
    (tmp_path / "model").rmdir()
    evaluate(prediction, labels, report=tmp_path / "b.html")  # the tagged model is gone: no curves, no error
    text = (tmp_path / "b.html").read_text(encoding="utf-8")
    assert "No model card was found" in text and "curves-chart" not in Page(text).images


def test_model_option(tmp_path):
    prediction, labels, _ = write_pair(tmp_path, model_tag="/nowhere/model")
    elsewhere = tmp_path / "models"
    elsewhere.mkdir()
    model = write_model(elsewhere, HISTORY)
    out = tmp_path / "r.html"
    done = run_engine("evaluate", "--prediction", prediction, "--labels", labels, "--report", out,
                      "--model", model / "card.json")
    page = Page(out.read_text(encoding="utf-8"))
    assert "curves-chart" in png_images(page) and done["report"] == str(out)
    assert page.rows("meta")["model card"] == [str(model / "card.json")]
    refused = run_engine("evaluate", "--prediction", prediction, "--labels", labels, "--model", model,
                         expect_ok=False)
    assert refused["_rc"] == 2 and "--report" in refused["_stderr"]
    missing = run_engine("evaluate", "--prediction", prediction, "--labels", labels, "--report", out,
                         "--model", tmp_path / "no_model", expect_ok=False)
    assert missing["_rc"] == 2 and "model not found" in missing["_stderr"]
    clash = run_engine("evaluate", "--prediction", prediction, "--labels", labels, "--report", prediction,
                       expect_ok=False)
    assert clash["_rc"] == 2 and "--report" in clash["_stderr"] and prediction.is_file()


def test_report_output_is_locked_like_out():
    args = build_parser().parse_args(["evaluate", "--prediction", "p.tif", "--labels", "l.tif",
                                      "--out", "m.json", "--report", "r.html"])
    assert [option for option, _ in output_paths(args)] == ["--out", "--report"]


def test_missing_matplotlib_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    prediction, labels, _ = write_pair(tmp_path, model_tag=None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(EngineError, match="--report needs matplotlib") as info:
        evaluate(prediction, labels, out=tmp_path / "m.json", report=tmp_path / "r.html")
    assert "pip install" in info.value.hint
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r.html").exists()
