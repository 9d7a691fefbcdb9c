"""``embed``: patch features (or their PCA) on the input grid coarsened by the patch size."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from engine.protocol import EngineError, Reporter
from tests.conftest import TINY, run_engine

PATCH = 16


@pytest.fixture(scope="module")
def lora_model(small_scene, tmp_path_factory):
    """A tiny model with LoRA adapters and 64 px chips (4 patches: tiles overlap by one patch)."""
    out = tmp_path_factory.mktemp("embed_model") / "model"
    run_engine("train", "--image", small_scene.image, "--labels", small_scene.labels, *TINY,
               "--chip-size", "64", "--tuning", "lora", "--val-fraction", "0", "--out", out)
    return out


@pytest.fixture(scope="module")
def odd_raster(tmp_path_factory):
    """100 x 70 px (not multiples of the patch), 6 named bands, nodata 0 over the top-left
    32 x 32 px (2 x 2 patches) and in one pixel of the patch next to it."""
    path = tmp_path_factory.mktemp("odd") / "odd.tif"
    rng = np.random.default_rng(3)
    data = (rng.normal(1500, 400, (6, 70, 100)) + np.linspace(0, 2000, 100)).clip(1, 10000).astype("uint16")
    data[:, :32, :32] = 0
    data[:, 0, 40] = 0
    transform = Affine(10.0, 0, 300000.0, 0, -10.0, 5000000.0)
    with rasterio.open(path, "w", driver="GTiff", width=100, height=70, count=6, dtype="uint16", nodata=0,
                       crs="EPSG:32632", transform=transform) as dst:
        dst.write(data)
        dst.descriptions = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
    return path


def check_grid(out, image) -> rasterio.DatasetReader:
    """The output's grid is the image's coarsened by the patch size; returns the open output."""
    with rasterio.open(image) as src:
        dst = rasterio.open(out)
        assert (dst.width, dst.height) == (math.ceil(src.width / PATCH), math.ceil(src.height / PATCH))
        assert dst.transform.almost_equals(src.transform @ Affine.scale(PATCH))
        assert dst.crs == src.crs
        assert dst.dtypes[0] == "float32" and dst.nodata == -9999
        return dst


def assert_ordered_by_variance(data: np.ndarray, nodata: float = -9999) -> None:
    valid = (data != nodata).all(axis=0)
    variance = data[:, valid].var(axis=1)
    assert np.all(np.diff(variance) <= 1e-4 * variance[0]), variance
    assert variance[0] > 0


def test_model_folder_pca_on_the_coarsened_grid(lora_model, small_scene, tmp_path):
    out = tmp_path / "emb.tif"
    done = run_engine("embed", "--model", lora_model, "--image", small_scene.image, "--out", out)
    with check_grid(out, small_scene.image) as dst:
        assert dst.count == 8 and dst.descriptions == tuple(f"PC {i}" for i in range(1, 9))
        data = dst.read()
        tags = json.loads(dst.tags()["GEOPEFT_EMBEDDING"])
    assert tags["patch_size"] == PATCH and tags["chip_size"] == 64 and tags["components"] == 8
    assert_ordered_by_variance(data)
    artifact = next(e for e in done["_events"] if e["event"] == "artifact")
    assert artifact["kind"] == "embedding" and artifact["path"] == str(out) and artifact["bands"] == 8
    variance = artifact["explained_variance"]
    assert variance == sorted(variance, reverse=True)
    assert any(e["event"] == "progress" and e["stage"] == "embed" for e in done["_events"])
    # every patch of this (all-valid) scene comes from the sample: the PCA is of exactly these
    # vectors, so the bands are centred and their variances those the PCA reports
    assert np.allclose(data.reshape(8, -1).mean(axis=1), 0, atol=1e-3 * math.sqrt(variance[0]))
    assert np.allclose(data.reshape(8, -1).var(axis=1, ddof=1), variance, rtol=1e-3)


def test_model_features_equal_the_encoders_forward_on_a_chip(lora_model, small_scene, tmp_path):
    """Interior patches of a tile are the tuned encoder's own last-layer tokens for that chip
    (computed here with the adapters unmerged: merging must not change them)."""
    import torch

    from engine.card import read_card
    from engine.data.chips import normalise
    from engine.data.rasters import RasterStack
    from engine.inference.embed import embed
    from engine.inference.runners import load_trained_model

    out = tmp_path / "features.tif"
    summary = embed(lora_model, [small_scene.image], out, components=0, device="cpu")
    assert summary["bands"] == 192 and summary["components"] is None
    card, folder = read_card(lora_model)
    model = load_trained_model(card, folder, Reporter("quiet")).eval()
    inp = card["input"]
    # 64 px tiles = 4 patches, one dropped on each side: the tile at pixel (16, 16) gives
    # output patches 2-3 (rows and columns)
    with RasterStack([small_scene.image], inp["bands"]) as stack:
        data, valid = stack.read(Window(16, 16, 64, 64))
    x = normalise(data, valid, inp["mean"], inp["std"])
    with torch.no_grad():
        direct = model.encoder(torch.from_numpy(x[None]))[-1][0, :, 1:3, 1:3].numpy()
    with rasterio.open(out) as dst:
        assert dst.count == 192 and dst.descriptions[:2] == ("feature 1", "feature 2")
        written = dst.read(window=Window(2, 2, 2, 2))
    assert np.abs(direct).max() > 0.1
    np.testing.assert_allclose(written, direct, atol=2e-3, rtol=1e-3)


def test_backbone_without_weights_grid_nodata_and_pca(odd_raster, tmp_path):
    out = tmp_path / "odd.tif"
    done = run_engine("embed", "--backbone", "prithvi_eo_v2_tiny", "--weights", "none", "--chip-size", "64",
                      "--components", "4", "--image", odd_raster, "--out", out)
    assert done["bands"] == 4 and (done["width"], done["height"]) == (7, 5)
    assert any("RANDOM" in e.get("message", "") for e in done["_events"] if e["event"] == "warning")
    with check_grid(out, odd_raster) as dst:
        assert dst.count == 4 and dst.descriptions == ("PC 1", "PC 2", "PC 3", "PC 4")
        data = dst.read()
    nodata = data == -9999
    assert nodata[:, :2, :2].all()  # the patches whose pixels are all nodata
    assert nodata.all(axis=0).sum() == 4 and not nodata[:, 0, 2].any()  # one nodata pixel is not enough
    assert (nodata.all(axis=0) == nodata.any(axis=0)).all()  # a patch is nodata in every band or none
    assert_ordered_by_variance(data)


def test_backbone_all_features_repeat_with_random_weights(odd_raster, tmp_path):
    from engine.inference.embed import embed

    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    for out in (a, b):
        summary = embed("prithvi_eo_v2_tiny", [odd_raster], out, components=0, weights="none", chip_size=64,
                        device="cpu")
    assert summary["bands"] == 192 and summary["backbone"] == "prithvi_eo_v2_tiny"
    with rasterio.open(a) as da, rasterio.open(b) as db:
        assert da.count == 192 and da.descriptions[-1] == "feature 192"
        np.testing.assert_array_equal(da.read(), db.read())  # seeded random weights: the same features


class CancelOnFirstBatch(Reporter):
    def __init__(self):
        super().__init__("quiet")
        self.stages = []

    def progress(self, stage, step, total, message="", **extra):
        self.stages.append(stage)
        if stage == "embed" and step > 0:
            self.cancel()


@pytest.mark.parametrize("components", [0, 4])  # cancelled while writing / while sampling for the PCA
def test_cancel_leaves_nothing(odd_raster, tmp_path, components):
    from engine.inference.embed import embed

    reporter = CancelOnFirstBatch()
    out = tmp_path / "cancelled.tif"
    summary = embed("prithvi_eo_v2_tiny", [odd_raster], out, components=components, weights="none", chip_size=32,
                    batch_size=1, device="cpu", reporter=reporter)
    assert summary == {"out": None, "cancelled": True}
    assert "embed" in reporter.stages
    assert list(tmp_path.iterdir()) == []  # neither the output nor a partial file


def test_refusals(lora_model, odd_raster, tmp_path):
    from engine.inference.embed import embed

    with pytest.raises(EngineError, match="more than the 192 features"):
        embed("prithvi_eo_v2_tiny", [odd_raster], tmp_path / "x.tif", components=500, weights="none",
              chip_size=32, device="cpu")
    with pytest.raises(EngineError, match="go with --backbone"):
        embed(lora_model, [odd_raster], tmp_path / "x.tif", weights="none")
    with pytest.raises(EngineError, match="not an ONNX file"):
        embed(tmp_path / "model.onnx", [odd_raster], tmp_path / "x.tif")
    with pytest.raises(EngineError, match="input image"):
        embed("prithvi_eo_v2_tiny", [odd_raster], odd_raster, weights="none")
    assert not (tmp_path / "x.tif").exists()


def test_rows_of_tiles_without_data_are_nodata(tmp_path):
    """Bands of nodata rows between and after valid ones (whole rows of tiles never run)."""
    from engine.inference.embed import embed

    image = tmp_path / "bands.tif"
    data = np.random.default_rng(0).integers(100, 3000, (6, 160, 64)).astype("uint16")
    data[:, 32:96] = 0
    data[:, 128:] = 0
    with rasterio.open(image, "w", driver="GTiff", width=64, height=160, count=6, dtype="uint16", nodata=0,
                       crs="EPSG:32632", transform=Affine(10.0, 0, 0, 0, -10.0, 0)) as dst:
        dst.write(data)
    out = tmp_path / "e.tif"
    embed("prithvi_eo_v2_tiny", [image], out, components=0, weights="none", chip_size=32, device="cpu")
    with rasterio.open(out) as dst:
        assert (dst.width, dst.height, dst.count) == (4, 10, 192)
        valid = (dst.read() != -9999).all(axis=0)
    assert valid.all(axis=1).tolist() == [True] * 2 + [False] * 4 + [True] * 2 + [False] * 2
    assert valid.any(axis=1).tolist() == valid.all(axis=1).tolist()


def test_cli_guards_the_output_and_refuses_mixed_sources(lora_model, odd_raster, tmp_path):
    from engine.cli import build_parser
    from engine.reliability import output_paths

    args = build_parser().parse_args(["embed", "--backbone", "prithvi_eo_v2_tiny", "--image", "a.tif",
                                      "--out", str(tmp_path / "e.tif")])
    assert output_paths(args) == [("--out", tmp_path / "e.tif")]
    with pytest.raises(SystemExit):  # --model and --backbone: one or the other
        build_parser().parse_args(["embed", "--model", "m", "--backbone", "b", "--image", "a", "--out", "o"])
    done = run_engine("embed", "--model", lora_model, "--weights", "none", "--image", odd_raster,
                      "--out", tmp_path / "x.tif", expect_ok=False)
    assert done["_rc"] == 2 and "go with --backbone" in done["_stderr"]
    assert not (tmp_path / "x.tif").exists()
