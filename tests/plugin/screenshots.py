"""Render the plugin's dialogs offscreen into docs/*.png (``make screenshots``).

    QT_QPA_PLATFORM=offscreen .venv/bin/python tests/plugin/screenshots.py [--out docs]

The dialogs are filled from a small project: the Sen1Floods11 chip of tests/data (its labels'
-1 set as no-data in QGIS) and the generated test rasters. The Train dialog asks the engine for
the model's pretrained bands (``engine models``), and is shown mid-run by feeding it the engine
events a real run emits (no training is started), so the pictures are reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from plugin_testdata import REPO, write_test_data  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "docs"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsRasterRange, QgsVectorLayer
    from qgis.PyQt.QtCore import QCoreApplication
    from qgis.PyQt.QtGui import QFont

    app = QgsApplication([], True)
    app.initQgis()
    app.setFont(QFont("DejaVu Sans", 9))
    work = Path(tempfile.mkdtemp(prefix="geopeft-shots-"))
    data = write_test_data(work / "data", size=256)
    project = QgsProject.instance()
    # the Sen1Floods11 chip of tests/data: a 13-band Sentinel-2 image and its water labels
    chip = work / "chip"  # a copy: QGIS writes .aux.xml statistics beside what it opens
    chip.mkdir()
    for name in ("Spain_7370579_LabelHand.tif", "Spain_7370579_S2Hand.tif"):
        shutil.copy(REPO / "tests" / "data" / name, chip / name)
    labels = QgsRasterLayer(str(chip / "Spain_7370579_LabelHand.tif"), "Sen1Floods11 labels")
    labels.dataProvider().setUserNoDataValue(1, [QgsRasterRange(-1, -1)])  # -1: no label
    project.addMapLayers([
        QgsRasterLayer(str(chip / "Spain_7370579_S2Hand.tif"), "Sentinel-2 scene (13 bands)"),
        labels,
        QgsRasterLayer(str(data["scene"]), "HLS scene 2024-06-12"),
        QgsVectorLayer(str(data["labels_gpkg"]), "land cover polygons", "ogr"),
    ])

    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    from qgis_plugin.dialogs.setup_dialog import SetupDialog
    from qgis_plugin.dialogs.train_dialog import TrainDialog

    def grab(widget, name):
        widget.show()
        for _ in range(5):
            QCoreApplication.processEvents()
        path = out / name
        widget.grab().save(str(path))
        widget.close()
        print(path)

    def settle(condition, timeout=60.0):
        end = time.monotonic() + timeout
        while not condition() and time.monotonic() < end:
            QCoreApplication.processEvents()
            time.sleep(0.02)

    train = TrainDialog(None)
    settle(lambda: train.band_table.info is not None or train.band_table.info_error)
    train.band_table.tick_matching()
    train.class_table.set_name(0, "not water")
    train.class_table.set_name(1, "water")
    train.max_time.setText("30m")
    train.out.setFilePath("/home/analyst/floods/models/S2Hand")
    grab(train, "train-dialog.png")
    train._set_running(True)
    from qgis_plugin.processing.base import ProgressMapper
    train._mapper = ProgressMapper("train")
    train._metrics = {}
    for event in (
            {"v": 1, "event": "progress", "stage": "train", "step": 412, "total": 1200,
             "epoch": 7, "loss": 0.3127},
            {"v": 1, "event": "metric", "name": "val_loss", "value": 0.3561, "stage": "validate",
             "epoch": 6},
            {"v": 1, "event": "metric", "name": "val_miou", "value": 0.7342, "stage": "validate",
             "epoch": 6}):
        train._on_event(event)
    grab(train, "train-dialog-running.png")

    model = work / "models" / "S2Hand"
    model.mkdir(parents=True)
    (model / "card.json").write_text(json.dumps({
        "backbone": {"name": "prithvi_eo_v2_tiny"}, "tuning": {"method": "lora"},
        "classes": [{"value": 0, "name": "not water", "colour": "#bdbdbd"},
                    {"value": 1, "name": "water", "colour": "#1f78b4"}],
        "input": {"bands": [2, 3, 4, 9, 12, 13],
                  "band_names": ["B2", "B3", "B4", "B8A", "B11", "B12"]}}))
    predict = PredictDialog(None)
    predict.model.setFilePath(str(model))
    predict.model.blockSignals(True)  # a readable path in the picture, the card read above
    predict.model.setFilePath("/home/analyst/floods/models/S2Hand")
    predict.model.blockSignals(False)
    predict.out.setFilePath("/home/analyst/floods/results/S2Hand_classes.tif")
    predict.want_uncertainty.setChecked(True)
    predict.uncertainty.setFilePath("/home/analyst/floods/results/S2Hand_uncertainty.tif")
    predict.want_polygons.setChecked(True)
    predict.polygons.setFilePath("/home/analyst/floods/results/S2Hand_classes.gpkg")
    predict.probabilities.setFilePath("/home/analyst/floods/results/S2Hand_probabilities.tif")
    grab(predict, "predict-dialog.png")

    setup = SetupDialog(None)
    setup.python.setFilePath("/home/analyst/geopeft/.venv/bin/python")
    setup.state.setText("GeoPEFT engine 0.1.0 is installed.")
    setup.venv.setFilePath("/home/analyst/.local/share/QGIS/QGIS3/profiles/default/geopeft-engine-venv")
    setup.progress.setValue(50)
    setup.step_label.setText("Step 4/6: Installing the engine's dependencies (large download: "
                             "PyTorch, GDAL)…")
    for line in ("$ …/geopeft-engine-venv/bin/python -m pip install --progress-bar off "
                 "--only-binary :all: torch>=2.4 torchvision>=0.19 timm>=1.0 peft>=0.13 …",
                 "Requirement already satisfied: torch>=2.4 (2.15.0+cpu)",
                 "Collecting timm>=1.0", "Collecting peft>=0.13", "Collecting rasterio>=1.4",
                 "  Downloading rasterio-1.5.2-cp312-cp312-manylinux_2_28_x86_64.whl"):
        setup.output.appendPlainText(line)
    grab(setup, "setup-dialog.png")
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
