"""The Train dialog: project layers -> TrainConfig -> engine in a QgsTask, live progress."""
from __future__ import annotations

import os

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox, QgsMessageBar
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QIcon, QPixmap
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import settings
from ..core.commands import (BACKBONES, DECODERS, DEVICES, TUNING_METHODS,
                             TrainConfig, train_args, validate_train)
from ..core.rasterinfo import band_descriptions, grid_problems
from ..icons import icon
from ..layers import LayerError, layer_path
from ..processing.base import ProgressMapper
from ..styling import classes_from_raster_layer, classes_from_vector_layer
from .task import EngineTask, log

TUNING_LABELS = {"lora": "LoRA (recommended)", "dora": "DoRA", "full": "Full fine-tuning",
                 "linear-probe": "Linear probe (frozen backbone)"}
WEIGHTS_CHOICES = (("auto", "Pretrained (downloaded automatically)"),
                   ("none", "Random initialisation (no pretraining)"),
                   ("file", "From file…"))
DEVICE_LABELS = {"auto": "Automatic (GPU if available)", "cpu": "CPU", "gpu": "GPU"}


def swatch(colour: str) -> QIcon:
    pixmap = QPixmap(14, 14)
    pixmap.fill(QColor(colour))
    return QIcon(pixmap)


def project_layers() -> list:
    """The project's layers in the Layers panel's order (top first), then any not in the tree."""
    project = QgsProject.instance()
    ordered = [node.layer() for node in project.layerTreeRoot().findLayers() if node.layer()]
    seen = {layer.id() for layer in ordered}
    return ordered + [layer for layer in project.mapLayers().values() if layer.id() not in seen]


def preferred_class_field(layer: QgsVectorLayer) -> str | None:
    """The categorized renderer's field, else a field named like a class, else None."""
    names = [f.name() for f in layer.fields()]
    renderer = layer.renderer()
    if isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() in names:
        return renderer.classAttribute()
    for candidate in ("class_id", "classid", "class", "label", "class_name", "classname"):
        for name in names:
            if name.lower() == candidate:
                return name
    return None


def is_polygon_layer(layer) -> bool:
    return isinstance(layer, QgsVectorLayer) and layer.geometryType() == QgsWkbTypes.PolygonGeometry


class TrainDialog(QDialog):
    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.task: EngineTask | None = None
        self.classes: list[dict] = []
        self.setWindowTitle("GeoPEFT — Train segmentation model")
        self.setWindowIcon(icon("train.svg"))
        self._build()
        self.populate()
        QgsProject.instance().layersAdded.connect(self.populate)
        QgsProject.instance().layersRemoved.connect(self.populate)

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.bar = QgsMessageBar(self)
        self.bar.setSizePolicy(QSizePolicy.Minimum, QSizePolicy.Fixed)

        data = QGroupBox("Data")
        form = QFormLayout(data)
        self.rasters = QListWidget()
        self.rasters.setSelectionMode(QAbstractItemView.NoSelection)
        self.rasters.setMaximumHeight(90)
        self.rasters.setToolTip("Rasters on the same grid; their bands are stacked in this order.")
        self.rasters.itemChanged.connect(self._rasters_changed)
        form.addRow("Input rasters", self.rasters)
        self.bands = QListWidget()
        self.bands.setSelectionMode(QAbstractItemView.NoSelection)
        self.bands.setMaximumHeight(110)
        self.bands.setToolTip("Bands fed to the model, by name (band description).")
        form.addRow("Bands", self.bands)
        self.labels = QgsMapLayerComboBox()
        self.labels.setFilters(QgsMapLayerProxyModel.RasterLayer | QgsMapLayerProxyModel.PolygonLayer)
        self.labels.setAllowEmptyLayer(True)
        self.labels.setToolTip("A class raster on the same grid, or polygons with a class field.")
        self.labels.layerChanged.connect(self._labels_changed)
        form.addRow("Labels", self.labels)
        self.label_field = QgsFieldComboBox()
        self.label_field.fieldChanged.connect(self._update_classes)
        form.addRow("Class field", self.label_field)
        self.class_list = QListWidget()
        self.class_list.setMaximumHeight(70)
        self.class_list.setFlow(QListWidget.LeftToRight)
        self.class_list.setWrapping(True)
        self.class_list.setSelectionMode(QAbstractItemView.NoSelection)
        self.class_list.setToolTip("Class names and colours, from the field values or the "
                                   "layer's categorized/paletted style.")
        form.addRow("Classes", self.class_list)

        model = QGroupBox("Model")
        mform = QFormLayout(model)
        self.backbone = QComboBox()
        self.backbone.addItems(BACKBONES)
        mform.addRow("Foundation model", self.backbone)
        self.weights = QComboBox()
        for key, text in WEIGHTS_CHOICES:
            self.weights.addItem(text, key)
        self.weights_file = QgsFileWidget()
        self.weights_file.setFilter("Weights (*.pt *.pth *.safetensors *.ckpt *.bin)")
        self.weights_file.setEnabled(False)
        self.weights.currentIndexChanged.connect(
            lambda: self.weights_file.setEnabled(self.weights.currentData() == "file"))
        mform.addRow("Weights", self.weights)
        mform.addRow("Weights file", self.weights_file)
        self.tuning = QComboBox()
        for method in TUNING_METHODS:
            self.tuning.addItem(TUNING_LABELS.get(method, method), method)
        mform.addRow("Tuning method", self.tuning)
        self.decoder = QComboBox()
        self.decoder.addItems(DECODERS)
        mform.addRow("Decoder", self.decoder)

        training = QGroupBox("Training")
        tform = QFormLayout(training)
        self.chip_size = QSpinBox()
        self.chip_size.setRange(16, 2048)
        self.chip_size.setSingleStep(16)
        self.chip_size.setValue(224)
        self.chip_size.setSuffix(" px")
        tform.addRow("Chip size", self.chip_size)
        budget = QWidget()
        row = QHBoxLayout(budget)
        row.setContentsMargins(0, 0, 0, 0)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10000)
        self.epochs.setValue(20)
        self.epochs.setSuffix(" epochs")
        self.max_time = QLineEdit()
        self.max_time.setPlaceholderText("time budget, e.g. 30m (optional)")
        row.addWidget(self.epochs)
        row.addWidget(self.max_time)
        tform.addRow("Budget", budget)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 1024)
        self.batch_size.setValue(8)
        tform.addRow("Batch size", self.batch_size)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(0.000001, 1.0)
        self.lr.setSingleStep(0.00005)
        self.lr.setValue(0.001)
        tform.addRow("Learning rate", self.lr)
        self.device = QComboBox()
        for device in DEVICES:
            self.device.addItem(DEVICE_LABELS[device], device)
        tform.addRow("Device", self.device)
        self.out = QgsFileWidget()
        self.out.setStorageMode(QgsFileWidget.GetDirectory)
        self.out.setDialogTitle("Folder for the trained model")
        tform.addRow("Output folder", self.out)

        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.status = QLabel("Ready.")
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.metrics = QLabel("")

        self.buttons = QDialogButtonBox()
        self.train_button = QPushButton(icon("train.svg"), "Train")
        self.train_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel training")
        self.cancel_button.setEnabled(False)
        self.buttons.addButton(self.train_button, QDialogButtonBox.ActionRole)
        self.buttons.addButton(self.cancel_button, QDialogButtonBox.ActionRole)
        self.buttons.addButton(QDialogButtonBox.Close)
        self.train_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.buttons.rejected.connect(self.reject)

        columns = QHBoxLayout()
        left = QVBoxLayout()
        left.addWidget(data)
        right = QVBoxLayout()
        right.addWidget(model)
        right.addWidget(training)
        right.addStretch(1)
        columns.addLayout(left, 1)
        columns.addLayout(right, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.bar)
        layout.addLayout(columns)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.metrics)
        layout.addWidget(self.buttons)
        self.resize(QSize(860, 560))

    # -- populating from the project ---------------------------------------------------------
    def populate(self, *_args) -> None:
        checked = set(self.checked_raster_ids())
        self.rasters.blockSignals(True)
        self.rasters.clear()
        for layer in project_layers():
            if isinstance(layer, QgsRasterLayer) and layer.isValid():
                item = QListWidgetItem(layer.name())
                item.setData(Qt.UserRole, layer.id())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if layer.id() in checked else Qt.Unchecked)
                item.setToolTip(f"{layer.source()}\n{layer.width()} × {layer.height()} px, "
                                f"{layer.bandCount()} bands, {layer.crs().authid()}")
                self.rasters.addItem(item)
        if not checked and self.rasters.count():  # a sensible default: the first raster
            self.rasters.item(0).setCheckState(Qt.Checked)
        self.rasters.blockSignals(False)
        self._rasters_changed()
        current = self.labels.currentLayer()
        if current is None or current.id() in self.checked_raster_ids():
            self._default_labels()
        self._labels_changed(self.labels.currentLayer())

    def _default_labels(self) -> None:
        """Prefer a polygon layer or a single-band raster that is not an input."""
        inputs = set(self.checked_raster_ids())
        for layer in project_layers():
            if is_polygon_layer(layer) or (isinstance(layer, QgsRasterLayer)
                                           and layer.bandCount() == 1 and layer.id() not in inputs):
                self.labels.setLayer(layer)
                return

    def checked_raster_ids(self) -> list[str]:
        return [self.rasters.item(i).data(Qt.UserRole) for i in range(self.rasters.count())
                if self.rasters.item(i).checkState() == Qt.Checked]

    def checked_rasters(self) -> list[QgsRasterLayer]:
        project = QgsProject.instance()
        return [layer for layer in (project.mapLayer(i) for i in self.checked_raster_ids()) if layer]

    def set_checked_rasters(self, layers) -> None:
        ids = {layer.id() for layer in layers}
        for i in range(self.rasters.count()):
            item = self.rasters.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in ids else Qt.Unchecked)

    def _rasters_changed(self, *_args) -> None:
        """Bands of the stacked rasters, by name; all checked by default."""
        previous = {self.bands.item(i).data(Qt.UserRole): self.bands.item(i).checkState()
                    for i in range(self.bands.count())}
        self.bands.clear()
        number = 0
        for layer in self.checked_rasters():
            names = band_descriptions(layer.source()) or [""] * layer.bandCount()
            for b, name in enumerate(names, start=1):
                number += 1
                text = f"{number}: {name or 'Band ' + str(b)}"
                if len(self.checked_raster_ids()) > 1:
                    text += f"  ({layer.name()})"
                item = QListWidgetItem(text)
                item.setData(Qt.UserRole, number)
                item.setData(Qt.UserRole + 1, name)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(previous.get(number, Qt.Checked))
                self.bands.addItem(item)

    def checked_bands(self) -> tuple[list[int], list[str]]:
        items = [self.bands.item(i) for i in range(self.bands.count())
                 if self.bands.item(i).checkState() == Qt.Checked]
        return [it.data(Qt.UserRole) for it in items], [it.data(Qt.UserRole + 1) for it in items]

    def set_checked_bands(self, numbers) -> None:
        for i in range(self.bands.count()):
            item = self.bands.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in numbers else Qt.Unchecked)

    def _labels_changed(self, layer) -> None:
        vector = isinstance(layer, QgsVectorLayer)
        self.label_field.setEnabled(vector and self.task is None)
        new_layer = (layer.id() if layer else None) != getattr(self, "_field_layer_id", None)
        if new_layer:
            self._field_layer_id = layer.id() if layer else None
            self.label_field.setLayer(layer if vector else None)
            if vector:
                self.label_field.setField(preferred_class_field(layer) or "")
        self._update_classes()

    def _update_classes(self, *_args) -> None:
        layer = self.labels.currentLayer()
        if isinstance(layer, QgsVectorLayer) and self.label_field.currentField():
            self.classes = classes_from_vector_layer(layer, self.label_field.currentField())
        elif isinstance(layer, QgsRasterLayer):
            self.classes = classes_from_raster_layer(layer)
        else:
            self.classes = []
        self.class_list.clear()
        for c in self.classes:
            item = QListWidgetItem(swatch(c["colour"]), f"{c['value']} {c['name']}")
            self.class_list.addItem(item)
        if isinstance(layer, QgsRasterLayer) and not self.classes:
            self.class_list.addItem("(values of the raster; names from the engine)")

    # -- config, validation, command -----------------------------------------------------------
    def config(self) -> TrainConfig:
        """The dialog's state as a TrainConfig (vector labels exported to a file if needed)."""
        layers = self.checked_rasters()
        bands, _names = self.checked_bands()  # the engine reads band names from the files
        all_bands = self.bands.count()
        labels_layer = self.labels.currentLayer()
        vector = isinstance(labels_layer, QgsVectorLayer)
        weights = self.weights.currentData()
        if weights == "file":
            weights = self.weights_file.filePath()
        return TrainConfig(
            images=[layer.source() for layer in layers],
            bands=[] if len(bands) == all_bands else bands,
            labels=layer_path(labels_layer) if labels_layer is not None else "",
            label_field=(self.label_field.currentField() or None) if vector else None,
            backbone=self.backbone.currentText(),
            weights=weights,
            tuning=self.tuning.currentData(),
            decoder=self.decoder.currentText(),
            chip_size=self.chip_size.value(),
            epochs=self.epochs.value(),
            max_time=self.max_time.text().strip() or None,
            batch_size=self.batch_size.value(),
            lr=self.lr.value(),
            device=self.device.currentData(),
            out=self.out.filePath().strip(),
        )

    def validate(self) -> list[str]:
        """Problems with the current choices, shown in the dialog's message bar."""
        problems = []
        labels_layer = self.labels.currentLayer()
        if not self.checked_raster_ids():
            problems.append("Choose at least one input raster.")
        if self.bands.count() and not self.checked_bands()[0]:
            problems.append("Choose at least one band.")
        if isinstance(labels_layer, QgsVectorLayer) and not self.label_field.currentField():
            problems.append("Choose the class field of the polygon labels.")
        if labels_layer is not None and labels_layer.id() in self.checked_raster_ids():
            problems.append("The labels layer cannot also be an input raster.")
        if self.weights.currentData() == "file" and not self.weights_file.filePath():
            problems.append("Choose the weights file.")
        try:
            config = self.config()
        except LayerError as exc:
            problems.append(str(exc))
            config = None
        if config is not None:
            problems += [p for p in validate_train(config) if p not in problems]
            problems += grid_problems(config.images)
            layers = self.checked_rasters()
            if layers:
                smallest = min(min(layer.width(), layer.height()) for layer in layers)
                if config.chip_size > smallest:
                    problems.append(f"Chip size {config.chip_size} px is larger than the raster "
                                    f"({smallest} px); choose at most {smallest}.")
            if isinstance(labels_layer, QgsRasterLayer) and config.images:
                problems += [p.replace(" is not on the same grid", " (labels) is not on the same grid")
                             for p in grid_problems([config.images[0], labels_layer.source()])]
        unique = list(dict.fromkeys(problems))
        self.bar.clearWidgets()
        if unique:
            self.bar.pushMessage("Cannot start training", " ".join(unique), Qgis.Warning, 0)
        return unique

    def command(self) -> list[str]:
        """The engine command for the current choices (after validation)."""
        config = self.config()
        config.classes = self.classes or None
        return train_args(config)

    # -- running -------------------------------------------------------------------------------
    def start(self) -> EngineTask | None:
        if self.task is not None:
            return None
        if self.validate():
            return None
        args = self.command()
        log("Train: <engine python> -m engine " + " ".join(args))
        mapper = ProgressMapper("train")
        self.task = EngineTask("GeoPEFT: training", settings.engine_python(), args,
                               progress=mapper.percent)
        self._mapper = mapper
        self._last_epoch = None
        self._metrics: dict[str, float] = {}
        self.task.engineEvent.connect(self._on_event)
        self.task.logLine.connect(lambda line: log(line))
        self.task.ended.connect(self._on_completed)
        self._set_running(True)
        self.status.setText("Starting the engine…")
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.status.setText("Cancelling: the engine finishes the current step and keeps the "
                                "best weights so far…")
            self.cancel_button.setEnabled(False)
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.train_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for widget in (self.rasters, self.bands, self.labels, self.label_field, self.backbone,
                       self.weights, self.tuning, self.decoder, self.chip_size, self.epochs,
                       self.max_time, self.batch_size, self.lr, self.device, self.out):
            widget.setEnabled(not running)
        if not running:
            self.weights_file.setEnabled(self.weights.currentData() == "file")
            self._labels_changed(self.labels.currentLayer())

    def _on_event(self, event: dict) -> None:
        kind = event["event"]
        percent = self._mapper.percent(event)
        if percent is not None:
            self.progress.setValue(int(percent))
        if kind == "progress":
            if event.get("stage") == "train":
                parts = []
                if event.get("epoch") is not None:
                    parts.append(f"Epoch {event['epoch']}")
                if event.get("total"):
                    parts.append(f"step {event['step']}/{event['total']}")
                if isinstance(event.get("loss"), (int, float)):
                    parts.append(f"loss {event['loss']:.4f}")
                self.status.setText(" · ".join(parts) or "Training…")
            else:
                self.status.setText(event.get("message") or f"{event.get('stage', '').capitalize()}…")
        elif kind == "metric":
            self._metrics[event["name"]] = event["value"]
            text = []
            if "val_miou" in self._metrics:
                text.append(f"Validation mIoU {self._metrics['val_miou']:.3f}")
            if "val_loss" in self._metrics:
                text.append(f"validation loss {self._metrics['val_loss']:.4f}")
            if event.get("epoch") is not None and text:
                text[-1] += f" (epoch {event['epoch']})"
            self.metrics.setText(" · ".join(text))
        elif kind == "warning":
            log(event.get("message", ""), Qgis.Warning)
            self.bar.pushMessage("Engine", event.get("message", ""), Qgis.Warning, 8)

    def _on_completed(self, task: EngineTask) -> None:
        self.task = None
        self._set_running(False)
        if task.error is not None:
            self.progress.setValue(0)
            self.status.setText("Training failed.")
            show_error(self.iface, self.bar, task.error)
            return
        result = task.result
        out = (result.done.get("out") if result else None) or self.out.filePath()
        miou = result.done.get("best_val_miou") if result else None
        if task.cancelled:
            written = os.path.isfile(os.path.join(out, "card.json"))
            text = (f"Training cancelled; the best model so far is in {out}." if written else
                    "Training cancelled before the first validation; nothing was written.")
            self.status.setText(text)
            self.bar.pushMessage("GeoPEFT", text, Qgis.Info, 10)
            return
        self.progress.setValue(100)
        text = f"Model saved to {out}" + (f" (best validation mIoU {miou:.3f})"
                                          if isinstance(miou, (int, float)) else "")
        self.status.setText(text)
        self.bar.pushMessage("GeoPEFT", text, Qgis.Success, 0)
        if self.iface is not None:
            self.iface.messageBar().pushMessage("GeoPEFT", text, Qgis.Success, 10)
        log(text)

    def closeEvent(self, event):  # noqa: N802 - Qt API
        # the task keeps running in QGIS's task manager (with its own cancel button)
        super().closeEvent(event)


def show_error(iface, dialog_bar, error) -> None:
    """One clear message (engine output tail behind "More"), in the dialog, main bar and log."""
    log(error.message + ("\n" + error.details if error.details else ""), Qgis.Critical)
    first = error.message.split("\n")[0]
    dialog_bar.pushMessage("GeoPEFT", error.message, Qgis.Critical, 0)
    if iface is not None:
        try:
            iface.messageBar().pushMessage("GeoPEFT", first, error.message, Qgis.Critical, 0)
        except TypeError:  # stub interfaces without the showMore overload
            iface.messageBar().pushMessage("GeoPEFT", error.message, Qgis.Critical, 0)
