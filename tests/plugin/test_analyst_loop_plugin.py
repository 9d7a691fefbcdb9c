"""The analyst's loop in the Train dialog with the real engine (issue 8): the live chart gets the
epochs as they come, a preview layer of the map view appears and updates in place while QGIS keeps
running, and "Continue from this model" trains the next round from the model just written."""
from __future__ import annotations

import json
import time

import pytest
from qgis.core import QgsPalettedRasterRenderer, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QColor

from plugin_testdata import needs_engine, wait_for


@pytest.fixture
def dialog(qgis_iface, qgis_new_project, data):
    from qgis_plugin.dialogs.train_dialog import TrainDialog

    layers = [QgsRasterLayer(str(data["scene"]), "scene"), QgsRasterLayer(str(data["labels"]), "labels")]
    qgis_new_project.addMapLayers(layers)
    d = TrainDialog(qgis_iface)
    d.set_checked_rasters([layers[0]])
    d.labels.setLayer(layers[1])
    d.weights.setCurrentIndex(d.weights.findData("none"))
    d.chip_size.setValue(64)
    d.batch_size.setValue(4)
    yield d
    if d.task is not None:
        d.task.cancel()
        wait_for(lambda: d.task is None)
    d._drop_previews()
    d.close()
    d.deleteLater()


def test_chart_draws_the_metric_events(qgis_app):
    from qgis_plugin.dialogs.chart import TrainingChart, time_left

    chart = TrainingChart()
    chart.resize(400, 160)
    for epoch, (loss, miou) in enumerate([(1.2, 0.2), (0.8, 0.45), (0.5, 0.6)], start=1):
        assert chart.on_event({"event": "metric", "name": "train_loss", "value": loss, "stage": "train",
                               "epoch": epoch})
        assert chart.on_event({"event": "metric", "name": "val_miou", "value": miou, "stage": "validate",
                               "epoch": epoch})
    assert not chart.on_event({"event": "metric", "name": "miou", "value": 0.5, "stage": "evaluate"})
    assert chart.points["val_miou"] == {1: 0.2, 2: 0.45, 3: 0.6} and chart.epochs == 3
    image = chart.grab().toImage()
    green = QColor("#2ca02c").rgb()
    assert sum(image.pixel(x, y) == green for x in range(image.width()) for y in range(image.height())) > 20
    assert time_left({"fraction": 0.25, "elapsed_s": 60}) == "about 3 min left"
    assert time_left({"fraction": 0.0, "elapsed_s": 1}) is None


@needs_engine
def test_preview_layer_updates_in_place_and_the_next_round_continues(dialog, qgis_iface, tmp_path):
    d = dialog
    canvas = qgis_iface.mapCanvas()
    scene = QgsProject.instance().mapLayersByName("scene")[0]
    canvas.setDestinationCrs(scene.crs())
    e = scene.extent()
    view = QgsRectangle(e.xMinimum(), e.yMinimum(), e.xMinimum() + e.width() / 2, e.yMinimum() + e.height() / 2)
    canvas.setExtent(view)
    d.epochs.setValue(4)
    d.preview_every.setValue(1)
    d.out.setFilePath(str(tmp_path / "round1"))
    assert d.start() is not None

    # the UI thread keeps running: a 50 ms timer fires all through training
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start(50)
    sources = []

    def record() -> bool:
        layer = d.preview.layer
        if layer is not None and (not sources or sources[-1] != layer.source()):
            sources.append(layer.source())
        return d.task is None

    wait_for(record, timeout=600)
    timer.stop()
    assert "Model saved" in d.status.text(), d.status.text()
    # a preview per epoch, each shown (events that arrive together are shown one after the other)
    assert d.preview.updates == 4 and len(sources) >= 2, (d.preview.updates, sources)
    layer = d.preview.layer
    assert layer.isValid() and isinstance(layer.renderer(), QgsPalettedRasterRenderer)
    assert len(QgsProject.instance().mapLayersByName(layer.name())) == 1  # one layer, updated in place
    # a picture of the model: offered neither as an input raster nor as labels
    assert layer.id() not in [d.rasters.item(i).data(Qt.ItemDataRole.UserRole) for i in range(d.rasters.count())]
    assert layer in d.labels.exceptedLayerList()
    shown = canvas.extent().intersect(e)  # the map view (as the canvas fits it), within the raster
    assert shown.height() < e.height()
    assert layer.extent().width() == pytest.approx(shown.width(), abs=60)  # 30 m pixels
    assert layer.extent().height() == pytest.approx(shown.height(), abs=60)
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 10 and max(gaps) < 5.0, max(gaps)  # generous: a loaded CI machine
    # the chart got every epoch
    assert sorted(d.chart.points["val_miou"]) == [1, 2, 3, 4]
    assert sorted(d.chart.points["train_loss"]) == [1, 2, 3, 4]

    # next round: continue from the model just written, into a new folder
    assert d.continue_button.isVisibleTo(d)
    d.continue_button.click()
    assert d.init_from.filePath() == str(tmp_path / "round1")
    assert not d.backbone.isEnabled() and "Continues round1" in d.init_note.text()
    d.out.setFilePath(str(tmp_path / "round2"))
    d.preview_on.setChecked(False)  # no previews by epoch: only on the button
    d.epochs.setValue(10)
    argv = d.command()
    assert argv[argv.index("--init-from") + 1] == str(tmp_path / "round1") and "--backbone" not in argv
    assert d.start() is not None
    assert d.preview.layer is None  # the last round's preview went with it
    wait_for(lambda: d.task is None or d.status.text().startswith("Epoch 1"), timeout=300)
    d.preview_now.click()
    wait_for(lambda: d.task is None, timeout=300)
    assert d.preview.layer is not None and d.preview.updates == 1  # the one asked for
    card = json.loads((tmp_path / "round2" / "card.json").read_text())
    assert card["parent"]["path"] == str((tmp_path / "round1").resolve())
