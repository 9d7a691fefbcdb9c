"""The Predict dialog: raster + model -> class raster (styled), probabilities, polygons."""
from __future__ import annotations

import json
import os

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox, QgsMessageBar
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from .. import settings
from ..core.commands import DEVICES, PredictConfig, predict_args, validate_predict
from ..core.rasterinfo import grid_problems
from ..icons import icon
from ..processing.base import ProgressMapper
from ..processing.polygons import polygonize
from ..styling import (classes_from_raster_file, normalise_classes, style_polygons,
                       style_prediction, write_default_style)
from .task import EngineTask, log
from .train_dialog import DEVICE_LABELS, project_layers, show_error


class PredictDialog(QDialog):
    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.task: EngineTask | None = None
        self.added_layers: list = []
        self.setWindowTitle("GeoPEFT — Predict classes")
        self.setWindowIcon(icon("predict.svg"))
        self._build()

    def _build(self) -> None:
        self.bar = QgsMessageBar(self)
        self.bar.setSizePolicy(QSizePolicy.Minimum, QSizePolicy.Fixed)

        inputs = QGroupBox("Input")
        form = QFormLayout(inputs)
        self.raster = QgsMapLayerComboBox()
        self.raster.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.raster.layerChanged.connect(self._suggest_output)
        form.addRow("Raster", self.raster)
        model_row = QWidget()
        row = QHBoxLayout(model_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.model = QgsFileWidget()
        self.model.setFilter("GeoPEFT model (card.json *.onnx)")
        self.model.setDialogTitle("Trained model (its card.json) or ONNX model")
        self.model.fileChanged.connect(self._model_changed)
        self.model_folder = QPushButton("Folder…")
        self.model_folder.setToolTip("Choose a trained model folder")
        self.model_folder.clicked.connect(self._choose_model_folder)
        row.addWidget(self.model, 1)
        row.addWidget(self.model_folder)
        form.addRow("Model", model_row)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        form.addRow("", self.model_info)

        outputs = QGroupBox("Outputs")
        oform = QFormLayout(outputs)
        self.out = QgsFileWidget()
        self.out.setStorageMode(QgsFileWidget.SaveFile)
        self.out.setFilter("GeoTIFF (*.tif)")
        oform.addRow("Classes raster", self.out)
        self.want_probabilities = QCheckBox("Class probabilities")
        self.probabilities = QgsFileWidget()
        self.probabilities.setStorageMode(QgsFileWidget.SaveFile)
        self.probabilities.setFilter("GeoTIFF (*.tif)")
        self.probabilities.setEnabled(False)
        self.want_probabilities.toggled.connect(self.probabilities.setEnabled)
        oform.addRow(self.want_probabilities, self.probabilities)
        self.want_polygons = QCheckBox("Class polygons")
        self.polygons = QgsFileWidget()
        self.polygons.setStorageMode(QgsFileWidget.SaveFile)
        self.polygons.setFilter("GeoPackage (*.gpkg)")
        self.polygons.setEnabled(False)
        self.want_polygons.toggled.connect(self.polygons.setEnabled)
        oform.addRow(self.want_polygons, self.polygons)
        self.device = QComboBox()
        for device in DEVICES:
            self.device.addItem(DEVICE_LABELS[device], device)
        oform.addRow("Device", self.device)

        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("Ready.")
        self.buttons = QDialogButtonBox()
        self.run_button = QPushButton(icon("predict.svg"), "Predict")
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.buttons.addButton(self.run_button, QDialogButtonBox.ActionRole)
        self.buttons.addButton(self.cancel_button, QDialogButtonBox.ActionRole)
        self.buttons.addButton(QDialogButtonBox.Close)
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(self.bar)
        layout.addWidget(inputs)
        layout.addWidget(outputs)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.buttons)
        self.resize(QSize(620, 440))
        # default: the topmost multi-band raster (an image rather than a class raster)
        images = [layer for layer in project_layers()
                  if isinstance(layer, QgsRasterLayer) and layer.bandCount() > 1]
        if images:
            self.raster.setLayer(images[0])
        self._suggest_output(self.raster.currentLayer())

    # -- choices -------------------------------------------------------------------------------
    def _choose_model_folder(self) -> None:
        from qgis.PyQt.QtWidgets import QFileDialog
        folder = QFileDialog.getExistingDirectory(self, "Trained model folder")
        if folder:
            self.model.setFilePath(folder)

    def _model_changed(self, path: str) -> None:
        self.model_info.setText(describe_model(path))

    def _suggest_output(self, layer) -> None:
        if layer is None or self.out.filePath():
            return
        base = os.path.splitext(layer.source().split("|")[0])[0]
        if os.path.isdir(os.path.dirname(base)):
            self.out.setFilePath(base + "_classes.tif")
            self.probabilities.setFilePath(base + "_probabilities.tif")
            self.polygons.setFilePath(base + "_classes.gpkg")

    def config(self) -> PredictConfig:
        layer = self.raster.currentLayer()
        return PredictConfig(
            model=self.model.filePath().strip(),
            images=[layer.source()] if layer is not None else [],
            out=self.out.filePath().strip(),
            probabilities=(self.probabilities.filePath().strip() or None)
            if self.want_probabilities.isChecked() else None,
            device=self.device.currentData(),
        )

    def polygons_path(self) -> str | None:
        return (self.polygons.filePath().strip() or None) if self.want_polygons.isChecked() else None

    def validate(self) -> list[str]:
        config = self.config()
        problems = validate_predict(config)
        if self.want_probabilities.isChecked() and not config.probabilities:
            problems.append("Choose where to write the probabilities, or untick them.")
        polygons = self.polygons_path()
        if self.want_polygons.isChecked() and not polygons:
            problems.append("Choose where to write the polygons, or untick them.")
        if polygons and not polygons.lower().endswith((".gpkg", ".shp", ".geojson", ".fgb")):
            problems.append("Polygons must be written to a GeoPackage (.gpkg), Shapefile, "
                            "GeoJSON or FlatGeobuf file.")
        if config.images and self.raster.currentLayer() is not None:
            problems += grid_problems(config.images)
        problems = list(dict.fromkeys(problems))
        self.bar.clearWidgets()
        if problems:
            self.bar.pushMessage("Cannot predict", " ".join(problems), Qgis.Warning, 0)
        return problems

    def command(self) -> list[str]:
        return predict_args(self.config())

    # -- running -------------------------------------------------------------------------------
    def start(self) -> EngineTask | None:
        if self.task is not None or self.validate():
            return None
        config = self.config()
        polygons = self.polygons_path()
        args = predict_args(config)
        log("Predict: <engine python> -m engine " + " ".join(args))

        def after(result, task):  # worker thread: polygonise with QGIS's own algorithms
            raster = result.artifact("raster") or {}
            out = raster.get("path") or config.out
            classes = normalise_classes(raster.get("classes")) or classes_from_raster_file(out)
            write_default_style(out, classes, "raster")
            polygon_path = None
            if polygons:
                feedback = QgsProcessingFeedback()
                task.taskTerminated.connect(feedback.cancel)
                polygon_path = polygonize(out, classes, polygons, QgsProcessingContext(), feedback,
                                          child=False)
                if polygon_path:
                    write_default_style(polygon_path, classes, "vector")
            return {"out": out, "classes": classes, "polygons": polygon_path}

        mapper = ProgressMapper("predict")
        self.task = EngineTask("GeoPEFT: prediction", settings.engine_python(), args,
                               progress=mapper.percent, after=after)
        self._mapper = mapper
        self.task.engineEvent.connect(self._on_event)
        self.task.logLine.connect(lambda line: log(line))
        self.task.ended.connect(self._on_completed)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("Starting the engine…")
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.cancel_button.setEnabled(False)
            self.status.setText("Cancelling…")
            self.task.cancel()

    def _on_event(self, event: dict) -> None:
        percent = self._mapper.percent(event)
        if percent is not None:
            self.progress.setValue(int(percent))
            if event.get("total"):
                self.status.setText(f"Predicting: tile {event['step']}/{event['total']}")
        elif event["event"] == "warning":
            self.bar.pushMessage("Engine", event.get("message", ""), Qgis.Warning, 8)

    def _on_completed(self, task: EngineTask) -> None:
        self.task = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if task.error is not None:
            self.progress.setValue(0)
            self.status.setText("Prediction failed.")
            show_error(self.iface, self.bar, task.error)
            return
        if task.cancelled or not task.after_result:
            self.progress.setValue(0)
            self.status.setText("Prediction cancelled; nothing was written.")
            return
        self.progress.setValue(100)
        self.added_layers = add_results(task.after_result)
        text = f"Classes written to {task.after_result['out']}"
        self.status.setText(text)
        self.bar.pushMessage("GeoPEFT", text, Qgis.Success, 10)


def add_results(results: dict) -> list:
    """Add the class raster (paletted by class) and polygons (categorized) to the project."""
    classes = results["classes"]
    added = []
    raster = QgsRasterLayer(results["out"], os.path.splitext(os.path.basename(results["out"]))[0])
    if raster.isValid():
        style_prediction(raster, classes)
        QgsProject.instance().addMapLayer(raster)
        added.append(raster)
    if results.get("polygons"):
        polygons = QgsVectorLayer(results["polygons"], os.path.splitext(
            os.path.basename(results["polygons"].split("|")[0]))[0] + " polygons", "ogr")
        if polygons.isValid():
            style_polygons(polygons, classes)
            QgsProject.instance().addMapLayer(polygons)
            added.append(polygons)
    return added


def describe_model(path: str) -> str:
    """One line about a model: backbone, tuning, classes and bands from its card."""
    card = os.path.join(path, "card.json") if os.path.isdir(path) else path
    if path.lower().endswith(".onnx") and os.path.isfile(path):
        return "ONNX model (runs with onnxruntime)."
    if not (card.endswith("card.json") and os.path.isfile(card)):
        return ""
    try:
        with open(card, encoding="utf-8") as f:
            info = json.load(f)
        backbone = info.get("backbone", {})
        tuning = info.get("tuning", {})
        classes = normalise_classes(info.get("classes"))
        bands = info.get("input", {}).get("band_names") or []
        parts = [str(backbone.get("name", "")) if isinstance(backbone, dict) else str(backbone),
                 str(tuning.get("method", "")) if isinstance(tuning, dict) else str(tuning),
                 f"{len(classes)} classes: " + ", ".join(c["name"] for c in classes)]
        if bands:
            parts.append("bands: " + ", ".join(str(b) for b in bands))
        return " · ".join(p for p in parts if p)
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return "card.json could not be read."
