"""Render the plugin's dialogs offscreen into docs/*.png (``make screenshots``).

    QT_QPA_PLATFORM=offscreen .venv/bin/python tests/plugin/screenshots.py [--out docs]

The dialogs are filled from a small project: the Sen1Floods11 chip of tests/data (its labels'
-1 set as no-data in QGIS) and the generated test rasters. The Train dialog asks the engine for
the model's pretrained bands (``engine models``).

The analyst's loop is shown from a real run (about a minute): the Train dialog trains on the
demo scene's labels (random weights, seed 0) with map previews every 2 epochs; it is grabbed
mid-run (the live chart, the time left) and at the end, the last preview is drawn beside the
image, and the evaluation report of its prediction is rendered (QtWebKit, else QTextBrowser).
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


def loop_screenshots(work: Path, out: Path, grab, settle, epochs: int = 16, size: int = 384) -> None:
    """The analyst's loop from a real training run on the demo scene (see the module's doc)."""
    import subprocess

    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings, QgsProject, QgsRasterLayer
    from qgis.PyQt.QtCore import QCoreApplication, QSize, Qt
    from qgis.PyQt.QtGui import QColor, QImage, QPainter

    from qgis_plugin.dialogs.train_dialog import TrainDialog
    from qgis_plugin.styling import rgb_renderer

    os.environ.setdefault("GEOPEFT_ENGINE_PYTHON", sys.executable)
    python = os.environ["GEOPEFT_ENGINE_PYTHON"]
    scene_dir = work / "demo"
    subprocess.run([python, "-m", "engine", "demo-data", "--out", str(scene_dir), "--size", str(size)], check=True,
                   cwd=REPO, capture_output=True)
    project = QgsProject.instance()
    project.clear()
    scene = QgsRasterLayer(str(scene_dir / "scene.tif"), "demo scene")
    labels = QgsRasterLayer(str(scene_dir / "labels.tif"), "land cover labels")
    project.addMapLayers([scene, labels])
    train = TrainDialog(None)
    train.set_checked_rasters([scene])
    train.labels.setLayer(labels)
    train.weights.setCurrentIndex(train.weights.findData("none"))
    train.epochs.setValue(epochs)
    train.preview_every.setValue(2)
    train.out.setFilePath(str(work / "models" / "demo_round1"))
    train.show()
    train.start()
    settle(lambda: train.chart.epochs >= min(7, epochs // 2 + 1) or train.task is None, timeout=600)
    grab(train, "train-dialog-running.png")
    train.show()
    settle(lambda: train.task is None, timeout=600)
    grab(train, "train-dialog-loop.png")

    # the last preview beside the image (natural colours)
    preview = train.preview.layer
    scene.setRenderer(rgb_renderer(scene, (3, 2, 1), std_devs=2))
    side = 420
    picture = QImage(2 * side + 10, side + 24, QImage.Format.Format_ARGB32)
    picture.fill(QColor("white"))
    painter = QPainter(picture)
    for i, (layer, title) in enumerate(((scene, "demo scene (red, green, blue)"), (preview, preview.name()))):
        settings = QgsMapSettings()
        settings.setLayers([layer])
        settings.setDestinationCrs(scene.crs())
        settings.setExtent(scene.extent())
        settings.setOutputSize(QSize(side, side))
        settings.setBackgroundColor(QColor("white"))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        painter.drawImage(i * (side + 10), 24, job.renderedImage())
        painter.drawText(i * (side + 10), 0, side, 22, int(Qt.AlignmentFlag.AlignCenter), title)
    painter.end()
    picture.save(str(out / "training-preview.png"))
    print(out / "training-preview.png")

    model = work / "models" / "demo_round1"
    prediction, report = work / "prediction.tif", work / "report.html"
    for args in (["predict", "--model", model, "--image", scene_dir / "scene.tif", "--out", prediction],
                 ["evaluate", "--prediction", prediction, "--labels", scene_dir / "labels.tif", "--report", report]):
        subprocess.run([python, "-m", "engine", *map(str, args)], check=True, cwd=REPO, capture_output=True)
    _render_html(report, out / "evaluation-report.png")
    QCoreApplication.processEvents()
    train.close()


def _render_html(html: Path, png: Path, width: int = 1000) -> None:
    """The report as the browser shows it: QtWebKit when installed, else QTextBrowser."""
    from qgis.PyQt.QtCore import QCoreApplication, QSize, QUrl
    from qgis.PyQt.QtGui import QColor, QImage, QPainter

    try:
        from qgis.PyQt.QtWebKitWidgets import QWebPage
    except ImportError:
        QWebPage = None
    if QWebPage is not None:
        page = QWebPage()
        loaded = []
        page.mainFrame().loadFinished.connect(loaded.append)
        page.mainFrame().load(QUrl.fromLocalFile(str(html)))
        end = time.monotonic() + 30
        while not loaded and time.monotonic() < end:
            QCoreApplication.processEvents()
            time.sleep(0.02)
        page.setViewportSize(QSize(width, 800))
        page.setViewportSize(QSize(width, page.mainFrame().contentsSize().height()))
        image = QImage(page.viewportSize(), QImage.Format.Format_ARGB32)
        image.fill(QColor("white"))
        painter = QPainter(image)
        page.mainFrame().render(painter)
        painter.end()
    else:
        from qgis.PyQt.QtWidgets import QTextBrowser
        view = QTextBrowser()
        view.setHtml(html.read_text(encoding="utf-8"))
        view.resize(width, 2400)
        image = view.grab().toImage()
    image.save(str(png))
    print(png)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--loop-epochs", type=int, default=16, help="epochs of the real training run shown")
    parser.add_argument("--loop-size", type=int, default=384, help="side of its demo scene, pixels")
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
    train.close()

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
    loop_screenshots(work, out, grab, settle, args.loop_epochs, args.loop_size)  # clears the project: last
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
