"""Where to label next and what to label with: the Predict dialog lists the most uncertain areas
and steps the map through them; the Train dialog creates a labels layer to draw in."""
from __future__ import annotations

import json

import pytest
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsRenderContext,
    QgsSingleSymbolRenderer,
    QgsVectorLayer,
    QgsVectorLayerUtils,
    QgsWkbTypes,
)

from plugin_testdata import CLASSES, bar_text, model_folder, wait_for


@pytest.fixture
def project(qgis_new_project, data):
    layers = {"scene": QgsRasterLayer(str(data["scene"]), "scene"),
              "labels": QgsRasterLayer(str(data["labels"]), "labels")}
    assert all(layer.isValid() for layer in layers.values())
    qgis_new_project.addMapLayers(list(layers.values()))
    return layers


def near(a: QgsRectangle, b: QgsRectangle, tol=1e-6) -> bool:
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in
               ((a.xMinimum(), b.xMinimum()), (a.yMinimum(), b.yMinimum()),
                (a.xMaximum(), b.xMaximum()), (a.yMaximum(), b.yMaximum())))


def assert_shows(canvas, bbox: QgsRectangle) -> None:
    """The canvas is zoomed to ``bbox``: centred on it, showing all of it with a small margin."""
    extent = canvas.extent()
    assert extent.contains(bbox), (extent.toString(), bbox.toString())
    assert abs(extent.center().x() - bbox.center().x()) < 1e-6 * max(1, abs(bbox.center().x()))
    assert abs(extent.center().y() - bbox.center().y()) < 1e-6 * max(1, abs(bbox.center().y()))
    assert min(extent.width() / bbox.width(), extent.height() / bbox.height()) == pytest.approx(1.2, rel=1e-3)


def test_predict_dialog_lists_and_steps_through_the_uncertain_areas(qgis_iface, qgis_canvas, project, tmp_path,
                                                                    fake_python, monkeypatch):
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    d = PredictDialog(qgis_iface)
    d.raster.setLayer(project["scene"])
    d.model.setFilePath(str(model_folder(tmp_path)))
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    d.device.setCurrentIndex(d.device.findData("cpu"))
    assert d.areas_path.filePath().endswith("scene_uncertain_areas.gpkg")  # suggested beside the input
    assert not d.area_count.isEnabled() and "--uncertain-areas" not in d.command()
    # the areas come from the uncertainty: ticking them ticks it, unticking it unticks them
    d.want_areas.setChecked(True)
    assert d.want_uncertainty.isChecked() and d.area_count.isEnabled()
    d.want_uncertainty.setChecked(False)
    assert not d.want_areas.isChecked()
    d.want_areas.setChecked(True)
    d.uncertainty.setFilePath(str(tmp_path / "unc.tif"))
    areas_path = str(tmp_path / "areas.gpkg")
    d.areas_path.setFilePath(areas_path)
    d.area_count.setValue(3)
    assert d.validate() == []
    assert d.command()[-8:] == ["--uncertainty", str(tmp_path / "unc.tif"), "--uncertain-areas", areas_path,
                                "--area-count", "3", "--device", "cpu"]
    d.areas_path.setFilePath(str(tmp_path / "areas.shp"))
    assert any("GeoPackage" in p for p in d.validate())
    d.areas_path.setFilePath(areas_path)
    assert not d.area_steps.isVisibleTo(d)
    assert d.start() is not None
    wait_for(lambda: d.task is None, 60)
    assert d.progress.value() == 100, bar_text(d) + d.messages.text.toPlainText()
    areas = d.added_layers[-1]  # on top of the others
    assert [x.name() for x in d.added_layers] == ["unc", "pred", "areas"]
    assert QgsProject.instance().mapLayer(areas.id()) is areas
    # outlined squares (no fill over the uncertainty), labelled with their rank
    assert isinstance(areas.renderer(), QgsSingleSymbolRenderer)
    fill = areas.renderer().symbol().symbolLayer(0)
    assert fill.brushStyle() == 0 and fill.strokeWidth() > 0  # Qt.BrushStyle.NoBrush
    assert areas.labelsEnabled() and areas.labeling().settings().fieldName == "rank"
    reopened = QgsVectorLayer(areas_path, "again", "ogr")  # the style is the GeoPackage's default
    assert reopened.labelsEnabled() and reopened.labeling().settings().fieldName == "rank"
    features = sorted(areas.getFeatures(), key=lambda f: f["rank"])
    assert [f["rank"] for f in features] == [1, 2, 3]
    # stepping: Next goes to area 1 (the most uncertain), then 2; Previous back; it wraps around
    assert d.area_steps.isVisibleTo(d) and d.next_area.isEnabled()
    assert "3 uncertain areas" in d.area_label.text()
    canvas = qgis_iface.mapCanvas()
    assert canvas is qgis_canvas
    canvas.setDestinationCrs(areas.crs())
    d.next_area.click()
    assert_shows(canvas, features[0].geometry().boundingBox())
    assert d.area_label.text() == f"Area 1 of 3, uncertainty {features[0]['mean_uncertainty']:.0f} %"
    d.next_area.click()
    assert_shows(canvas, features[1].geometry().boundingBox())
    assert d.area_label.text().startswith("Area 2 of 3")
    d.previous_area.click()
    d.previous_area.click()
    assert_shows(canvas, features[2].geometry().boundingBox())
    assert d.area_label.text().startswith("Area 3 of 3")
    # a map in another CRS: the area is shown there
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    canvas.setDestinationCrs(wgs84)
    d.next_area.click()
    bbox = QgsCoordinateTransform(areas.crs(), wgs84, QgsProject.instance()).transformBoundingBox(
        features[0].geometry().boundingBox())
    assert_shows(canvas, bbox)
    assert d.area_label.text().startswith("Area 1 of 3")
    # a new run hides the last run's areas
    d.set_areas(None)
    assert not d.area_steps.isVisibleTo(d) and d.areas == []
    d.close()


def test_processing_predict_writes_and_styles_the_uncertain_areas(provider, data, tmp_path, fake_python,
                                                                  monkeypatch, qgis_new_project):
    from test_processing import run_and_load

    from qgis_plugin.core.commands import predict_args
    from qgis_plugin.processing.predict import PredictAlgorithm
    from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    model = model_folder(tmp_path)
    base = {"INPUT": str(data["scene"]), "MODEL": str(model / "card.json"), "BANDS": "1,2,3,4,5,6",
            "OUTPUT": str(tmp_path / "pred.tif")}
    alg = PredictAlgorithm()
    alg.initAlgorithm()
    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    assert "--uncertain-areas" not in predict_args(alg.config({**base, "AREA_COUNT": 4}, context, feedback))
    args = predict_args(alg.config({**base, "UNCERTAIN_AREAS": str(tmp_path / "a.gpkg"), "AREA_COUNT": 4},
                                   context, feedback))
    assert args[args.index("--uncertain-areas"):][:4] == ["--uncertain-areas", str(tmp_path / "a.gpkg"),
                                                          "--area-count", "4"]
    with pytest.raises(QgsProcessingException, match="GeoPackage"):
        alg.config({**base, "UNCERTAIN_AREAS": str(tmp_path / "a.shp")}, context, feedback)
    areas = str(tmp_path / "areas.gpkg")
    result, layers = run_and_load({**base, "UNCERTAIN_AREAS": areas}, loaded=("UNCERTAIN_AREAS",))
    assert result["UNCERTAIN_AREAS"] == areas and result["UNCERTAINTY"] is None
    layer = layers[areas]
    assert layer.featureCount() == 10 and layer.labelsEnabled()
    assert isinstance(layer.renderer(), QgsSingleSymbolRenderer)


@pytest.fixture
def train_dialog(qgis_iface, project, provider):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    dialog = TrainDialog(qgis_iface)
    yield dialog
    dialog.close()
    dialog.deleteLater()


def categories(layer):
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class"
    # (a style read back from the file holds the values as text: QGIS matches them all the same)
    return [(int(c.value()), c.label(), c.symbol().color().name()) for c in renderer.categories()]


def test_new_labels_layer_from_the_train_dialog(train_dialog, project, tmp_path):
    d = train_dialog
    d.set_checked_rasters([project["scene"]])
    d.labels.setLayer(project["labels"])  # its classes fill the table: the new layer gets them
    assert [c["name"] for c in d.classes] == [c["name"] for c in CLASSES]
    layer = d.new_labels_layer(str(tmp_path / "new_labels"))  # .gpkg added
    path = str(tmp_path / "new_labels.gpkg")
    assert layer is not None and layer.source().split("|")[0] == path
    assert QgsProject.instance().mapLayer(layer.id()) is layer
    # chosen as the labels, with its class field, and open for drawing
    assert d.labels.currentLayer() is layer and d.label_field.currentField() == "class"
    assert layer.isEditable()
    assert [(c["value"], c["name"], c["colour"]) for c in d.classes] == \
        [(c["value"], c["name"], c["colour"]) for c in CLASSES]
    # the file: polygons with class and name, in the raster's CRS, categorised by class (stored)
    reopened = QgsVectorLayer(path, "again", "ogr")
    assert reopened.isValid() and reopened.geometryType() == QgsWkbTypes.GeometryType.PolygonGeometry
    assert reopened.crs() == project["scene"].crs()
    fields = reopened.fields()
    assert fields.field("class").typeName() == "Integer" and fields.field("name").typeName() == "String"
    assert categories(reopened) == [(c["value"], c["name"], c["colour"]) for c in CLASSES]
    assert reopened.editorWidgetSetup(fields.indexOf("class")).type() == "ValueMap"
    # a feature drawn gets the first class and its name; it is saved
    feature = QgsVectorLayerUtils.createFeature(
        layer, QgsGeometry.fromWkt("POLYGON((500300 3999700, 500900 3999700, 500900 3999100, "
                                   "500300 3999100, 500300 3999700))"), {}, layer.createExpressionContext())
    assert feature["class"] == 1 and feature["name"] == "water"
    assert layer.addFeature(feature) and layer.commitChanges()
    again = QgsVectorLayer(path, "again", "ogr")
    assert again.featureCount() == 1
    renderer, context = again.renderer().clone(), QgsRenderContext()
    renderer.startRender(context, again.fields())
    assert renderer.symbolForFeature(next(again.getFeatures()), context).color().name() == CLASSES[0]["colour"]
    renderer.stopRender(context)
    # training reads the file itself, by its class field
    d.out.setFilePath(str(tmp_path / "model"))
    assert d.validate() == []
    args = d.command()
    assert args[args.index("--labels") + 1] == path and args[args.index("--label-field") + 1] == "class"
    assert [c["value"] for c in json.loads(args[args.index("--classes") + 1])] == [1, 2, 3, 4]
    # a file open in the project is not overwritten
    assert d.new_labels_layer(path) is None and "open in the project" in bar_text(d)


def test_new_labels_layer_without_classes_or_rasters(train_dialog, tmp_path):
    d = train_dialog
    d.set_checked_rasters([])
    d.labels.setLayer(None)
    assert d.classes == []
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    layer = d.new_labels_layer(str(tmp_path / "start.gpkg"))
    assert layer is not None and layer.crs().authid() == "EPSG:3857"  # the project's CRS
    cats = categories(QgsVectorLayer(str(tmp_path / "start.gpkg"), "again", "ogr"))
    assert [(value, label) for value, label, _ in cats] == [(1, "class 1"), (2, "class 2")]
    assert cats[0][2] != cats[1][2]  # two distinct colours
    assert d.labels.currentLayer() is layer and layer.isEditable()
    layer.rollBack()
