"""Where to label next: the most uncertain squares of an uncertainty raster (engine.inference.uncertain)
and ``predict --uncertain-areas``."""
from __future__ import annotations

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine

from engine.inference import uncertain
from engine.inference.uncertain import AREAS_LAYER, find_uncertain_areas, uncertain_areas
from engine.protocol import EngineError
from tests.conftest import run_engine

X0, Y0, PX = 500000.0, 4000000.0, 10.0
S = 16  # square size of the synthetic tests


def write_uncertainty(path, data, nodata=255):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="uint8", nodata=nodata, crs="EPSG:32633", tiled=True, blockxsize=16, blockysize=16,
                       transform=Affine.translation(X0, Y0) @ Affine.scale(PX, -PX)) as dst:
        dst.write(data, 1)
    return path


def square(row, col, h=S, w=S):
    """The expected polygon ring of pixel window (row, col, h, w) in map coordinates."""
    left, top = X0 + col * PX, Y0 - row * PX
    right, bottom = left + w * PX, top - h * PX
    return [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]


@pytest.fixture
def hot_raster(tmp_path):
    """64 × 100 px (4 rows × 6¼ columns of 16 px squares), uncertainty 10 except:
    square (1, 2) 90; (3, 5) 80; (2, 1) 60 on 62.5 % of it, nodata on the rest (listed: ≥ 50 %
    valid, mean over the valid pixels); (0, 0) 100 on 37.5 %, nodata on the rest (skipped); (0, 4)
    all nodata (skipped); the 4-px sliver at the right edge 100 (skipped: 25 % of a square)."""
    data = np.full((64, 100), 10, np.uint8)
    data[16:32, 32:48] = 90
    data[48:64, 80:96] = 80
    data[32:48, 16:32] = 255
    data[32:48, 16:26] = 60  # 10 of 16 columns: 62.5 %
    data[0:16, 0:16] = 255
    data[0:16, 0:6] = 100  # 6 of 16 columns: 37.5 % valid
    data[0:16, 64:80] = 255
    data[:, 96:] = 100
    return write_uncertainty(tmp_path / "unc.tif", data)


def test_the_hot_squares_rank_first_with_exact_geometry(hot_raster, tmp_path):
    out = tmp_path / "areas.gpkg"
    summary = uncertain_areas(hot_raster, out, size_px=S, count=4)
    assert summary == {"areas": 4, "size_px": S, "count": 4, "max_mean_uncertainty": 90.0}
    with fiona.open(out, layer=AREAS_LAYER) as src:
        assert src.crs_wkt and "32633" in src.crs.to_string()
        assert src.schema["geometry"] == "Polygon"
        assert set(src.schema["properties"]) == {"rank", "mean_uncertainty", "valid_fraction"}
        rows = [(f.properties["rank"], f.properties["mean_uncertainty"], f.properties["valid_fraction"],
                 [tuple(p) for p in f.geometry.coordinates[0]]) for f in src]
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert rows[0][1:] == (90.0, 1.0, square(16, 32))
    assert rows[1][1:] == (80.0, 1.0, square(48, 80))
    assert rows[2][1:] == (60.0, 0.625, square(32, 16))  # mean of the valid pixels only
    # then the plain squares (10), the upper-left one first; never the nodata ones or the sliver
    assert rows[3][1:] == (10.0, 1.0, square(0, 16))
    # nothing half-written beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["areas.gpkg", "unc.tif"]


def test_block_reading_gives_the_same_areas(hot_raster, monkeypatch):
    """Column chunks narrower than the raster (as on a 20000 px raster) change nothing."""
    whole = find_uncertain_areas(hot_raster, S, count=30)
    monkeypatch.setattr(uncertain, "CHUNK_PX", 32)  # two squares per read
    assert find_uncertain_areas(hot_raster, S, count=30) == whole
    listed = {(a.row, a.col) for a in whole}
    assert len(whole) == 4 * 6 - 2  # all squares but (0, 0), (0, 4); slivers never
    assert (0, 0) not in listed and (0, 4) not in listed and not any(a.col == 96 for a in whole)
    means = [a.mean for a in whole]
    assert means == sorted(means, reverse=True)


def test_edge_squares_are_clipped_and_count_only_if_half_inside(tmp_path):
    data = np.full((24, 24), 50, np.uint8)  # 16 px squares: a 16×8, 8×16, 8×8 edge part
    data[16:, :16] = 99
    path = write_uncertainty(tmp_path / "edge.tif", data)
    areas = find_uncertain_areas(path, S, count=10)
    # (16, 0) is 16 wide × 8 high: exactly half a square, listed, clipped to the raster
    assert [(a.row, a.col, a.height, a.width, a.mean, a.valid_fraction) for a in areas] == [
        (16, 0, 8, 16, 99.0, 0.5), (0, 0, 16, 16, 50.0, 1.0), (0, 16, 16, 8, 50.0, 0.5)]
    out = tmp_path / "edge.gpkg"
    uncertain_areas(path, out, size_px=S, count=1)
    with fiona.open(out) as src:
        assert [tuple(p) for p in next(iter(src)).geometry.coordinates[0]] == square(16, 0, h=8, w=16)


def test_all_nodata_writes_an_empty_layer_and_bad_options_are_refused(tmp_path):
    path = write_uncertainty(tmp_path / "empty.tif", np.full((32, 32), 255, np.uint8))
    out = tmp_path / "none.gpkg"
    assert uncertain_areas(path, out, size_px=S)["areas"] == 0
    with fiona.open(out, layer=AREAS_LAYER) as src:
        assert len(src) == 0
    with pytest.raises(EngineError, match="GeoPackage"):
        uncertain_areas(path, tmp_path / "x.shp")
    with pytest.raises(EngineError, match="area-size"):
        uncertain_areas(path, tmp_path / "y.gpkg", size_px=0)
    with pytest.raises(EngineError, match="area-count"):
        uncertain_areas(path, tmp_path / "y.gpkg", count=0)


def read_areas(path):
    with fiona.open(path, layer=AREAS_LAYER) as src:
        return [(f.properties["rank"], f.properties["mean_uncertainty"], f.properties["valid_fraction"],
                 [tuple(p) for p in f.geometry.coordinates[0]]) for f in src]


def test_predict_writes_the_uncertain_areas(tiny_model, small_scene, tmp_path):
    """With --uncertainty: the areas are those of the uncertainty raster, in squares of the
    model's chip size; without it: the same areas, and no uncertainty file is left behind."""
    kept = tmp_path / "kept"
    done = run_engine("predict", "--model", tiny_model, "--image", small_scene.image, "--out", kept / "c.tif",
                      "--uncertainty", kept / "u.tif", "--uncertain-areas", kept / "areas.gpkg",
                      "--area-count", "4", "--device", "cpu")
    assert done["uncertain_areas"] == str(kept / "areas.gpkg") and done["area_count"] == 4
    artifact = next(e for e in done["_events"] if e["event"] == "artifact" and e["kind"] == "uncertain_areas")
    assert artifact["path"] == str(kept / "areas.gpkg") and artifact["layer"] == AREAS_LAYER
    chip = 32  # the tiny model's chip size (tests/conftest.py TINY)
    assert artifact["size_px"] == chip and artifact["areas"] == 4
    areas = read_areas(kept / "areas.gpkg")
    expected = tmp_path / "expected.gpkg"
    uncertain_areas(kept / "u.tif", expected, size_px=chip, count=4)
    assert areas == read_areas(expected)
    assert [a[0] for a in areas] == [1, 2, 3, 4]
    assert [a[1] for a in areas] == sorted((a[1] for a in areas), reverse=True)
    with rasterio.open(kept / "u.tif") as src:
        xs = [p[0] for p in areas[0][3]]
        assert max(xs) - min(xs) == pytest.approx(chip * src.res[0])
    # without --uncertainty: streamed for the areas only, then removed
    alone = tmp_path / "alone"
    run_engine("predict", "--model", tiny_model, "--image", small_scene.image, "--out", alone / "c.tif",
               "--uncertain-areas", alone / "areas.gpkg", "--area-count", "4", "--device", "cpu")
    assert sorted(p.name for p in alone.iterdir()) == ["areas.gpkg", "c.qml", "c.tif"]
    assert read_areas(alone / "areas.gpkg") == areas


def test_predict_refuses_bad_area_options(tiny_model, small_scene, tmp_path):
    done = run_engine("predict", "--model", tiny_model, "--image", small_scene.image, "--out", tmp_path / "c.tif",
                      "--area-count", "3", expect_ok=False)
    assert done["_rc"] == 2 and "--uncertain-areas" in done["_stderr"]
    assert not (tmp_path / "c.tif").exists()


def test_output_paths_lock_the_areas():
    from engine.cli import build_parser
    from engine.reliability import output_paths

    args = build_parser().parse_args(["predict", "--model", "m", "--image", "i.tif", "--out", "o.tif",
                                      "--uncertain-areas", "a.gpkg"])
    assert [option for option, _ in output_paths(args)] == ["--out", "--uncertain-areas"]
