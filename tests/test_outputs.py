"""predict's outputs besides the class raster: uncertainty, polygons, cloud-optimised layout with
overviews, the QGIS style; all atomic. Most tests run ``predict`` with a stub runner whose
probabilities are known exactly (a function of the pixel value); one runs the CLI end to end
with a tiny trained model."""
from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine

import engine.inference.predict as predict_module
from engine.inference.predict import predict
from engine.protocol import EngineError, Reporter
from tests.conftest import run_engine

CLASSES = [{"value": 1, "name": "water", "colour": "#1f78b4"}, {"value": 2, "name": "forest", "colour": "#33a02c"},
           {"value": 3, "name": "town", "colour": "#e31a1c"}, {"value": 7, "name": "bare", "colour": "#FFFF99"}]
PIXEL = 10.0  # metres
# The stub's probabilities per pixel value: 1-4 one sure class each, 5 split between two, 6 all equal.
TABLE = np.array([[0.25] * 4, [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0.5, 0.5, 0, 0], [0.25] * 4],
                 np.float32)


class StubRunner:
    device = "cpu"

    def __init__(self, on_call=None):
        self.card = {"classes": CLASSES, "chip_size": 64,
                     "input": {"bands": [1], "band_names": [None], "mean": [0.0], "std": [1.0]}}
        self.on_call = on_call

    def __call__(self, batch):
        if self.on_call:
            self.on_call()
        v = np.clip(np.round(batch[:, 0]).astype(int), 0, 6)  # (B, h, w); nodata was normalised to 0
        return np.moveaxis(TABLE[v], -1, 1)  # (B, K, h, w)


@pytest.fixture
def stub(monkeypatch):
    runner = StubRunner()
    monkeypatch.setattr(predict_module, "load_runner", lambda *a, **k: runner)
    return runner


def write_image(path, values: np.ndarray):
    """A one-band uint8 raster in UTM metres, nodata 0."""
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="uint8", nodata=0, crs="EPSG:32633", transform=Affine(PIXEL, 0, 500000, 0, -PIXEL, 6000000)) as dst:
        dst.write(values.astype(np.uint8), 1)
    return path


def scene(size=600):
    v = np.ones((size, size), np.uint8)          # water
    v[100:300, 50:400] = 2                        # a forest block
    v[350:360, 400:420] = 3                       # a town, 200 px
    v[500:502, 500:502] = 3                       # a tiny town, 4 px
    v[400:450, 100:150] = 4                       # bare soil (class value 7)
    v[20:40, 500:580] = 5                         # split between water and forest
    v[60:80, 500:580] = 6                         # all classes equally likely
    v[550:600, 0:60] = 0                          # a nodata hole at the edge
    return v


def test_uncertainty_overviews_and_style(stub, tmp_path):
    image = write_image(tmp_path / "in.tif", v := scene())
    out, unc, prob = tmp_path / "classes.tif", tmp_path / "unc.tif", tmp_path / "prob.tif"
    done = predict("stub", [image], out, probabilities=prob, uncertainty=unc)
    assert done["uncertainty"] == str(unc) and done["style"] == str(tmp_path / "classes.qml")
    with rasterio.open(image) as src, rasterio.open(out) as c, rasterio.open(unc) as u, rasterio.open(prob) as p:
        for ds in (c, u, p):  # on the input grid, tiled 256, deflate, overviews, COG layout
            assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
            assert ds.block_shapes[0] == (256, 256) and ds.compression.name == "deflate"
            assert ds.overviews(1) == [2, 4] and ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert u.dtypes[0] == "uint8" and u.nodata == 255
        un, cl = u.read(1), c.read(1)
        assert (un[v == 0] == 255).all() and (cl[v == 0] == c.nodata).all()
        assert (un[np.isin(v, [1, 2, 3, 4])] == 0).all()
        assert (un[v == 5] == 50).all()  # two classes at 0.5 of four: ln 2 / ln 4
        assert (un[v == 6] == 100).all()
        assert un[v != 0].max() <= 100
        assert (cl[v == 4] == 7).all() and (cl[v == 2] == 2).all()
        assert c.colormap(1)[7][:3] == (0xff, 0xff, 0x99)
        # overviews: nearest for classes (only class values), average for uncertainty
        ov = c.read(1, out_shape=(150, 150))
        assert set(np.unique(ov)) <= {1, 2, 3, 7, c.nodata}
        assert u.read(1, out_shape=(300, 300))[10:20, 250:290].mean() == pytest.approx(50, abs=1)
    root = ET.parse(tmp_path / "classes.qml").getroot()
    entries = root.findall("./pipe/rasterrenderer[@type='paletted']/colorPalette/paletteEntry")
    assert [(int(e.get("value")), e.get("label"), e.get("color")) for e in entries] == \
        [(c["value"], c["name"], c["colour"].lower()) for c in CLASSES]


def test_polygons_match_the_raster_and_min_area_drops_small_ones(stub, tmp_path):
    image = write_image(tmp_path / "in.tif", v := scene())
    out, gpkg = tmp_path / "classes.tif", tmp_path / "regions.gpkg"
    done = predict("stub", [image], out, polygons=gpkg)
    with rasterio.open(out) as c:
        cl, crs = c.read(1), c.crs
    assert fiona.listlayers(gpkg) == ["predictions"]
    with fiona.open(gpkg) as layer:
        assert rasterio.crs.CRS.from_wkt(layer.crs_wkt) == crs
        feats = [(f.properties["class_value"], f.properties["class_name"], f.properties["area"]) for f in layer]
    assert done["polygon_count"] == len(feats)
    names = {c["value"]: c["name"] for c in CLASSES}
    assert all(names[value] == name for value, name, _ in feats)
    for value in (1, 2, 3, 7):  # the areas of each class add up to its pixels in the raster
        area = sum(a for fv, _, a in feats if fv == value)
        assert area == pytest.approx((cl == value).sum() * PIXEL ** 2)
    assert sum(a for *_, a in feats) == pytest.approx((v != 0).sum() * PIXEL ** 2)  # nodata: no polygon
    towns = sorted(a for fv, _, a in feats if fv == 3)
    assert towns == pytest.approx([4 * PIXEL ** 2, 200 * PIXEL ** 2])

    small = tmp_path / "big_regions.gpkg"
    predict("stub", [image], tmp_path / "c2.tif", polygons=small, min_area=10 * PIXEL ** 2)
    with fiona.open(small) as layer:
        kept = [(f.properties["class_value"], f.properties["area"]) for f in layer]
    assert all(a >= 10 * PIXEL ** 2 for _, a in kept)
    assert [a for fv, a in kept if fv == 3] == pytest.approx([200 * PIXEL ** 2])
    assert len(kept) == len(feats) - 1


def test_simplify_needs_shapely_or_simplifies(stub, tmp_path):
    image = write_image(tmp_path / "in.tif", scene(200))
    gpkg = tmp_path / "s.gpkg"
    try:
        import shapely  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="shapely"):
            predict("stub", [image], tmp_path / "c.tif", polygons=gpkg, simplify=15)
        assert not list(tmp_path.glob("c.*")) and not gpkg.exists()
        return
    predict("stub", [image], tmp_path / "c.tif", polygons=gpkg, simplify=15)
    with fiona.open(gpkg) as layer:
        assert len(layer) > 0


@pytest.mark.parametrize("options, message", [
    ({"polygons": "x.shp"}, "must be a GeoPackage"),
    ({"polygons": "x.gpkg", "min_area": -1.0}, "min-area -1.0 must be a number ≥ 0"),
    ({"polygons": "x.gpkg", "simplify": float("nan")}, "simplify nan must be"),
    ({"min_area": 5.0}, "no --polygons output"),
])
def test_bad_output_options_are_refused_before_predicting(stub, tmp_path, options, message):
    image = write_image(tmp_path / "in.tif", scene(100))
    options = {k: tmp_path / v if k == "polygons" else v for k, v in options.items()}
    with pytest.raises(EngineError, match=message) as info:
        predict("stub", [image], tmp_path / "c.tif", **options)
    assert info.value.hint
    assert [p.name for p in tmp_path.iterdir()] == ["in.tif"]


def all_outputs(tmp_path):
    return {"probabilities": tmp_path / "p.tif", "uncertainty": tmp_path / "u.tif", "polygons": tmp_path / "r.gpkg"}


def test_cancel_leaves_none_of_the_outputs(monkeypatch, tmp_path):
    reporter = Reporter("quiet")
    monkeypatch.setattr(predict_module, "load_runner", lambda *a, **k: StubRunner(on_call=reporter.cancel))
    image = write_image(tmp_path / "in.tif", scene(300))
    done = predict("stub", [image], tmp_path / "c.tif", reporter=reporter, **all_outputs(tmp_path))
    assert done["cancelled"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["in.tif"]


def test_a_failure_after_the_rasters_leaves_none_of_the_outputs(stub, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(predict_module, "write_polygons", broken)
    image = write_image(tmp_path / "in.tif", scene(300))
    with pytest.raises(OSError, match="disk full"):
        predict("stub", [image], tmp_path / "c.tif", **all_outputs(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["in.tif"]


def test_cli_writes_every_output_and_reports_it(demo_scene, tmp_path):
    model = tmp_path / "model"
    run_engine("train", "--image", demo_scene.image, "--labels", demo_scene.labels, "--weights", "none",
               "--epochs", "1", "--chip-size", "32", "--chips-per-epoch", "16", "--batch-size", "8", "--out", model)
    paths = {"raster": tmp_path / "c.tif", "probabilities": tmp_path / "p.tif", "uncertainty": tmp_path / "u.tif",
             "polygons": tmp_path / "r.gpkg", "style": tmp_path / "c.qml"}
    done = run_engine("predict", "--model", model, "--image", demo_scene.image, "--out", paths["raster"],
                      "--probabilities", paths["probabilities"], "--uncertainty", paths["uncertainty"],
                      "--polygons", paths["polygons"], "--min-area", "0")
    artifacts = {e["kind"]: e["path"] for e in done["_events"] if e["event"] == "artifact"}
    assert artifacts == {k: str(p) for k, p in paths.items()}
    card = json.loads((model / "card.json").read_text())
    with rasterio.open(demo_scene.image) as src, rasterio.open(paths["raster"]) as c, \
            rasterio.open(paths["uncertainty"]) as u, rasterio.open(paths["probabilities"]) as p:
        nodata_in = (src.read() == 0).all(axis=0)
        un, cl, pr = u.read(1), c.read(1), p.read().astype(float) / 100
        pixel_area = abs(c.transform.a * c.transform.e)
    assert (un[nodata_in] == 255).all() and un[~nodata_in].max() <= 100
    # the uncertainty is the entropy of the written probabilities (up to their rounding to percent)
    q = np.clip(pr[:, ~nodata_in], 1e-12, 1)
    q /= q.sum(axis=0)
    entropy = -(q * np.log(q)).sum(axis=0) / np.log(len(card["classes"])) * 100
    assert np.abs(entropy - un[~nodata_in]).mean() < 3
    with fiona.open(paths["polygons"]) as layer:
        feats = [(f.properties["class_value"], f.properties["class_name"], f.properties["area"]) for f in layer]
    names = {c["value"]: c["name"] for c in card["classes"]}
    assert all(names[v] == n for v, n, _ in feats)
    for value in names:
        assert sum(a for v, _, a in feats if v == value) == pytest.approx((cl == value).sum() * pixel_area)
    entries = ET.parse(paths["style"]).getroot().findall(".//paletteEntry")
    assert [(int(e.get("value")), e.get("label")) for e in entries] == [(c["value"], c["name"]) for c in card["classes"]]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


class CancelAtStage(Reporter):
    """Cancels when ``predict`` reports the given stage: after the rasters are complete."""

    def __init__(self, stage):
        super().__init__("quiet")
        self.stage = stage

    def progress(self, stage, *args, **kwargs):
        if stage == self.stage:
            self.cancel()
        super().progress(stage, *args, **kwargs)


def test_cancel_while_vectorising_leaves_none_of_the_outputs(stub, tmp_path):
    checker = np.indices((120, 120)).sum(axis=0) % 2 + 1  # 7200 one-pixel regions per class
    image = write_image(tmp_path / "in.tif", checker)
    done = predict("stub", [image], tmp_path / "c.tif", reporter=CancelAtStage("polygons"), **all_outputs(tmp_path))
    assert done["cancelled"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["in.tif"]
