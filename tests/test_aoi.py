"""predict --aoi / --mask: predict only inside an area of interest or a mask raster, skip the tiles
outside; dataset masks (alpha band, internal mask) make pixels nodata; cancel per batch. With the
stub runner of test_outputs (probabilities a known function of the pixel value), counting its tiles."""
from __future__ import annotations

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom

import engine.inference.predict as predict_module
from engine.data.chips import band_statistics, tile_starts
from engine.data.rasters import RasterStack
from engine.inference.predict import predict
from engine.protocol import EngineError, Reporter
from tests.test_outputs import PIXEL, StubRunner, scene, write_image

X0, Y0 = 500000.0, 6000000.0  # write_image's origin (EPSG:32633)
SIZE, STRIDE = 64, 48  # the stub's tile and the default overlap of a quarter tile


class CountingRunner(StubRunner):
    def __init__(self, on_call=None):
        super().__init__(on_call)
        self.tiles = 0
        self.calls = 0

    def __call__(self, batch):
        self.tiles += len(batch)
        self.calls += 1
        return super().__call__(batch)


@pytest.fixture
def runner(monkeypatch):
    r = CountingRunner()
    monkeypatch.setattr(predict_module, "load_runner", lambda *a, **k: r)
    return r


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.nodata


def full_prediction(image, tmp_path):
    """The whole raster predicted (with a separate runner count)."""
    out = tmp_path / "full.tif"
    predict("stub", [image], out)
    return read(out)[0]


def tiles_touching(inside: np.ndarray) -> int:
    rows, cols = tile_starts(inside.shape[0], SIZE, STRIDE), tile_starts(inside.shape[1], SIZE, STRIDE)
    return sum(bool(inside[r:r + SIZE, c:c + SIZE].any()) for r in rows for c in cols)


def test_bbox_aoi_predicts_inside_only_and_never_runs_tiles_outside(runner, tmp_path):
    image = write_image(tmp_path / "in.tif", scene())
    full = full_prediction(image, tmp_path)
    all_tiles = runner.tiles
    runner.tiles = 0
    # columns 200-299, rows 150-259 of the grid, in the image's CRS (metres)
    box = f"{X0 + 200 * PIXEL},{Y0 - 260 * PIXEL},{X0 + 300 * PIXEL},{Y0 - 150 * PIXEL}"
    out = tmp_path / "aoi.tif"
    done = predict("stub", [image], out, aoi=box, uncertainty=tmp_path / "u.tif")
    labels, nodata = read(out)
    inside = np.zeros(labels.shape, bool)
    inside[150:260, 200:300] = True
    assert (labels[inside] == full[inside]).all() and (labels[inside] != nodata).all()
    assert (labels[~inside] == nodata).all()
    unc, unc_nodata = read(tmp_path / "u.tif")
    assert (unc[~inside] == unc_nodata).all() and (unc[inside] != unc_nodata).all()
    assert runner.tiles == done["tiles_run"] == tiles_touching(inside) == 16
    assert all_tiles == done["tiles"] == 13 * 13  # no tile of the full run is all nodata
    with rasterio.open(out) as ds, rasterio.open(image) as src:  # still the full input grid
        assert (ds.transform, ds.shape, ds.crs) == (src.transform, src.shape, src.crs)


def test_polygon_aoi_in_another_crs_is_reprojected(runner, tmp_path):
    image = write_image(tmp_path / "in.tif", scene())
    full = full_prediction(image, tmp_path)
    runner.tiles = 0
    # a triangle in the image's CRS (corners off pixel centres), stored in EPSG:4326 in a 2-layer GeoPackage
    corners = [(120.3, 80.2), (410.7, 130.4), (230.1, 330.6)]  # (col, row)
    ring = [(X0 + c * PIXEL, Y0 - r * PIXEL) for c, r in corners]
    utm = {"type": "Polygon", "coordinates": [ring + [ring[0]]]}
    lonlat = transform_geom("EPSG:32633", "EPSG:4326", utm, precision=-1)
    gpkg = tmp_path / "aoi.gpkg"
    schema = {"geometry": "Polygon", "properties": {"name": "str"}}
    for layer, geometry in (("elsewhere", transform_geom("EPSG:32633", "EPSG:4326", {
            "type": "Polygon", "coordinates": [[(X0, Y0), (X0 + 100, Y0), (X0 + 100, Y0 - 100), (X0, Y0)]]})),
            ("fields", lonlat)):
        with fiona.open(gpkg, "w", driver="GPKG", layer=layer, crs="EPSG:4326", schema=schema) as dst:
            dst.write({"geometry": geometry, "properties": {"name": layer}})
    with pytest.raises(EngineError, match="several layers"):
        predict("stub", [image], tmp_path / "x.tif", aoi=str(gpkg))
    out = tmp_path / "aoi.tif"
    done = predict("stub", [image], out, aoi=str(gpkg), aoi_layer="fields")
    labels, nodata = read(out)
    with rasterio.open(image) as src:
        inside = geometry_mask([utm], out_shape=src.shape, transform=src.transform, invert=True)
    assert 20000 < inside.sum() < 40000
    assert (labels[inside] == full[inside]).all() and (labels[inside] != nodata).all()
    assert (labels[~inside] == nodata).all()
    assert runner.tiles == done["tiles_run"] == tiles_touching(inside) < done["tiles"]


def test_bbox_in_another_crs_and_bad_aois(runner, tmp_path):
    image = write_image(tmp_path / "in.tif", scene())
    with rasterio.open(image) as src:
        left, bottom, right, top = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", X0 + 2000, Y0 - 3000,
                                                                  X0 + 3000, Y0 - 2000)
    out = tmp_path / "aoi.tif"
    predict("stub", [image], out, aoi=f"{left},{bottom},{right},{top}@EPSG:4326")
    labels, nodata = read(out)
    predicted = np.argwhere(labels != nodata)
    # the lon/lat box holds the 100 x 100 px box it was made from, and not much more
    assert (labels[200:300, 200:300] != nodata).all()
    assert predicted[:, 0].min() >= 195 and predicted[:, 0].max() <= 305
    assert predicted[:, 1].min() >= 195 and predicted[:, 1].max() <= 305
    with pytest.raises(EngineError, match="does not overlap"):
        predict("stub", [image], tmp_path / "x.tif", aoi="0,0,10,10")
    with pytest.raises(EngineError, match="neither a bounding box nor an existing file"):
        predict("stub", [image], tmp_path / "x.tif", aoi="1,2,3")
    with pytest.raises(EngineError, match="minx < maxx"):
        predict("stub", [image], tmp_path / "x.tif", aoi=f"{X0 + 300},{Y0 - 300},{X0},{Y0}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aoi.qml", "aoi.tif", "in.tif"]


def write_mask(path, values, transform=Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)):
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="uint8", crs="EPSG:32633", transform=transform) as dst:
        dst.write(values.astype(np.uint8), 1)
    return path


def test_mask_raster_predicts_where_non_zero(runner, tmp_path):
    image = write_image(tmp_path / "in.tif", scene())
    full = full_prediction(image, tmp_path)
    runner.tiles = 0
    m = np.zeros((600, 600), np.uint8)
    m[30:90, 480:590] = 1
    m[380:470, 90:160] = 255
    mask = write_mask(tmp_path / "mask.tif", m)
    out = tmp_path / "masked.tif"
    done = predict("stub", [image], out, mask=mask, probabilities=tmp_path / "p.tif")
    labels, nodata = read(out)
    assert (labels[m == 0] == nodata).all()
    assert (labels[m != 0] == full[m != 0]).all() and (labels[m != 0] != nodata).all()
    with rasterio.open(tmp_path / "p.tif") as p:
        assert (p.read()[:, m == 0] == p.nodata).all()
    assert runner.tiles == done["tiles_run"] == tiles_touching(m != 0)
    # with an AOI too: the intersection
    box = f"{X0},{Y0 - 600 * PIXEL},{X0 + 300 * PIXEL},{Y0}"  # the left half
    predict("stub", [image], tmp_path / "both.tif", mask=mask, aoi=box)
    both, _ = read(tmp_path / "both.tif")
    keep = (m != 0) & (np.arange(600) < 300)[None, :]
    assert (both[keep] == full[keep]).all() and (both[~keep] == nodata).all()


def test_mask_on_another_grid_is_refused_before_writing(runner, tmp_path):
    image = write_image(tmp_path / "in.tif", scene())
    shifted = write_mask(tmp_path / "shifted.tif", np.ones((600, 600)), Affine(PIXEL, 0, X0 + 5, 0, -PIXEL, Y0))
    with pytest.raises(EngineError, match="mask shifted.tif is not on the image's grid"):
        predict("stub", [image], tmp_path / "out.tif", mask=shifted, polygons=tmp_path / "r.gpkg")
    smaller = write_mask(tmp_path / "small.tif", np.ones((300, 600)))
    with pytest.raises(EngineError, match="mask small.tif is not on the image's grid"):
        predict("stub", [image], tmp_path / "out.tif", mask=smaller)
    with pytest.raises(EngineError, match="is an input image"):
        predict("stub", [image], smaller, mask=smaller)
    assert runner.tiles == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "shifted.tif", "small.tif"]


def write_masked_image(path, values: np.ndarray, transparent: np.ndarray, how: str):
    """A 4-band RGBA (``alpha``) or a 3-band GeoTIFF with a GDAL internal mask (``internal``), no nodata value."""
    count = 4 if how == "alpha" else 3
    profile = {"driver": "GTiff", "width": values.shape[1], "height": values.shape[0], "count": count,
               "dtype": "uint8", "crs": "EPSG:32633", "transform": Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)}
    if how == "alpha":
        profile["photometric"] = "RGB"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **profile) as dst:
            for b in (1, 2, 3):
                dst.write(values.astype(np.uint8), b)
            if how == "alpha":
                dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
                dst.write(np.where(transparent, 0, 255).astype(np.uint8), 4)
            else:
                dst.write_mask(np.where(transparent, 0, 255).astype(np.uint8))
    return path


@pytest.mark.parametrize("how", ["alpha", "internal"])
def test_dataset_masks_are_nodata_in_reads_statistics_and_predictions(runner, tmp_path, how):
    v = np.full((200, 200), 2, np.uint8)
    transparent = np.zeros((200, 200), bool)
    transparent[:, 136:] = True  # the last column of tiles
    transparent[40:60, 40:60] = True
    v[transparent] = 4  # what lies under the transparent pixels must never be seen
    image = write_masked_image(tmp_path / "in.tif", v, transparent, how)
    with rasterio.open(image) as ds:
        assert ds.nodata is None and ds.mask_flag_enums[0] != (rasterio.enums.MaskFlags.all_valid,)
    with RasterStack([image], [1, 2, 3]) as stack:
        _, valid = stack.read(rasterio.windows.Window(-10, -10, 220, 220))
        assert (valid[10:210, 10:210] == ~transparent).all() and valid.sum() == (~transparent).sum()
        mean, _ = band_statistics(stack, np.ones((200, 200), bool))
        assert mean == [2.0, 2.0, 2.0]  # the 4s under the transparent pixels are not counted
    out = tmp_path / "c.tif"
    predict("stub", [image], out, bands=[1])
    labels, nodata = read(out)
    assert (labels[transparent] == nodata).all() and (labels[~transparent] == 2).all()
    assert runner.tiles == tiles_touching(~transparent) < len(tile_starts(200, SIZE, STRIDE)) ** 2


def test_plain_nodata_rasters_do_not_read_masks(monkeypatch, tmp_path):
    image = write_image(tmp_path / "in.tif", scene(100))
    calls = []
    original = rasterio.io.DatasetReader.read_masks
    monkeypatch.setattr(rasterio.io.DatasetReader, "read_masks",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with RasterStack([image]) as stack:
        _, valid = stack.read(rasterio.windows.Window(0, 0, 100, 100))
    assert not calls and (~valid).sum() == (scene(100) == 0).sum()


def test_cancel_during_a_batch_stops_before_the_next_batch(monkeypatch, tmp_path):
    reporter = Reporter("quiet")
    r = CountingRunner(on_call=reporter.cancel)
    monkeypatch.setattr(predict_module, "load_runner", lambda *a, **k: r)
    image = write_image(tmp_path / "in.tif", scene(300))  # 6 tiles a row: 3 batches of 2 in the first row
    done = predict("stub", [image], tmp_path / "c.tif", batch_size=2, reporter=reporter)
    assert done["cancelled"] is True
    assert (r.calls, r.tiles) == (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["in.tif"]


def test_cli_aoi_and_mask(demo_scene, tmp_path):
    from tests.conftest import run_engine

    model = tmp_path / "model"
    run_engine("train", "--image", demo_scene.image, "--labels", demo_scene.labels, "--weights", "none",
               "--epochs", "1", "--chip-size", "32", "--chips-per-epoch", "16", "--batch-size", "8", "--out", model)
    with rasterio.open(demo_scene.image) as src:
        left, bottom, right, top = src.bounds
        grid = (src.transform, src.shape, src.crs)
        t = src.transform
    out = tmp_path / "c.tif"
    box = f"{left},{bottom},{(left + right) / 2},{(bottom + top) / 2}"  # the lower left quarter
    done = run_engine("predict", "--model", model, "--image", demo_scene.image, "--out", out, "--aoi", box)
    with rasterio.open(out) as ds:
        labels = ds.read(1)
        assert (ds.transform, ds.shape, ds.crs) == grid
    h, w = labels.shape
    assert (labels[h // 2:, :w // 2] != ds.nodata).all()
    assert (labels[:h // 2] == ds.nodata).all() and (labels[:, w // 2:] == ds.nodata).all()
    assert done["tiles_run"] < done["tiles"]
    wrong = write_mask(tmp_path / "wrong.tif", np.ones((8, 8)), t)
    failed = run_engine("predict", "--model", model, "--image", demo_scene.image, "--out", tmp_path / "d.tif",
                        "--mask", wrong, expect_ok=False)
    assert failed["_rc"] != 0 and "wrong.tif" in failed["_stderr"] + str(failed["_events"])
    assert not (tmp_path / "d.tif").exists()
