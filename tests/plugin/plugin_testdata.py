"""Shared helpers of the plugin tests: seeded test rasters/polygons made with GDAL, the engine's
interpreter, and tiny training parameters."""
from __future__ import annotations

import time

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ENGINE_PYTHON = os.environ.get("GEOPEFT_ENGINE_PYTHON") or str(REPO / ".venv" / "bin" / "python")
SIZE = 128  # pixels: big enough for 64 px chips and a validation split, small for CPU training
CLASSES = [{"value": 1, "name": "water", "colour": "#1f78b4"},
           {"value": 2, "name": "forest", "colour": "#33a02c"},
           {"value": 3, "name": "urban", "colour": "#e31a1c"},
           {"value": 4, "name": "crop", "colour": "#ff7f00"}]
BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]


def engine_available() -> bool:
    """The engine CLI is runnable (the engine is being built alongside the plugin)."""
    if not Path(ENGINE_PYTHON).is_file() or not (REPO / "engine" / "cli.py").is_file():
        return False
    proc = subprocess.run([ENGINE_PYTHON, "-c", "import engine.cli"], capture_output=True,
                          cwd=REPO, timeout=120)
    return proc.returncode == 0


needs_engine = pytest.mark.skipif(not engine_available(),
                                  reason="engine CLI (engine/cli.py) not importable yet")


def class_map(size: int = SIZE):
    """Four blocky classes (seeded), so polygons and per-class metrics are meaningful."""
    import numpy as np
    rng = np.random.default_rng(0)
    block = 16
    coarse = rng.integers(1, 5, size=(size // block, size // block))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64)).astype("uint8")


def write_test_data(folder: Path, size: int = SIZE) -> dict[str, Path]:
    """scene.tif (6 named uint16 bands), scene_b.tif (2 bands, same grid), other_grid.tif,
    labels.tif (1..4, nodata 0, colour table + names), labels.gpkg (class_id, class_name)."""
    import numpy as np
    from osgeo import gdal, ogr, osr

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    classes = class_map(size)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    transform = (500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0)
    signature = np.array([[400, 600, 500, 300, 200, 100],   # water
                          [300, 700, 400, 3500, 1800, 900],  # forest
                          [1500, 1600, 1700, 2200, 2600, 2400],  # urban
                          [800, 1200, 900, 2800, 2300, 1500]], dtype="float32")  # crop

    def raster(path, data, dtype, descriptions=None, nodata=None, gt=transform):
        driver = gdal.GetDriverByName("GTiff")
        ds = driver.Create(str(path), size, size, data.shape[0], dtype)
        ds.SetGeoTransform(gt)
        ds.SetProjection(srs.ExportToWkt())
        for i in range(data.shape[0]):
            band = ds.GetRasterBand(i + 1)
            band.WriteArray(data[i])
            if descriptions:
                band.SetDescription(descriptions[i])
            if nodata is not None:
                band.SetNoDataValue(nodata)
        return ds

    scene = signature[classes - 1].transpose(2, 0, 1) + rng.normal(0, 150, (6, size, size))
    scene = np.clip(scene, 1, 10000).astype("uint16")
    paths = {"scene": folder / "scene.tif", "scene_b": folder / "scene_b.tif",
             "other_grid": folder / "other_grid.tif", "labels": folder / "labels.tif",
             "labels_gpkg": folder / "labels.gpkg"}
    raster(paths["scene"], scene, gdal.GDT_UInt16, BANDS).FlushCache()
    raster(paths["scene_b"], scene[:2], gdal.GDT_UInt16, ["EXTRA_1", "EXTRA_2"]).FlushCache()
    raster(paths["other_grid"], scene[:1], gdal.GDT_UInt16, ["BLUE"],
           gt=(600000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0)).FlushCache()
    ds = raster(paths["labels"], classes[None], gdal.GDT_Byte, nodata=0)
    table = gdal.ColorTable()
    names = [""] * 5
    for c in CLASSES:
        colour = tuple(int(c["colour"][i:i + 2], 16) for i in (1, 3, 5))
        table.SetColorEntry(c["value"], (*colour, 255))
        names[c["value"]] = c["name"]
    band = ds.GetRasterBand(1)
    band.SetRasterColorTable(table)
    band.SetCategoryNames(names)
    ds.FlushCache()
    ds = None
    # polygons from the class raster (GDAL polygonize), with a class_name field
    src = gdal.Open(str(paths["labels"]))
    driver = ogr.GetDriverByName("GPKG")
    vds = driver.CreateDataSource(str(paths["labels_gpkg"]))
    layer = vds.CreateLayer("labels", srs, ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("class_id", ogr.OFTInteger))
    layer.CreateField(ogr.FieldDefn("class_name", ogr.OFTString))
    band = src.GetRasterBand(1)
    gdal.Polygonize(band, band.GetMaskBand(), layer, 0)
    names_by_value = {c["value"]: c["name"] for c in CLASSES}
    layer.ResetReading()
    features = [f for f in layer]
    for feature in features:
        feature.SetField("class_name", names_by_value[feature.GetField("class_id")])
        layer.SetFeature(feature)
    vds = None
    src = None
    return paths


def tiny_train_parameters(data, out, **overrides) -> dict:
    params = {"INPUT": [str(data["scene"])], "LABELS": str(data["labels"]),
              "PRETRAINED": False, "CHIP_SIZE": 64, "EPOCHS": 1, "BATCH_SIZE": 4,
              "DEVICE": 1, "SEED": 0, "OUTPUT": str(out)}
    params.update(overrides)
    return params


def model_folder(tmp_path, classes=CLASSES) -> Path:
    """A model folder whose card names a backbone, tuning, classes and bands: what dialogs read
    (for the stand-in engine of fake_engine.py, which never loads it)."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps({
        "backbone": {"name": "prithvi_eo_v2_tiny"}, "tuning": {"method": "lora"},
        "classes": classes, "input": {"band_names": BANDS}}))
    return model


def wait_for(condition, timeout=120.0):
    """Spin the Qt event loop (tasks report back through queued signals) until condition()."""
    from qgis.PyQt.QtCore import QCoreApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        QCoreApplication.processEvents()
        time.sleep(0.02)


def bar_text(dialog) -> str:
    """The texts of a dialog's message bar."""
    return " ".join(item.text() for item in dialog.bar.items())
