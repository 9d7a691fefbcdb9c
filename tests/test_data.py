"""Rasters, labels, the tiling rule and the spatial split (no torch needed)."""
from __future__ import annotations

import fiona
import numpy as np
import pytest
import rasterio
from fiona.transform import transform_geom
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from engine.data.chips import band_statistics, blend_weights, spatial_split, tile_starts, tile_windows
from engine.data.labels import load_labels
from engine.data.rasters import Grid, RasterStack, parse_band_list
from engine.protocol import EngineError


def test_tiling_rule_covers_every_pixel_and_stays_inside():
    assert tile_starts(100, 224, 112) == [0]
    assert tile_starts(224, 224, 112) == [0]
    assert tile_starts(500, 224, 112) == [0, 112, 224, 276]
    for length in (224, 300, 511, 1000):
        starts = tile_starts(length, 64, 48)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + 64] = True
            assert s + 64 <= length
        assert covered.all()
    assert len(tile_windows(300, 500, 224, 112)) == len(tile_starts(300, 224, 112)) * len(tile_starts(500, 224, 112))


def test_blend_weights_favour_tile_centres():
    w = blend_weights(64, 16)
    assert w.shape == (64, 64) and w.min() > 0 and w[32, 32] == 1.0
    assert w[0, 0] < w[8, 8] < w[32, 32] and np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])


def test_spatial_split_takes_whole_blocks_deterministically():
    index = np.zeros((256, 256), np.int16)
    index[:, :20] = -1
    val = spatial_split(index, 64, 0.25, seed=1)
    share = (val & (index >= 0)).sum() / (index >= 0).sum()
    assert 0.15 <= share <= 0.45
    assert np.array_equal(val, spatial_split(index, 64, 0.25, seed=1))
    # whole blocks: every 32×32 block (block size after shrinking for a small raster) is all-in or all-out
    blocks = val.reshape(8, 32, 8, 32).transpose(0, 2, 1, 3).reshape(64, -1)
    assert all(b.all() or not b.any() for b in blocks)
    assert not spatial_split(index, 64, 0.0, seed=1).any()


def test_stack_of_two_rasters_selects_bands_across_files(demo_scene, tmp_path):
    with rasterio.open(demo_scene.image) as src:
        profile, data = src.profile, src.read()
    profile.update(count=2)
    second = tmp_path / "second.tif"
    with rasterio.open(second, "w", **profile) as dst:
        dst.write(data[:2] + 1)
    with RasterStack([demo_scene.image, second], parse_band_list("3,7-8")) as stack:
        assert stack.count == 3 and stack.band_names == ["RED", "", ""]
        block, valid = stack.read(Window(10, 20, 30, 40))
        assert np.array_equal(block[0][valid], data[2, 20:60, 10:40][valid])
        assert np.array_equal(block[1][valid], data[0, 20:60, 10:40][valid] + 1)
        # a window past the edge is padded with invalid pixels
        edge, edge_valid = stack.read(Window(-16, 100, 32, 32))
        assert not edge_valid[:, :16].any() and edge_valid[:, 16:].all() and not edge[:, :, :16].any()


def test_stack_errors(demo_scene, tmp_path):
    with pytest.raises(EngineError, match="not found"):
        RasterStack([tmp_path / "missing.tif"])
    with pytest.raises(EngineError, match="band 9 is out of range"):
        RasterStack([demo_scene.image], [1, 9])
    with rasterio.open(demo_scene.image) as src:
        profile, data = src.profile, src.read()
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(shifted, "w", **{**profile, "transform": profile["transform"] @ rasterio.Affine.translation(3, 0)}) as dst:
        dst.write(data)
    with pytest.raises(EngineError, match="not on the grid"):
        RasterStack([demo_scene.image, shifted])
    empty = tmp_path / "empty.tif"
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.zeros_like(data))
    with RasterStack([empty]) as stack, pytest.raises(EngineError, match="no valid pixels"):
        stack.check_has_data()


def test_vector_and_raster_labels_give_the_same_mask(demo_scene):
    with rasterio.open(demo_scene.image) as src:
        grid = Grid.of(src)
    from_raster = load_labels(demo_scene.labels, grid)
    from_vector = load_labels(demo_scene.polygons, grid, field="class_id")
    assert from_raster.labelled > 0
    assert np.array_equal(from_raster.index, from_vector.index)
    assert [c["value"] for c in from_raster.classes] == [c["value"] for c in from_vector.classes] == [1, 2, 3, 4]
    assert [c["name"] for c in from_raster.classes] == ["water", "vegetation", "built-up", "bare soil"]
    by_name = load_labels(demo_scene.polygons, grid, field="class_name", classes=from_raster.classes)
    assert np.array_equal(by_name.index, from_raster.index)


def test_labels_in_another_crs_are_reprojected(demo_scene, tmp_path):
    with rasterio.open(demo_scene.image) as src:
        grid = Grid.of(src)
    reference = load_labels(demo_scene.labels, grid).index
    # polygons in WGS 84
    wgs = tmp_path / "labels_wgs84.gpkg"
    with fiona.open(demo_scene.polygons) as src:
        schema, crs = src.schema, src.crs
        with fiona.open(wgs, "w", driver="GPKG", schema=schema, crs="EPSG:4326") as dst:
            for feat in src:
                dst.write({"geometry": transform_geom(crs, "EPSG:4326", feat.geometry),
                           "properties": dict(feat.properties)})
    vec = load_labels(wgs, grid, field="class_id").index
    assert (vec == reference).mean() > 0.98
    # a class raster on a WGS 84 grid
    with rasterio.open(demo_scene.labels) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        out = np.zeros((height, width), np.uint8)
        reproject(rasterio.band(src, 1), out, dst_transform=transform, dst_crs="EPSG:4326",
                  resampling=Resampling.nearest)
        profile = {**src.profile, "crs": "EPSG:4326", "transform": transform, "width": width, "height": height}
    warped = tmp_path / "labels_wgs84.tif"
    with rasterio.open(warped, "w", **profile) as dst:
        dst.write(out, 1)
    ras = load_labels(warped, grid).index
    assert (ras == reference).mean() > 0.95


def test_labels_outside_the_image_are_refused(demo_scene, tmp_path):
    with rasterio.open(demo_scene.labels) as src:
        profile, data = src.profile, src.read()
        grid = Grid.of(src)
    far = tmp_path / "far.tif"
    with rasterio.open(far, "w", **{**profile, "transform": profile["transform"] @ rasterio.Affine.translation(5000, 0)}) as dst:
        dst.write(data)
    with pytest.raises(EngineError, match="do not overlap"):
        load_labels(far, grid)
    with pytest.raises(EngineError, match="field 'nope' not found"):
        load_labels(demo_scene.polygons, grid, field="nope")


def test_band_statistics_use_only_selected_valid_pixels(demo_scene):
    with RasterStack([demo_scene.image]) as stack:
        data, valid = stack.read(Window(0, 0, stack.grid.width, stack.grid.height))
        sel = np.zeros(valid.shape, bool)
        sel[:100] = True
        mean, std = band_statistics(stack, sel)
    expected = data[:, sel & valid]
    assert np.allclose(mean, expected.mean(axis=1), rtol=1e-5)
    assert np.allclose(std, expected.std(axis=1), rtol=1e-4)
