"""The fault catalogue, part 1: bad inputs (issue 9, "Reliability").

Each test runs the real engine CLI as the QGIS plugin does (``python -m engine ... --events jsonl``)
on one bad input. A refusal must exit with status 2, send one ``error`` event whose message names
the offending file (by name) with a hint saying what to do, and leave nothing at the output path
(no file, no folder, no hidden partial beside it). Inputs the engine can handle (NaN pixels,
saturated pixels, a raster smaller than a tile, labels in another CRS, invalid polygons among
valid ones) must work, with a warning where the user should know. ``GEOPEFT_SHOW_FAULTS=1 pytest -s``
prints every message and warning the tests see.

CASE                                     WHAT THE USER SEES
---------------------------------------  -------------------------------------------------------------
missing image (train / predict)          image file not found: …/missing.tif
                                         hint: check the path and that the file exists
missing labels (train)                   labels file not found: …/nolabels.tif — hint: check the --labels path
missing prediction (evaluate)            prediction file not found: …/missing.tif — hint: check the path …
unreadable image (chmod 000, not root)   cannot read image …/locked.tif: permission denied
                                         hint: make the file readable for your user (its permissions) …
a folder given as the image              image …/folder.tif is a folder, not a raster file
                                         hint: give the raster file itself (e.g. a .tif inside that folder)
not a raster (text named .tif)           cannot read image …/notes.tif: '…' not recognized as being in a
                                         supported file format — hint: give a raster file GDAL can read
zero bands (a VRT without bands)         cannot read image …/nobands.vrt: Missing one of rasterXSize,
                                         rasterYSize or bands on VRTDataset. (GDAL does not open it)
                                         hint: give a raster file GDAL can read (e.g. a GeoTIFF)
band out of range (train / predict)      band 9 is out of range: the image stack (scene.tif) has 6 band(s)
                                         hint: choose bands between 1 and 6
stacked images on another grid / CRS     image other.tif is not on the grid of scene.tif: 64x64 px, … vs …
                                         hint: stack only rasters with the same CRS, pixel size, extent and
                                         size (resample them first, e.g. with gdalwarp or QGIS 'Align rasters')
labels not overlapping (raster/vector)   labels far.tif do not overlap the image
                                         hint: check that the labels and the image cover the same area …
labels with one class                    labels one_class.tif hold only one class (class 1)
                                         hint: label at least two classes
label values not in --classes            labels labels.tif hold class(es) 3, 4 not in --classes (1 water,
                                         2 vegetation) — hint: add them to --classes, or mark them as no
                                         label (--ignore-index, or the label raster's nodata)
all-nodata image (train / predict)       image empty.tif has no valid pixels: every pixel is nodata in at
                                         least one selected band — hint: check the band selection and the
                                         rasters' nodata value
NaN/Inf pixels in a float image          trains (finite loss); warning: image nan.tif: band 1 (BLUE), …
                                         hold(s) NaN or infinite values: those pixels are read as nodata
                                         (not trained on, not predicted)
uint16 saturation (predict)              predicts; warning: image saturated.tif: many pixels are 65535, the
                                         largest uint16 value (band 1 (BLUE) 50%, …): saturated, or a nodata
                                         value the file does not declare. If it is nodata, set the raster's
                                         nodata to 65535 …
1×1 raster (train)                       image one_pixel.tif is 1 x 1 px, smaller than one 32 px training chip
                                         hint: train on a larger image (at least 32 x 32 px)
1×1 raster (predict)                     predicts: a 1×1 class raster on the input grid (one padded tile)
smaller than a chip (train)              image small.tif is 24 x 20 px, smaller than one 32 px training chip
                                         hint: … or a smaller --chip-size (a multiple of 16, at least 32)
smaller than a chip (predict)            predicts: a 24×20 class raster on the input grid (padded tile)
empty/invalid geometries among valid     scored; warning: vector labels broken.geojson: skipped 3 feature(s)
                                         with an empty or invalid geometry; 2 feature(s) used
only empty/invalid geometries (train)    vector labels all_broken.geojson have no usable feature: 3
                                         feature(s) with an empty or invalid geometry — hint: fix the
                                         geometries (e.g. QGIS 'Fix geometries') …
missing --label-field                    field 'klass' not found in labels.gpkg
                                         hint: choose one of: class_id, class_name
geographic (EPSG:4326) vector labels     trains: the polygons are reprojected onto the image grid
predict --out = an input image           --out …/scene.tif is an input image (…): writing it would destroy it
                                         hint: give --out a new file name
train --out = an input image             --out …/scene.tif is an input image (scene.tif): writing the model
                                         there would destroy it — hint: give --out a new folder name
evaluate --out = the prediction          --out …/prediction.tif is the prediction (prediction.tif): writing the
                                         metrics there would destroy it — hint: give --out a new file name
--out under a file (train / predict)     cannot write --out …/notes.txt/model: notes.txt (…) is a file, not a
                                         folder — hint: choose --out in a folder (not under the file notes.txt)
--out in a read-only folder (not root)   cannot write --out …: the folder …/readonly is not writable
                                         hint: choose a folder you can write to, or change its permissions
predict --out = an existing folder       cannot write --out …/result: result is an existing folder
                                         hint: give --out a file name (e.g. …/result/result.tif)
evaluate, prediction on another grid     labels labels.tif do not overlap the prediction far.tif
  (not overlapping the labels)           hint: check that the labels and the prediction far.tif cover …
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine
from fiona.transform import transform_geom

from tests.conftest import TINY, run_engine

CRS = "EPSG:32633"  # the demo scene's grid: 30 m pixels from (500000, 5000020)
TRANSFORM = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 5000020.0)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- helpers ------------------------------------------------------------------------------------

def _refused(result: dict, *names: str, rc: int = 2) -> dict:
    """Assert a clean refusal: exit ``rc``, done(ok=False), exactly one error event, a user error
    (EngineError or one of its typed kinds, never InternalError), whose message names every one of
    ``names`` and which carries a hint; no traceback. Returns it."""
    stderr = result["_stderr"]
    assert result["_rc"] == rc, stderr[-3000:]
    assert result.get("ok") is False
    errors = [e for e in result["_events"] if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["error_type"] != "InternalError", errors or stderr[-3000:]
    error = errors[0]
    for name in names:
        assert name in error["message"], (name, error)
    assert error.get("hint") and len(error["hint"]) > 10, error
    assert "Traceback" not in stderr, stderr[-3000:]
    if os.environ.get("GEOPEFT_SHOW_FAULTS"):  # to review what the user sees: pytest -s
        print(f"\n  {error['message']}\n  hint: {error['hint']}")
    return error


def _worked(result: dict) -> dict:
    assert result["_rc"] == 0 and result.get("ok"), result["_stderr"][-3000:]
    assert not [e for e in result["_events"] if e["event"] == "error"]
    return result


def _warnings(result: dict) -> list[str]:
    found = [e["message"] for e in result["_events"] if e["event"] == "warning"]
    if os.environ.get("GEOPEFT_SHOW_FAULTS"):
        print("".join(f"\n  warning: {w}" for w in found))
    return found


@pytest.fixture
def out_dir(tmp_path):
    """An empty folder for the outputs: after a refusal it must still be empty (no output, no
    hidden partial file or folder)."""
    folder = tmp_path / "out"
    folder.mkdir()
    yield folder


def _empty(folder) -> None:
    left = sorted(p.name for p in folder.iterdir())
    assert not left, f"left in {folder}: {left}"


def _write(path, data, *, crs=CRS, transform=TRANSFORM, nodata=None, descriptions=None, tags=None):
    data = np.asarray(data)
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or []):
            dst.set_band_description(i + 1, d)
        if tags:
            dst.update_tags(**tags)
    return path


def _scene_pixels(small_scene):
    """(pixels [6, 96, 96] uint16, band names) of the small scene."""
    with rasterio.open(small_scene.image) as src:
        return src.read(), list(src.descriptions)


def _copy_scene(small_scene, folder, data=None, name="scene.tif", **kw):
    """The small scene's image (or other ``data`` on its grid) as a new file in ``folder``."""
    pixels, names = _scene_pixels(small_scene)
    return _write(folder / name, pixels if data is None else data, descriptions=names,
                  **{"nodata": 0, **kw})


def _train(small_scene, out, *args, image=None, labels=None, expect_ok=False):
    return run_engine("train", "--image", image or small_scene.image, "--labels", labels or small_scene.labels,
                      *TINY, *args, "--out", out, expect_ok=expect_ok)


def _predict(model, image, out, *args):
    return run_engine("predict", "--model", model, "--image", image, "--out", out, *args, expect_ok=False)


def _geojson(path, features):
    """A GeoJSON file in the scene's CRS with ``features`` [(geometry or None, class_id)]."""
    path.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
        "features": [{"type": "Feature", "properties": {"class_id": v}, "geometry": g} for g, v in features]}))
    return path


def _box(col0, row0, col1, row1):
    """A polygon over image pixels [row0, row1) x [col0, col1) of the scene grid."""
    (x0, y0), (x1, y1) = TRANSFORM @ (col0, row0), TRANSFORM @ (col1, row1)
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


BROKEN = [  # geometries that cannot be burnt, as a GIS hands them over
    None,                                                            # no geometry
    {"type": "Polygon", "coordinates": []},                          # empty
    {"type": "Polygon", "coordinates": [[[500000.0, 5000000.0], [500300.0, 5000000.0]]]},  # a ring of 2 points
]


# -- files that are not there or not rasters ----------------------------------------------------

def test_train_missing_image(small_scene, tmp_path, out_dir):
    result = _train(small_scene, out_dir / "model", image=tmp_path / "missing.tif")
    error = _refused(result, "missing.tif")
    assert "not found" in error["message"]
    _empty(out_dir)


def test_train_missing_labels(small_scene, tmp_path, out_dir):
    result = _train(small_scene, out_dir / "model", labels=tmp_path / "nolabels.tif")
    error = _refused(result, "nolabels.tif")
    assert "--labels" in error["hint"]
    _empty(out_dir)


def test_predict_missing_image(tiny_model, tmp_path, out_dir):
    _refused(_predict(tiny_model, tmp_path / "missing.tif", out_dir / "p.tif"), "missing.tif")
    _empty(out_dir)


def test_evaluate_missing_prediction(small_scene, tmp_path, out_dir):
    result = run_engine("evaluate", "--prediction", tmp_path / "missing.tif", "--labels", small_scene.labels,
                        "--out", out_dir / "metrics.json", expect_ok=False)
    _refused(result, "missing.tif")
    _empty(out_dir)


@pytest.mark.skipif(IS_ROOT or os.name == "nt", reason="root reads files whatever their permissions")
def test_unreadable_image(small_scene, tmp_path, out_dir):
    locked = _copy_scene(small_scene, tmp_path, name="locked.tif")
    os.chmod(locked, 0)
    try:
        error = _refused(_train(small_scene, out_dir / "model", image=locked), "locked.tif")
        assert "permission" in error["message"]
    finally:
        os.chmod(locked, stat.S_IRUSR | stat.S_IWUSR)
    _empty(out_dir)


def test_folder_given_as_image(small_scene, tmp_path, out_dir):
    folder = tmp_path / "folder.tif"
    folder.mkdir()
    error = _refused(_train(small_scene, out_dir / "model", image=folder), "folder.tif")
    assert "is a folder" in error["message"]
    _empty(out_dir)


def test_text_file_named_tif(small_scene, tmp_path, out_dir):
    notes = tmp_path / "notes.tif"
    notes.write_text("these are field notes, not pixels\n")
    error = _refused(_train(small_scene, out_dir / "model", image=notes), "notes.tif")
    assert "cannot read" in error["message"] and "GDAL" in error["hint"]
    _empty(out_dir)


def test_vrt_with_zero_bands(small_scene, tmp_path, out_dir):
    """A VRT that lists no band. GDAL itself refuses to open it ("Missing one of rasterXSize,
    rasterYSize or bands"), so the engine never sees a 0-band dataset from a file here; its
    message is passed on with the file name and a hint. (A driver that does open a 0-band
    dataset is refused by open_raster: "image X has no bands".)"""
    vrt = tmp_path / "nobands.vrt"
    vrt.write_text('<VRTDataset rasterXSize="64" rasterYSize="64">\n'
                   f'  <SRS>{CRS}</SRS>\n  <GeoTransform>500000, 30, 0, 5000020, 0, -30</GeoTransform>\n'
                   '</VRTDataset>\n')
    error = _refused(_train(small_scene, out_dir / "model", image=vrt), "nobands.vrt")
    assert "bands" in error["message"]
    _empty(out_dir)


# -- bands and grids ----------------------------------------------------------------------------

def test_train_band_out_of_range(small_scene, out_dir):
    error = _refused(_train(small_scene, out_dir / "model", "--bands", "9"), "scene.tif", "band 9")
    assert "between 1 and 6" in error["hint"]
    _empty(out_dir)


def test_predict_band_out_of_range(tiny_model, small_scene, out_dir):
    result = _predict(tiny_model, small_scene.image, out_dir / "p.tif", "--bands", "9")
    _refused(result, "scene.tif", "band 9")
    _empty(out_dir)


def test_stacked_images_on_other_grids(small_scene, tmp_path, out_dir):
    pixels, _ = _scene_pixels(small_scene)
    other = _write(tmp_path / "other.tif", pixels[:1, :64, :64])  # same origin and CRS, another size
    result = _train(small_scene, out_dir / "model", "--image", other)
    error = _refused(result, "other.tif", "scene.tif")
    assert "grid" in error["message"] and "Align rasters" in error["hint"]
    _empty(out_dir)


def test_stacked_images_in_other_crs(tiny_model, small_scene, tmp_path, out_dir):
    pixels, _ = _scene_pixels(small_scene)
    other = _write(tmp_path / "utm34.tif", pixels[:1], crs="EPSG:32634")  # same numbers, another CRS
    result = run_engine("predict", "--model", tiny_model, "--image", small_scene.image, "--image", other,
                        "--bands", "1-6", "--out", out_dir / "p.tif", expect_ok=False)
    error = _refused(result, "utm34.tif", "scene.tif")
    assert "32634" in error["message"]
    _empty(out_dir)


# -- labels -------------------------------------------------------------------------------------

def test_raster_labels_not_overlapping_image(small_scene, tmp_path, out_dir):
    with rasterio.open(small_scene.labels) as src:
        labels = src.read(1)
    far = _write(tmp_path / "far.tif", labels, nodata=0, transform=TRANSFORM @ Affine.translation(10_000, 0))
    error = _refused(_train(small_scene, out_dir / "model", labels=far), "far.tif")
    assert "overlap" in error["message"]
    _empty(out_dir)


def test_vector_labels_not_overlapping_image(small_scene, tmp_path, out_dir):
    far = _geojson(tmp_path / "far.geojson", [(_box(5000, 5000, 5040, 5040), 1), (_box(6000, 0, 6040, 40), 2)])
    result = _train(small_scene, out_dir / "model", "--label-field", "class_id", labels=far)
    error = _refused(result, "far.geojson")
    assert "overlap" in error["message"]
    _empty(out_dir)


def test_labels_with_one_class(small_scene, tmp_path, out_dir):
    one = _write(tmp_path / "one_class.tif", np.ones((96, 96), np.uint8), nodata=0)
    error = _refused(_train(small_scene, out_dir / "model", labels=one), "one_class.tif")
    assert "one class" in error["message"] and "two classes" in error["hint"]
    _empty(out_dir)


def test_label_values_not_in_classes(small_scene, out_dir):
    classes = json.dumps([{"value": 1, "name": "water"}, {"value": 2, "name": "vegetation"}])
    error = _refused(_train(small_scene, out_dir / "model", "--classes", classes), "labels.tif", "3, 4")
    assert "--classes" in error["message"] and "--ignore-index" in error["hint"]
    _empty(out_dir)


def test_missing_label_field(small_scene, out_dir):
    result = _train(small_scene, out_dir / "model", "--label-field", "klass", labels=small_scene.polygons)
    error = _refused(result, "labels.gpkg", "klass")
    assert "class_id" in error["hint"] and "class_name" in error["hint"]  # the fields that exist
    _empty(out_dir)


def test_vector_labels_with_invalid_geometries_are_skipped(small_scene, tmp_path, out_dir):
    """Empty and broken geometries among valid ones: skipped with a warning that counts them."""
    labels = _geojson(tmp_path / "broken.geojson", [(g, 1) for g in BROKEN] +
                      [(_box(0, 0, 48, 96), 1), (_box(48, 0, 96, 96), 2)])
    # the reference labels scored against themselves (a prediction on the same grid)
    halves = np.where(np.arange(96) < 48, 1, 2).astype(np.uint8)[None, :].repeat(96, axis=0)
    prediction = _write(tmp_path / "halves.tif", halves, nodata=0)
    result = _worked(run_engine("evaluate", "--prediction", prediction, "--labels", labels, "--label-field",
                                "class_id", "--out", out_dir / "metrics.json", expect_ok=False))
    assert result["miou"] == 1.0 and result["pixels"] == 96 * 96
    assert any("broken.geojson" in w and "skipped 3 feature(s) with an empty or invalid geometry" in w
               for w in _warnings(result)), _warnings(result)


def test_vector_labels_with_only_invalid_geometries(small_scene, tmp_path, out_dir):
    labels = _geojson(tmp_path / "all_broken.geojson", [(g, k % 2 + 1) for k, g in enumerate(BROKEN)])
    result = _train(small_scene, out_dir / "model", "--label-field", "class_id", labels=labels)
    error = _refused(result, "all_broken.geojson", "3 feature(s) with an empty or invalid geometry")
    assert "Fix geometries" in error["hint"]
    _empty(out_dir)


def test_geographic_labels_on_projected_image(small_scene, tmp_path, out_dir):
    """Polygons in EPSG:4326 on a UTM image: reprojected onto the image grid, and it trains."""
    wgs = tmp_path / "labels_wgs84.gpkg"
    with fiona.open(small_scene.polygons) as src:
        schema, crs = src.schema, src.crs
        with fiona.open(wgs, "w", driver="GPKG", schema=schema, crs="EPSG:4326") as dst:
            for feat in src:
                dst.write({"geometry": transform_geom(crs, "EPSG:4326", feat.geometry),
                           "properties": dict(feat.properties)})
    result = _worked(_train(small_scene, out_dir / "model", "--label-field", "class_id", labels=wgs))
    card = json.loads((out_dir / "model" / "card.json").read_text())
    assert [c["value"] for c in card["classes"]] == [1, 2, 3, 4]
    assert result["out"] == str(out_dir / "model")


# -- pixel values -------------------------------------------------------------------------------

def test_train_all_nodata_image(small_scene, tmp_path, out_dir):
    empty = _copy_scene(small_scene, tmp_path, np.zeros((6, 96, 96), np.uint16), name="empty.tif")
    error = _refused(_train(small_scene, out_dir / "model", image=empty), "empty.tif")
    assert "no valid pixels" in error["message"] and "nodata" in error["hint"]
    _empty(out_dir)


def test_predict_all_nodata_image(tiny_model, small_scene, tmp_path, out_dir):
    empty = _copy_scene(small_scene, tmp_path, np.zeros((6, 96, 96), np.uint16), name="empty.tif")
    error = _refused(_predict(tiny_model, empty, out_dir / "p.tif"), "empty.tif")
    assert "no valid pixels" in error["message"]
    _empty(out_dir)


def test_nan_and_inf_pixels_are_nodata(small_scene, tmp_path, out_dir):
    """A float image with NaN and ±Inf pixels (no nodata value): those pixels are nodata, with a
    warning; training runs with a finite loss."""
    pixels, _ = _scene_pixels(small_scene)
    floats = pixels.astype(np.float32) / 10000
    floats[0, 10:30, 10:30] = np.nan
    floats[3, 50:60, :] = np.inf
    floats[5, :, 70:72] = -np.inf
    image = _copy_scene(small_scene, tmp_path, floats, name="nan.tif", nodata=None)
    result = _worked(_train(small_scene, out_dir / "model", image=image))
    assert any("nan.tif" in w and "NaN or infinite" in w and "BLUE" in w for w in _warnings(result)), \
        _warnings(result)
    losses = [e["value"] for e in result["_events"] if e["event"] == "metric" and "loss" in e["name"]]
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert (out_dir / "model" / "card.json").exists()


def test_uint16_saturation_warns(tiny_model, small_scene, tmp_path, out_dir):
    pixels, _ = _scene_pixels(small_scene)
    pixels[:, :48] = 65535  # the top half saturated in every band
    image = _copy_scene(small_scene, tmp_path, pixels, name="saturated.tif")
    result = _worked(_predict(tiny_model, image, out_dir / "p.tif"))
    assert any("saturated.tif" in w and "65535" in w for w in _warnings(result)), _warnings(result)
    assert (out_dir / "p.tif").exists()


# -- sizes --------------------------------------------------------------------------------------

def _crop(small_scene, tmp_path, name, height, width):
    pixels, _ = _scene_pixels(small_scene)
    return _copy_scene(small_scene, tmp_path, np.ascontiguousarray(pixels[:, 30:30 + height, 30:30 + width]),
                       name=name, transform=TRANSFORM @ Affine.translation(30, 30))


def test_train_one_pixel_raster(small_scene, tmp_path, out_dir):
    image = _crop(small_scene, tmp_path, "one_pixel.tif", 1, 1)
    with rasterio.open(small_scene.labels) as src:
        labels = _write(tmp_path / "one_label.tif", src.read(1)[30:31, 30:31], nodata=0,
                        transform=TRANSFORM @ Affine.translation(30, 30))
    error = _refused(_train(small_scene, out_dir / "model", image=image, labels=labels), "one_pixel.tif",
                     "1 x 1 px")
    assert "larger image" in error["hint"]
    _empty(out_dir)


def test_train_raster_smaller_than_a_chip(small_scene, tmp_path, out_dir):
    """--chip-size 32 on a 24 x 20 px image: refused (a chip would be mostly padding)."""
    image = _crop(small_scene, tmp_path, "small.tif", 20, 24)
    error = _refused(_train(small_scene, out_dir / "model", image=image), "small.tif", "24 x 20 px")
    assert "--chip-size" in error["hint"]
    _empty(out_dir)


@pytest.mark.parametrize("height, width", [(1, 1), (20, 24)], ids=["one_pixel", "smaller_than_a_tile"])
def test_predict_raster_smaller_than_a_tile(tiny_model, small_scene, tmp_path, out_dir, height, width):
    """Prediction works on a raster smaller than the model's tile: one padded tile, output on the
    input grid."""
    image = _crop(small_scene, tmp_path, "small.tif", height, width)
    _worked(_predict(tiny_model, image, out_dir / "p.tif"))
    with rasterio.open(out_dir / "p.tif") as out, rasterio.open(image) as src:
        assert (out.width, out.height, out.crs) == (width, height, src.crs)
        assert out.transform.almost_equals(src.transform)
        classes = out.read(1)
        assert (classes != out.nodata).all() and set(np.unique(classes)) <= {1, 2, 3, 4}


# -- outputs ------------------------------------------------------------------------------------

def test_predict_out_is_an_input(tiny_model, small_scene, tmp_path):
    image = _copy_scene(small_scene, tmp_path)
    before = image.read_bytes()
    error = _refused(_predict(tiny_model, image, image), "scene.tif")
    assert "input image" in error["message"]
    assert image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_train_out_is_an_input(small_scene, tmp_path):
    image = _copy_scene(small_scene, tmp_path)
    before = image.read_bytes()
    error = _refused(_train(small_scene, image, image=image), "scene.tif")
    assert "input image" in error["message"]
    assert image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_evaluate_out_is_the_prediction(small_scene, tmp_path):
    prediction = tmp_path / "prediction.tif"
    shutil.copy(small_scene.labels, prediction)
    before = prediction.read_bytes()
    result = run_engine("evaluate", "--prediction", prediction, "--labels", small_scene.labels,
                        "--out", prediction, expect_ok=False)
    error = _refused(result, "prediction.tif")
    assert "destroy" in error["message"]
    assert prediction.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["prediction.tif"]


def test_train_out_under_a_file(small_scene, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder\n")
    error = _refused(_train(small_scene, notes / "model"), "notes.txt")
    assert "is a file, not a folder" in error["message"]
    assert notes.read_text() == "a file, not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_predict_out_under_a_file(tiny_model, small_scene, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder\n")
    error = _refused(_predict(tiny_model, small_scene.image, notes / "sub" / "p.tif"), "notes.txt")
    assert "is a file, not a folder" in error["message"]
    assert notes.read_text() == "a file, not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_predict_out_is_a_folder(tiny_model, small_scene, out_dir):
    folder = out_dir / "result"
    folder.mkdir()
    error = _refused(_predict(tiny_model, small_scene.image, folder), "result")
    assert "existing folder" in error["message"]
    assert [p.name for p in out_dir.iterdir()] == ["result"]
    _empty(folder)


@pytest.mark.skipif(IS_ROOT or os.name == "nt", reason="root writes into any folder whatever its permissions")
def test_train_out_in_a_read_only_folder(small_scene, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    try:
        error = _refused(_train(small_scene, readonly / "model"), "readonly")
        assert "not writable" in error["message"]
        _empty(readonly)
    finally:
        os.chmod(readonly, 0o755)


def test_evaluate_prediction_on_another_grid(small_scene, tmp_path, out_dir):
    """A prediction on a grid that does not overlap the labels (another place): refused, naming
    both files."""
    with rasterio.open(small_scene.labels) as src:
        classes = src.read(1)
    far = _write(tmp_path / "far.tif", classes, nodata=0, transform=TRANSFORM @ Affine.translation(0, 5_000))
    result = run_engine("evaluate", "--prediction", far, "--labels", small_scene.labels,
                        "--out", out_dir / "metrics.json", expect_ok=False)
    error = _refused(result, "labels.tif", "far.tif")
    assert "overlap" in error["message"]
    _empty(out_dir)
