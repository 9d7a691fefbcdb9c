"""Where predict predicts (issue 10, masks and areas of interest), in a real QGIS: Processing's
EXTENT / AOI / MASK and the Predict dialog's Area become the engine's --aoi / --mask, polygons go
through a temporary GeoPackage written off the UI thread and deleted afterwards."""
from __future__ import annotations

import json
import os
import re

import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsReferencedRectangle,
    QgsVectorLayer,
)

from plugin_testdata import CLASSES, model_folder, needs_engine, wait_for

# the test scene: EPSG:32633, 128 x 128 pixels of 30 m from (500000, 4000000)
LEFT_HALF = (500000.0, 3996160.0, 501920.0, 4000000.0)  # columns 0-63
TEMP_AOI = re.compile(r".*[/\\]geopeft-aoi-[^/\\]+[/\\]aoi\.gpkg$")
UTM33 = QgsCoordinateReferenceSystem("EPSG:32633")
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")


def base_params(data, model, tmp_path) -> dict:
    return {"INPUT": str(data["scene"]), "MODEL": str(model), "BANDS": "1,2,3,4,5,6",
            "OUTPUT": str(tmp_path / "pred.tif")}


def base_args(data, model, tmp_path) -> list[str]:
    return ["predict", "--model", str(model), "--image", str(data["scene"]),
            "--bands", "1,2,3,4,5,6", "--out", str(tmp_path / "pred.tif")]


def to_wgs84(box) -> QgsRectangle:
    transform = QgsCoordinateTransform(UTM33, WGS84, QgsProject.instance())
    return transform.transformBoundingBox(QgsRectangle(*box))


@pytest.fixture
def alg(provider):
    from qgis_plugin.processing.predict import PredictAlgorithm
    algorithm = PredictAlgorithm()
    algorithm.initAlgorithm()
    return algorithm


def args_of(alg, params) -> list[str]:
    from qgis_plugin.core.commands import predict_args
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return predict_args(alg.config(params, context, QgsProcessingFeedback()))


@pytest.fixture
def polygons(qgis_new_project, data) -> QgsVectorLayer:
    layer = QgsVectorLayer(str(data["labels_gpkg"]), "label polygons", "ogr")
    assert layer.isValid() and layer.featureCount() > 5
    qgis_new_project.addMapLayer(layer)
    return layer


def recorded(folder) -> tuple[list[str], QgsVectorLayer | None]:
    """The argv the (fake) engine got, without the client's protocol flags (--events jsonl,
    --cancel-on-stdin), and its copy of the --aoi GeoPackage."""
    argv = json.loads((folder / "argv.json").read_text())
    assert argv[1:3] == ["--events", "jsonl"]
    argv = [a for a in argv[:1] + argv[3:] if a != "--cancel-on-stdin"]
    copy = folder / "aoi.gpkg"
    return argv, QgsVectorLayer(str(copy), "aoi copy", "ogr") if copy.exists() else None


def shapes(features) -> list[tuple]:
    """Comparable shapes: (area, bounding box) rounded, sorted."""
    out = []
    for f in features:
        g = f.geometry()
        b = g.boundingBox()
        out.append((round(g.area(), 3), round(b.xMinimum(), 3), round(b.yMinimum(), 3),
                    round(b.xMaximum(), 3), round(b.yMaximum(), 3)))
    return sorted(out)


# -- the command line ----------------------------------------------------------------------------
def test_predict_args_and_validation_of_aoi_and_mask(data, tmp_path):
    from qgis_plugin.core.commands import PredictConfig, aoi_box, predict_args, validate_predict
    model = model_folder(tmp_path)
    out = str(tmp_path / "pred.tif")

    def config(**kw) -> PredictConfig:
        return PredictConfig(model=str(model), images=[str(data["scene"])], out=out, **kw)

    assert aoi_box(500000.0, 3996160, 501920.5, 4e6) == "500000,3996160,501920.5,4000000"
    assert aoi_box(12.1, 45.2, 12.3, 45.4, "EPSG:4326") == "12.1,45.2,12.3,45.4@EPSG:4326"
    gpkg = str(data["labels_gpkg"])
    assert predict_args(config(aoi=gpkg, aoi_layer="labels", mask=str(data["labels"]))) == [
        "predict", "--model", str(model), "--image", str(data["scene"]), "--out", out,
        "--aoi", gpkg, "--aoi-layer", "labels", "--mask", str(data["labels"]), "--device", "auto"]
    assert validate_predict(config(aoi=gpkg, aoi_layer="labels", mask=str(data["labels"]))) == []
    assert validate_predict(config(aoi="1,2,3,4@EPSG:4326")) == []

    def problems(**kw) -> str:
        return " ".join(validate_predict(config(**kw)))

    assert "empty" in problems(aoi="3,2,1,4")
    assert "names no CRS" in problems(aoi="1,2,3,4@")
    assert "not with a box" in problems(aoi="1,2,3,4", aoi_layer="labels")
    assert "needs an area of interest" in problems(aoi_layer="labels")
    assert "Area of interest not found" in problems(aoi=str(tmp_path / "nowhere.gpkg"))
    assert "GeoTIFF" in problems(mask=gpkg)
    assert "Mask raster not found" in problems(mask=str(tmp_path / "nowhere.tif"))
    assert "mask cannot also be an output" in problems(mask=str(data["labels"]),
                                                       probabilities=str(data["labels"]))


# -- Processing -------------------------------------------------------------------------------
def test_processing_area_parameters_are_visible_and_explained(alg):
    from qgis.core import QgsProcessingParameterDefinition
    for name in ("EXTENT", "AOI", "MASK"):
        param = alg.parameterDefinition(name)
        assert param is not None and param.flags() & QgsProcessingParameterDefinition.FlagOptional
        assert not param.flags() & QgsProcessingParameterDefinition.FlagAdvanced, name
    assert alg.parameterDefinition("EXTENT").description() == "Predict only inside this extent"
    assert alg.parameterDefinition("AOI").description() == "Predict only inside these polygons"
    assert alg.parameterDefinition("MASK").description() == \
        "Predict only where this raster is non-zero (same grid as the input)"
    text = alg.shortHelpString()
    assert "Predict only inside this extent" in text and "not both" in text and "non-zero" in text


def test_processing_extent_becomes_an_aoi_box_with_its_epsg_code(alg, data, tmp_path):
    model = model_folder(tmp_path)
    base, args = base_params(data, model, tmp_path), base_args(data, model, tmp_path)
    assert "--aoi" not in args_of(alg, base) and "--mask" not in args_of(alg, base)
    # QGIS writes extents xmin,xmax,ymin,ymax [CRS]; the engine takes minx,miny,maxx,maxy@CRS
    assert args_of(alg, {**base, "EXTENT": "12.1,12.3,45.2,45.4 [EPSG:4326]"}) == \
        args + ["--aoi", "12.1,45.2,12.3,45.4@EPSG:4326", "--device", "auto"]
    assert args_of(alg, {**base, "EXTENT": "500000,501920,3996160,4000000 [EPSG:32633]"}) == \
        args + ["--aoi", "500000,3996160,501920,4000000@EPSG:32633", "--device", "auto"]
    # a box starting with a minus sign is glued to its flag (argparse would take it for one)
    assert args_of(alg, {**base, "EXTENT": "-10.5,-10.25,45.2,45.4 [EPSG:4326]"}) == \
        args + ["--aoi=-10.5,45.2,-10.25,45.4@EPSG:4326", "--device", "auto"]
    # a referenced rectangle (e.g. from the canvas) keeps its CRS
    wgs84 = to_wgs84(LEFT_HALF)
    aoi = args_of(alg, {**base, "EXTENT": QgsReferencedRectangle(wgs84, WGS84)})
    assert aoi[aoi.index("--aoi") + 1] == (f"{wgs84.xMinimum()!r},{wgs84.yMinimum()!r},"
                                           f"{wgs84.xMaximum()!r},{wgs84.yMaximum()!r}@EPSG:4326")


def test_processing_extent_in_a_crs_without_epsg_code_is_reprojected_to_the_raster(alg, data, tmp_path):
    # UTM 33 with a false easting of 600 km: no EPSG code; x 600000 here is 500000 in EPSG:32633
    custom = QgsCoordinateReferenceSystem.fromProj(
        "+proj=tmerc +lat_0=0 +lon_0=15 +k=0.9996 +x_0=600000 +y_0=0 +datum=WGS84 +units=m +no_defs")
    assert custom.isValid() and not custom.authid().upper().startswith("EPSG:")
    model = model_folder(tmp_path)
    rect = QgsRectangle(600000, 3996160, 601920, 4000000)
    args = args_of(alg, {**base_params(data, model, tmp_path),
                         "EXTENT": QgsReferencedRectangle(rect, custom)})
    aoi = args[args.index("--aoi") + 1]
    assert "@" not in aoi
    assert [float(v) for v in aoi.split(",")] == pytest.approx(list(LEFT_HALF), abs=1e-3)
    assert args[-2:] == ["--device", "auto"]


def test_processing_mask_is_passed_through_and_checked_against_the_grid(
        alg, provider, data, tmp_path, fake_python, monkeypatch):
    from qgis import processing
    model = model_folder(tmp_path)
    base, args = base_params(data, model, tmp_path), base_args(data, model, tmp_path)
    assert args_of(alg, {**base, "MASK": str(data["labels"])}) == \
        args + ["--mask", str(data["labels"]), "--device", "auto"]
    # with an extent: both, the engine predicts where both say so
    assert args_of(alg, {**base, "MASK": str(data["labels"]),
                         "EXTENT": "500000,501920,3996160,4000000 [EPSG:32633]"}) == \
        args + ["--aoi", "500000,3996160,501920,4000000@EPSG:32633", "--mask", str(data["labels"]),
                "--device", "auto"]
    # the engine gets it (fake engine: records its argv)
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(tmp_path / "rec"))
    processing.run("geopeft:predict", {**base, "MASK": str(data["labels"])})
    argv, _ = recorded(tmp_path / "rec")
    assert argv[argv.index("--mask") + 1] == str(data["labels"])
    assert (tmp_path / "rec" / "mask.tif").is_file()
    # another grid: refused before the engine runs, naming the mask
    (tmp_path / "rec" / "argv.json").unlink()
    with pytest.raises(QgsProcessingException, match=r"\(mask\) is not on the same grid"):
        processing.run("geopeft:predict", {**base, "MASK": str(data["other_grid"]),
                                           "OUTPUT": str(tmp_path / "pred2.tif")})
    assert not (tmp_path / "rec" / "argv.json").exists()


def test_processing_refuses_an_extent_and_polygons_together(alg, polygons, data, tmp_path):
    params = {**base_params(data, model_folder(tmp_path), tmp_path),
              "EXTENT": "500000,501920,3996160,4000000 [EPSG:32633]", "AOI": polygons.id()}
    with pytest.raises(QgsProcessingException, match="not both"):
        args_of(alg, params)


def test_processing_polygons_selected_only_go_to_a_temporary_geopackage(
        provider, polygons, data, tmp_path, fake_python, monkeypatch):
    from qgis import processing
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    model = model_folder(tmp_path)
    ids = sorted(polygons.allFeatureIds())[:3]
    polygons.selectByIds(ids)
    expected = shapes(polygons.getFeatures(ids))
    for selected, rec in ((True, tmp_path / "selected"), (False, tmp_path / "all")):
        monkeypatch.setenv("FAKE_ENGINE_RECORD", str(rec))
        feedback = QgsProcessingFeedback()
        processing.run("geopeft:predict", {
            **base_params(data, model, tmp_path),
            "AOI": QgsProcessingFeatureSourceDefinition(polygons.id(), selectedFeaturesOnly=selected)},
            feedback=feedback)
        argv, copy = recorded(rec)
        aoi = argv[argv.index("--aoi") + 1]
        assert TEMP_AOI.match(aoi), aoi
        assert argv == base_args(data, model, tmp_path) + ["--aoi", aoi, "--device", "auto"]
        assert "-m engine predict" in feedback.textLog() and aoi in feedback.textLog()
        assert not os.path.exists(os.path.dirname(aoi))  # deleted after the run
        assert copy.isValid() and copy.crs().authid() == "EPSG:32633"
        if selected:
            assert copy.featureCount() == 3 and shapes(copy.getFeatures()) == expected
        else:
            assert copy.featureCount() == polygons.featureCount()
            assert shapes(copy.getFeatures()) == shapes(polygons.getFeatures())


def test_processing_polygons_in_another_crs_keep_it_and_empty_ones_are_refused(
        provider, qgis_new_project, data, tmp_path, fake_python, monkeypatch):
    from qgis import processing
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(tmp_path / "rec"))
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "drawn", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(to_wgs84(LEFT_HALF)))
    assert layer.dataProvider().addFeatures([feature])[0]
    qgis_new_project.addMapLayer(layer)
    params = {**base_params(data, model_folder(tmp_path), tmp_path), "AOI": layer.id()}
    processing.run("geopeft:predict", params)
    argv, copy = recorded(tmp_path / "rec")
    assert TEMP_AOI.match(argv[argv.index("--aoi") + 1])
    assert copy.crs().authid() == "EPSG:4326" and copy.featureCount() == 1  # the engine reprojects
    del copy  # else the refused run below keeps this OGR layer alive past QGIS's exit: a crash at shutdown
    empty = QgsVectorLayer("Polygon?crs=EPSG:4326", "empty", "memory")
    qgis_new_project.addMapLayer(empty)
    with pytest.raises(QgsProcessingException, match="no polygons"):
        processing.run("geopeft:predict", {**params, "AOI": empty.id()})


@needs_engine
def test_processing_extent_in_wgs84_with_the_real_engine_leaves_nodata_outside(
        trained_model, data, tmp_path):
    """The left half of the scene, as a box in EPSG:4326: the real engine predicts there and
    writes nodata elsewhere, on the full input grid."""
    import numpy as np
    from osgeo import gdal
    from qgis import processing
    box = to_wgs84(LEFT_HALF)
    extent = f"{box.xMinimum()!r},{box.xMaximum()!r},{box.yMinimum()!r},{box.yMaximum()!r} [EPSG:4326]"
    feedback = QgsProcessingFeedback()
    result = processing.run("geopeft:predict", {
        "INPUT": str(data["scene"]), "MODEL": str(trained_model / "card.json"), "DEVICE": 1,
        "EXTENT": extent, "OUTPUT": str(tmp_path / "pred.tif")}, feedback=feedback)
    assert "@EPSG:4326" in feedback.textLog()
    ds = gdal.Open(result["OUTPUT"])
    assert (ds.RasterXSize, ds.RasterYSize) == (128, 128)
    band = ds.GetRasterBand(1)
    nodata, classes = band.GetNoDataValue(), band.ReadAsArray()
    assert nodata is not None
    # the box reprojected back is a little larger than the half (bounding box of a curved shape)
    assert (classes[:, :60] != nodata).all()
    assert (classes[:, 68:] == nodata).all()
    assert set(np.unique(classes[:, :60])) <= {c["value"] for c in CLASSES}


# -- the Predict dialog -------------------------------------------------------------------------
@pytest.fixture
def dialog(qgis_iface, qgis_new_project, data, polygons, tmp_path):
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    layers = {name: QgsRasterLayer(str(data[name]), name) for name in ("scene", "labels", "other_grid")}
    qgis_new_project.addMapLayers(list(layers.values()))
    d = PredictDialog(qgis_iface)
    d.raster.setLayer(layers["scene"])
    d.model.setFilePath(str(model_folder(tmp_path)))
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    d.layers = layers
    yield d
    if d.task is not None:
        d.task.cancel()
        wait_for(lambda: d.task is None)
    d.close()


def choose_area(d, key: str) -> None:
    d.area.setCurrentIndex(d.area.findData(key))


def test_dialog_area_whole_raster_canvas_and_mask(dialog, qgis_iface, data, tmp_path):
    d = dialog
    args = base_args(data, d.model.filePath(), tmp_path)
    assert [d.area.itemData(i) for i in range(d.area.count())] == ["all", "canvas", "polygons", "mask"]
    assert d.area.currentData() == "all"  # default: the whole raster
    assert d.validate() == [] and d.command() == args + ["--device", "auto"]
    assert d.area_polygons.isHidden() and d.mask_layer.isHidden()
    # the map view's extent, in the map's CRS, read when the command is built
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(WGS84)
    canvas.setExtent(to_wgs84(LEFT_HALF))
    choose_area(d, "canvas")
    assert not d.area_note.isHidden() and d.area_polygons.isHidden()
    view = canvas.extent()
    assert d.validate() == []
    assert d.command() == args + ["--aoi", f"{view.xMinimum()!r},{view.yMinimum()!r},"
                                           f"{view.xMaximum()!r},{view.yMaximum()!r}@EPSG:4326",
                                  "--device", "auto"]
    canvas.setExtent(QgsRectangle(100, -40, 101, -39))  # far from the scene
    assert any("does not overlap 'scene'" in p for p in d.validate())
    # a mask raster of the project, on the scene's grid
    choose_area(d, "mask")
    assert not d.mask_layer.isHidden()
    d.mask_layer.setLayer(d.layers["labels"])
    assert d.validate() == []
    assert d.command() == args + ["--mask", str(data["labels"]), "--device", "auto"]
    d.mask_layer.setLayer(d.layers["other_grid"])
    assert any("(mask) is not on the same grid" in p for p in d.validate())


def test_dialog_area_selected_polygons_are_written_off_the_ui_thread(
        dialog, polygons, data, tmp_path, fake_python, monkeypatch):
    d = dialog
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(tmp_path / "rec"))
    choose_area(d, "polygons")
    assert not d.area_polygons.isHidden() and d.mask_layer.isHidden()
    d.aoi_layer.setLayer(polygons)
    d.aoi_selected.setChecked(True)
    polygons.removeSelection()
    assert any("No polygons of 'label polygons' are selected" in p for p in d.validate())
    assert d.start() is None
    ids = sorted(polygons.allFeatureIds())[-2:]
    polygons.selectByIds(ids)
    assert d.validate() == []
    task = d.start()
    assert task is not None
    wait_for(lambda: d.task is None)
    assert d.progress.value() == 100, d.messages.text.toPlainText()
    argv, copy = recorded(tmp_path / "rec")
    aoi = argv[argv.index("--aoi") + 1]
    assert TEMP_AOI.match(aoi), aoi
    assert argv == task.args == base_args(data, d.model.filePath(), tmp_path) + [
        "--aoi", aoi, "--device", "auto"]
    assert copy.featureCount() == 2 and shapes(copy.getFeatures()) == shapes(polygons.getFeatures(ids))
    assert not os.path.exists(os.path.dirname(aoi))  # deleted once the task ended
    # all polygons when the box is unticked
    d.aoi_selected.setChecked(False)
    assert d.start() is not None
    wait_for(lambda: d.task is None)
    argv, copy = recorded(tmp_path / "rec")
    assert copy.featureCount() == polygons.featureCount()
    assert not os.path.exists(os.path.dirname(argv[argv.index("--aoi") + 1]))


def test_dialog_polygons_that_cannot_be_written_fail_with_a_message_and_leave_nothing(
        dialog, qgis_new_project, tmp_path, fake_python, monkeypatch):
    d = dialog
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(tmp_path / "rec"))
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633", "no shapes", "memory")
    assert layer.dataProvider().addFeatures([QgsFeature()])[0]  # a feature without geometry
    qgis_new_project.addMapLayer(layer)
    choose_area(d, "polygons")
    d.aoi_layer.setLayer(layer)
    assert d.validate() == []
    task = d.start()
    wait_for(lambda: d.task is None)
    assert task.error is not None and "'no shapes' has no polygons" in task.error.message
    assert d.status.text() == "Prediction failed."
    assert not (tmp_path / "rec").exists()  # the engine never started
    aoi = task.args[task.args.index("--aoi") + 1]
    assert TEMP_AOI.match(aoi) and not os.path.exists(os.path.dirname(aoi))
