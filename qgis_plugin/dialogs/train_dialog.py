"""The Train dialog: project layers -> TrainConfig -> engine in a QgsTask, live progress."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace

from qgis.core import (Qgis, QgsApplication, QgsCoordinateTransform, QgsMapLayerProxyModel, QgsProject,
                       QgsRasterLayer, QgsVectorLayer)
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox, QgsMessageBar
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
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
from ..core.commands import (BACKBONES, DECODER_LABELS, DECODERS, DEVICES, PATCH_SIZES,
                             TUNING_LABELS, TUNING_METHODS, TrainConfig, aoi_box, read_card, train_args,
                             validate_train)
from ..core.rasterinfo import band_descriptions, grid_problems
from ..icons import icon
from ..labels import (LabelsError, TEMPLATE_CLASS_FIELD, create_labels_layer, ignore_index, label_values,
                      negative_values_warning, raster_label_classes)
from ..core.engine_client import EngineError
from ..layers import LayerCopy, LayerError, PreviewLayer, needs_copy, temp_copy_path
from ..processing.base import ProgressMapper
from ..styling import classes_from_vector_layer
from .band_table import Band, BandTable
from .chart import TrainingChart, time_left
from .class_table import ClassTable
from .defaults import default_layers, new_model_folder, preferred_class_field, project_layers
from .engine_info import request_models_info
from .messages import MessagePanel, show_error, show_problems
from .task import EngineTask, log

AUTO_CHIP = "Automatic (from the labelled area)"
AUTO_EPOCHS = "Automatic epochs"
AUTO_LR = "Automatic (by tuning method)"
WEIGHTS_CHOICES = (("auto", "Pretrained (downloaded automatically)"),
                   ("none", "Random initialisation (no pretraining)"),
                   ("file", "From file…"))
DEVICE_LABELS = {"auto": "Automatic (GPU if available)", "cpu": "CPU", "gpu": "GPU"}
LAYER_ID = Qt.ItemDataRole.UserRole
LABELS_COPY = "<a copy of '{}', written when training starts>"
INT_RANGE = (-2_147_483_648, 2_147_483_647)


class TrainDialog(QDialog):
    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.task: EngineTask | None = None
        self._field_layer_id = None
        self._auto_out = ""
        self._last_model = ""  # the model the last run wrote (offered to continue from)
        self.preview = PreviewLayer()
        self._preview_dir: str | None = None
        self.setWindowTitle("GeoPEFT — Train segmentation model")
        self.setWindowIcon(icon("train.svg"))
        self._build()
        self.populate()
        self._models_task = request_models_info(self._models_info_arrived)
        QgsProject.instance().layersAdded.connect(self.populate)
        QgsProject.instance().layersRemoved.connect(self.populate)

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.bar = QgsMessageBar(self)
        self.bar.setSizePolicy(QSizePolicy.Policy.Minimum, QSizePolicy.Policy.Fixed)

        data = QGroupBox("Data")
        form = QFormLayout(data)
        self.rasters = QListWidget()
        self.rasters.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.rasters.setMaximumHeight(80)
        self.rasters.setToolTip("Rasters on the same grid; their bands are stacked in this order.")
        self.rasters.itemChanged.connect(self._rasters_changed)
        form.addRow("Input rasters", self.rasters)
        self.band_table = BandTable()
        form.addRow("Bands", self.band_table)
        self.labels = QgsMapLayerComboBox()
        self.labels.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer
                               | QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.labels.setAllowEmptyLayer(True)
        self.labels.setToolTip("A class raster (one integer band), or polygons with a class field.")
        self.labels.layerChanged.connect(self._labels_changed)
        labels_box = QWidget()
        labels_row = QHBoxLayout(labels_box)
        labels_row.setContentsMargins(0, 0, 0, 0)
        labels_row.addWidget(self.labels, 1)
        self.new_labels_button = QPushButton("New labels layer…")
        self.new_labels_button.setToolTip(
            "Create an empty polygon GeoPackage to draw labels in: a 'class' field with the classes "
            "below (or two to start with), styled by class, in the CRS of the first input raster. "
            "It is chosen as the labels and opened for editing.")
        self.new_labels_button.clicked.connect(lambda: self.new_labels_layer())
        labels_row.addWidget(self.new_labels_button)
        form.addRow("Labels", labels_box)
        self.label_field = QgsFieldComboBox()
        self.label_field.fieldChanged.connect(lambda *_: self._update_classes())
        form.addRow("Class field", self.label_field)
        ignore_row = QWidget()
        row = QHBoxLayout(ignore_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.use_ignore = QCheckBox("Label value meaning \"no label\":")
        self.ignore_value = QSpinBox()
        self.ignore_value.setRange(*INT_RANGE)
        self.ignore_value.setValue(-1)
        self.ignore_value.setEnabled(False)
        self.use_ignore.toggled.connect(self.ignore_value.setEnabled)
        self.use_ignore.toggled.connect(lambda *_: self._update_classes(keep=True))
        self.ignore_value.valueChanged.connect(lambda *_: self._update_classes(keep=True))
        tip = ("Pixels with this label value are not trained on (besides the raster's no-data, "
               "including one set in Layer Properties ▸ Transparency).")
        self.use_ignore.setToolTip(tip)
        self.ignore_value.setToolTip(tip)
        row.addWidget(self.use_ignore)
        row.addWidget(self.ignore_value)
        row.addStretch(1)
        form.addRow("Ignore value", ignore_row)
        self.class_table = ClassTable()
        self.class_table.setToolTip("Name and colour each class (double-click a name to edit it). "
                                    "They label the model's predictions.")
        form.addRow("Classes", self.class_table)
        self.labels_note = QLabel("")
        self.labels_note.setWordWrap(True)
        self.labels_note.setStyleSheet("color: #9a6700;")
        self.labels_note.setVisible(False)
        form.addRow("", self.labels_note)

        model = QGroupBox("Model")
        mform = QFormLayout(model)
        self.init_from = QgsFileWidget()
        self.init_from.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.init_from.setDialogTitle("Trained model folder to continue from")
        self.init_from.lineEdit().setPlaceholderText("(a new model)")
        self.init_from.setToolTip("Continue training from a model trained before (e.g. after correcting or adding "
                                  "labels): it keeps that model's foundation model, tuning, decoder, bands and "
                                  "classes and starts from its trained weights. The result is a new model folder "
                                  "whose card names its parent.")
        self.init_from.fileChanged.connect(lambda *_: self._init_from_changed())
        mform.addRow("Continue from", self.init_from)
        self.init_note = QLabel("")
        self.init_note.setWordWrap(True)
        self.init_note.setVisible(False)
        mform.addRow("", self.init_note)
        self.backbone = QComboBox()
        self.backbone.addItems(BACKBONES)
        self.backbone.setEditable(True)  # any timm model as timm:NAME
        self.backbone.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.backbone.setToolTip("The foundation model (the engine's list), or any timm model written timm:NAME, "
                                 "e.g. timm:vit_small_patch16_224.")
        self._models_info = None
        self.backbone.currentTextChanged.connect(lambda name: self.band_table.set_model(name))
        self.backbone.currentTextChanged.connect(lambda *_: self._offer_methods())
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
        set_choices(self.tuning, TUNING_METHODS, TUNING_LABELS)
        self.tuning.setToolTip("How the foundation model is fine-tuned. Automatic: LoRA when it "
                               "starts from pretrained weights, full fine-tuning from random ones.")
        self.tuning.currentIndexChanged.connect(lambda *_: self._suggest_output())
        mform.addRow("Tuning method", self.tuning)
        self.decoder = QComboBox()
        set_choices(self.decoder, DECODERS, DECODER_LABELS)
        self.decoder.setToolTip("The segmentation head. Automatic: a light linear head for a linear "
                                "probe, a UNet for every other method.")
        mform.addRow("Decoder", self.decoder)
        self.frames = QSpinBox()
        self.frames.setRange(1, 64)
        self.frames.setValue(1)
        self.frames.setToolTip("How many dates the ticked rasters hold: one raster per date, each with the same "
                               "bands, in date order. The foundation model then sees a time series.")
        mform.addRow("Dates (frames)", self.frames)
        self.metadata = QCheckBox("Give the model the acquisition dates and the scene location")
        self.metadata.setToolTip("For the -TL foundation models (temporal and location encoders): the dates come "
                                 "from the rasters' metadata, the location from the scene centre. The paper found "
                                 "them unnecessary; off by default.")
        mform.addRow("", self.metadata)

        training = QGroupBox("Training")
        tform = QFormLayout(training)
        self.chip_size = QSpinBox()
        self.chip_size.setRange(0, 2048)  # 0: automatic
        self.chip_size.setSpecialValueText(AUTO_CHIP)
        self.chip_size.setValue(0)
        self.chip_size.setSuffix(" px")
        self.chip_size.setToolTip("Size of the square crops training samples. Automatic: chosen by "
                                  "the engine from the extent of the labels. A set size must be a "
                                  "multiple of the model's patch size.")
        self._set_chip_step(self.backbone.currentText())
        self.backbone.currentTextChanged.connect(self._set_chip_step)
        tform.addRow("Chip size", self.chip_size)
        budget = QWidget()
        row = QHBoxLayout(budget)
        row.setContentsMargins(0, 0, 0, 0)
        self.epochs = QSpinBox()
        self.epochs.setRange(0, 10000)  # 0: the engine's default
        self.epochs.setSpecialValueText(AUTO_EPOCHS)
        self.epochs.setValue(0)
        self.epochs.setSuffix(" epochs")
        self.epochs.setToolTip("Training stops after these epochs or the time budget, whichever "
                               "comes first. Automatic: the engine's default number of epochs.")
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
        self.lr.setRange(0.0, 0.999999)  # 0: the engine's default for the tuning method
        self.lr.setSpecialValueText(AUTO_LR)
        self.lr.setSingleStep(0.00005)
        self.lr.setValue(0.0)
        self.lr.setToolTip("Automatic: the engine picks the learning rate for the tuning method.")
        tform.addRow("Learning rate", self.lr)
        self.device = QComboBox()
        for device in DEVICES:
            self.device.addItem(DEVICE_LABELS[device], device)
        tform.addRow("Device", self.device)
        preview_row = QWidget()
        row = QHBoxLayout(preview_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.preview_on = QCheckBox("every")
        self.preview_on.setChecked(True)
        self.preview_every = QSpinBox()
        self.preview_every.setRange(1, 1000)
        self.preview_every.setValue(5)
        self.preview_every.setSuffix(" epochs")
        self.preview_on.toggled.connect(self.preview_every.setEnabled)
        self.preview_now = QPushButton("Preview now")
        self.preview_now.setEnabled(False)
        self.preview_now.clicked.connect(self.request_preview)
        tip = ("While training, the model as it stands is predicted on the map view (at most 1024 x 1024 px "
               "of it) and shown as a temporary layer that updates in place. Preview now: the current map "
               "view, after the current batch.")
        for widget in (self.preview_on, self.preview_every, self.preview_now):
            widget.setToolTip(tip)
            row.addWidget(widget)
        row.addStretch(1)
        tform.addRow("Map preview", preview_row)
        self.out = QgsFileWidget()
        self.out.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.out.setDialogTitle("Folder for the trained model")
        self.out.setToolTip("A new or empty folder; by default in 'models' beside the project "
                            "(or in GeoPEFT/models in your home folder).")
        tform.addRow("Output folder", self.out)
        self.out.fileChanged.connect(lambda *_: self._update_resume())

        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.metrics = QLabel("")
        self.chart = TrainingChart()
        self.messages = MessagePanel(self.iface, self)

        self.buttons = QDialogButtonBox()
        self.train_button = QPushButton(icon("train.svg"), "Train")
        self.train_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel training")
        self.cancel_button.setEnabled(False)
        self.resume_button = QPushButton("Resume")  # shown when the Output folder holds a cancelled run
        self.resume_button.setVisible(False)
        self.resume_button.clicked.connect(self.resume)
        self.continue_button = QPushButton("Continue from this model")  # shown after a run
        self.continue_button.setToolTip("Train again from the model just written, e.g. after correcting or "
                                        "adding labels (into a new folder)")
        self.continue_button.setVisible(False)
        self.continue_button.clicked.connect(self.continue_from_last)
        self.buttons.addButton(self.continue_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.buttons.addButton(self.resume_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.buttons.addButton(self.train_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.buttons.addButton(self.cancel_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.buttons.addButton(self.messages.log_button, QDialogButtonBox.ButtonRole.HelpRole)
        self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
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
        columns.addLayout(left, 3)
        columns.addLayout(right, 2)
        layout = QVBoxLayout(self)
        layout.addWidget(self.bar)
        layout.addLayout(columns)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.metrics)
        layout.addWidget(self.chart)
        layout.addWidget(self.messages)
        layout.addWidget(self.buttons)
        self.resize(QSize(1040, 940))

    # -- populating from the project ---------------------------------------------------------
    def populate(self, *_args) -> None:
        first = self.rasters.count() == 0 and not self.checked_raster_ids()
        checked = set(self.checked_raster_ids())
        self.rasters.blockSignals(True)
        self.rasters.clear()
        for layer in project_layers():
            if isinstance(layer, QgsRasterLayer) and layer.isValid() and layer.id() != self.preview.layer_id:
                item = QListWidgetItem(layer.name())
                item.setData(LAYER_ID, layer.id())
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(Qt.CheckState.Checked if layer.id() in checked
                                   else Qt.CheckState.Unchecked)
                item.setToolTip(f"{layer.source()}\n{layer.width()} × {layer.height()} px, "
                                f"{layer.bandCount()} bands, {layer.crs().authid()}")
                self.rasters.addItem(item)
        self.rasters.blockSignals(False)
        if first:  # by kind: a multi-band image, labels that look like labels, never one layer twice
            image, labels = default_layers()
            self.labels.setLayer(labels)
            self.set_checked_rasters([image] if image is not None else [])
        self._labels_changed(self.labels.currentLayer())
        self._rasters_changed()

    def checked_raster_ids(self) -> list[str]:
        return [self.rasters.item(i).data(LAYER_ID) for i in range(self.rasters.count())
                if self.rasters.item(i).checkState() == Qt.CheckState.Checked]

    def checked_rasters(self) -> list[QgsRasterLayer]:
        project = QgsProject.instance()
        return [layer for layer in (project.mapLayer(i) for i in self.checked_raster_ids()) if layer]

    def set_checked_rasters(self, layers) -> None:
        ids = {layer.id() for layer in layers}
        self.rasters.blockSignals(True)
        for i in range(self.rasters.count()):
            item = self.rasters.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.data(LAYER_ID) in ids
                               else Qt.CheckState.Unchecked)
        self.rasters.blockSignals(False)
        self._rasters_changed()

    def _rasters_changed(self, *_args) -> None:
        """The bands of the ticked rasters, stacked in order."""
        layers = self.checked_rasters()
        bands, number = [], 0
        for layer in layers:
            names = band_descriptions(layer.source()) or [""] * layer.bandCount()
            for name in names:
                number += 1
                bands.append(Band(number, layer.name(), name))
        self.band_table.set_bands(bands, show_layer=len(layers) > 1)
        self._suggest_output()

    def checked_bands(self) -> list[int]:
        return self.band_table.ticked()

    def set_checked_bands(self, numbers) -> None:
        self.band_table.set_ticked(numbers)

    def _models_info_arrived(self, info, error: str) -> None:
        self._models_task = None
        self.band_table.set_model(self.backbone.currentText(), info, error)
        if info is not None:  # the engine's own lists; an engine that does not say keeps ours
            self._models_info = info
            if info.bands:
                current = self.backbone.currentText()
                self.backbone.blockSignals(True)
                self.backbone.clear()
                self.backbone.addItems(list(info.bands))
                self.backbone.setCurrentText(current)
                self.backbone.blockSignals(False)
            self._offer_methods()
            if info.decoders:
                set_choices(self.decoder, info.decoders, DECODER_LABELS)

    def _offer_methods(self) -> None:
        """The tuning methods the chosen model supports (all of them until the engine has said)."""
        info = self._models_info
        if info is not None and info.tuning_methods:
            set_choices(self.tuning, info.methods_for(self.backbone.currentText()), TUNING_LABELS)

    def _set_chip_step(self, backbone: str) -> None:
        """The arrows step through multiples of the model's patch size."""
        patches = self._models_info.patches if getattr(self, "_models_info", None) else PATCH_SIZES
        self.chip_size.setSingleStep(patches.get(backbone, PATCH_SIZES.get(backbone, 16)))

    def _suggest_output(self) -> None:
        """A new folder in the models folder, until the analyst picks one."""
        current = self.out.filePath().strip()
        if current and current != self._auto_out:
            return
        layers = self.checked_rasters()
        method = self.tuning.currentData()
        stem = (layers[0].name() if layers else "model") + (f"_{method}" if method != "auto" else "")
        self._auto_out = new_model_folder(stem)
        self.out.setFilePath(self._auto_out)

    # -- labels --------------------------------------------------------------------------------
    def new_labels_layer(self, path: str | None = None) -> QgsVectorLayer | None:
        """Create a labels GeoPackage at ``path`` (asked for when None) for the analyst to draw
        in (``labels.create_labels_layer``: the classes of the table, or two to start with; the
        CRS of the first ticked raster, else the project's), add it to the project, choose it
        as the labels with its ``class`` field, and start editing it. Returns the layer."""
        if self.task is not None:  # the labels cannot change while training
            return None
        rasters = self.checked_rasters()
        if path is None:
            from qgis.PyQt.QtWidgets import QFileDialog
            folder = os.path.dirname(rasters[0].source()) if rasters else ""
            path, _ = QFileDialog.getSaveFileName(self, "New labels layer", os.path.join(folder, "labels.gpkg"),
                                                  "GeoPackage (*.gpkg)")
            if not path:
                return None
        if not path.lower().endswith(".gpkg"):
            path += ".gpkg"
        path = os.path.abspath(path)
        project = QgsProject.instance()
        if any(os.path.abspath(x.source().split("|")[0]) == path for x in project.mapLayers().values()):
            self.bar.pushMessage("GeoPEFT", f"{path} is open in the project: choose another file name.",
                                 Qgis.MessageLevel.Warning, 10)
            return None
        crs = rasters[0].crs() if rasters else project.crs()
        try:
            layer = create_labels_layer(path, crs, self.class_table.classes())
        except LabelsError as exc:
            self.bar.pushMessage("GeoPEFT", str(exc), Qgis.MessageLevel.Critical, 10)
            return None
        project.addMapLayer(layer)
        self.labels.setLayer(layer)
        self.label_field.setField(TEMPLATE_CLASS_FIELD)
        layer.startEditing()
        if self.iface is not None:
            self.iface.setActiveLayer(layer)
            self.iface.actionAddFeature().trigger()  # the map tool to draw polygons
        self.bar.pushMessage("GeoPEFT", f"Draw polygons in '{layer.name()}' and choose each one's class; "
                             "save the edits before training.", Qgis.MessageLevel.Info, 10)
        return layer

    def _labels_changed(self, layer) -> None:
        vector = isinstance(layer, QgsVectorLayer)
        running = self.task is not None
        self.label_field.setEnabled(vector and not running)
        for widget in (self.use_ignore, self.ignore_value):
            widget.setEnabled(not vector and not running
                              and (widget is self.use_ignore or self.use_ignore.isChecked()))
        new_layer = (layer.id() if layer else None) != self._field_layer_id
        self._mark_labels_raster(layer)
        if new_layer:
            self._field_layer_id = layer.id() if layer else None
            self.label_field.setLayer(layer if vector else None)
            if vector:
                self.label_field.setField(preferred_class_field(layer) or "")
            self._default_ignore(layer)
        self._update_classes(keep=not new_layer)

    def _mark_labels_raster(self, layer) -> None:
        """The labels raster cannot be an input too: untick it and grey it out in the list."""
        labels_id = layer.id() if isinstance(layer, QgsRasterLayer) else None
        changed = False
        self.rasters.blockSignals(True)
        for i in range(self.rasters.count()):
            item = self.rasters.item(i)
            is_labels = item.data(LAYER_ID) == labels_id
            if is_labels and item.checkState() == Qt.CheckState.Checked:
                item.setCheckState(Qt.CheckState.Unchecked)
                changed = True
            flags = item.flags() | Qt.ItemFlag.ItemIsEnabled
            item.setFlags(flags & ~Qt.ItemFlag.ItemIsEnabled if is_labels else flags)
            layer_name = QgsProject.instance().mapLayer(item.data(LAYER_ID)).name()
            item.setText(f"{layer_name}  (labels)" if is_labels else layer_name)
        self.rasters.blockSignals(False)
        if changed:
            self._rasters_changed()

    def _default_ignore(self, layer) -> None:
        """Tick the ignore value when the layer has a no-data value set in QGIS."""
        value = None
        if isinstance(layer, QgsRasterLayer):
            try:
                value = ignore_index(layer)
            except LabelsError:
                value = None  # reported by validate()
        self.use_ignore.blockSignals(True)
        self.use_ignore.setChecked(value is not None)
        self.ignore_value.setEnabled(value is not None and self.task is None)
        if value is not None:
            self.ignore_value.setValue(value)
        self.use_ignore.blockSignals(False)

    def explicit_ignore(self) -> int | None:
        return self.ignore_value.value() if self.use_ignore.isChecked() else None

    def _update_classes(self, keep: bool = False) -> None:
        layer = self.labels.currentLayer()
        note = ""
        if isinstance(layer, QgsVectorLayer) and self.label_field.currentField():
            self.class_table.set_classes(classes_from_vector_layer(layer, self.label_field.currentField()),
                                         editable=False)
        elif isinstance(layer, QgsRasterLayer):
            try:
                ignore = ignore_index(layer, self.explicit_ignore())
            except LabelsError as exc:
                ignore, note = self.explicit_ignore(), str(exc)
            self.class_table.set_classes(raster_label_classes(layer, ignore), keep=keep)
            note = note or negative_values_warning(layer, label_values(layer), ignore) or ""
        else:
            self.class_table.set_classes([])
        self.labels_note.setText(note)
        self.labels_note.setVisible(bool(note))

    @property
    def classes(self) -> list[dict]:
        return self.class_table.classes()

    # -- config, validation, command -----------------------------------------------------------
    def labels_arg(self, labels_file: str | None = None) -> str:
        """--labels: the labels layer's file; for a layer the engine cannot read as it is
        (memory, database, subset, one layer of several), ``labels_file``, where the task
        writes a copy (see ``start``), or a placeholder naming the copy until then. Cheap: no
        copy is made here, on the UI thread."""
        layer = self.labels.currentLayer()
        if layer is None:
            return ""
        if isinstance(layer, QgsRasterLayer):
            return layer.source()
        if needs_copy(layer):
            return labels_file or LABELS_COPY.format(layer.name())
        return layer.source().split("|")[0]

    def config(self, labels_file: str | None = None) -> TrainConfig:
        """The dialog's state as a TrainConfig (vector labels that need a copy: see labels_arg)."""
        layers = self.checked_rasters()
        bands = self.checked_bands()
        labels_layer = self.labels.currentLayer()
        vector = isinstance(labels_layer, QgsVectorLayer)
        weights = self.weights.currentData()
        if weights == "file":
            weights = self.weights_file.filePath()
        ignore = self.explicit_ignore()
        if isinstance(labels_layer, QgsRasterLayer):
            try:
                ignore = ignore_index(labels_layer, ignore)
            except LabelsError:
                pass  # validate() reports it
        return TrainConfig(
            images=[layer.source() for layer in layers],
            bands=[] if len(bands) == len(self.band_table.bands) else bands,
            band_names=self.band_table.ticked_names() if self.band_table.names_changed() else [],
            labels=self.labels_arg(labels_file),
            label_field=(self.label_field.currentField() or None) if vector else None,
            ignore_index=None if vector else ignore,
            classes=self.classes or None,
            backbone=self.backbone.currentText(),
            weights=weights,
            tuning=self.tuning.currentData(),
            decoder=self.decoder.currentData(),
            frames=self.frames.value(),
            metadata=self.metadata.isChecked(),
            chip_size=self.chip_size.value() or None,  # 0: automatic
            epochs=self.epochs.value() or None,
            max_time=self.max_time.text().strip() or None,
            batch_size=self.batch_size.value(),
            lr=self.lr.value() or None,
            device=self.device.currentData(),
            out=self.out.filePath().strip(),
            init_from=self.init_from.filePath().strip() or None,
        )

    def validate(self) -> list[str]:
        """Problems with the current choices, each naming the control to change."""
        problems = []
        labels_layer = self.labels.currentLayer()
        if not self.checked_raster_ids():
            problems.append("Choose at least one input raster.")
        if self.band_table.bands and not self.checked_bands():
            problems.append("Tick at least one band under Bands.")
        names = self.band_table.ticked_names()
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            problems.append(f"Band names must differ; under Bands, {', '.join(doubled)} is used twice.")
        # the engine reads the file: edits not saved are not in it (a layer copied for the engine
        # takes its features from QGIS, edits included)
        if isinstance(labels_layer, QgsVectorLayer) and labels_layer.isModified() and not needs_copy(labels_layer):
            problems.append(f"The labels layer '{labels_layer.name()}' has unsaved edits: save them (Layer ▸ Save "
                            "Layer Edits) so that training uses them.")
        if isinstance(labels_layer, QgsVectorLayer) and not self.label_field.currentField():
            problems.append(f"Choose the Class field of the polygon labels '{labels_layer.name()}'.")
        if isinstance(labels_layer, QgsRasterLayer):
            try:
                ignore_index(labels_layer, self.explicit_ignore())
            except LabelsError as exc:
                problems.append(str(exc))
        if labels_layer is not None and labels_layer.id() in self.checked_raster_ids():
            problems.append("The labels layer cannot also be an input raster.")
        if self.weights.currentData() == "file" and not self.weights_file.filePath():
            problems.append("Choose the Weights file.")
        try:
            config = self.config()
        except LayerError as exc:
            problems.append(str(exc))
            config = None
        if config is not None:
            copied = config.labels.startswith(LABELS_COPY.split("{")[0])  # written by the task
            problems += [p for p in validate_train(config, choices(self.tuning), choices(self.decoder))
                         if p not in problems and not (copied and p.startswith("Labels not found"))]
            problems += grid_problems(config.images)
            layers = self.checked_rasters()
            if layers and config.chip_size:
                smallest = min(min(layer.width(), layer.height()) for layer in layers)
                if config.chip_size > smallest:
                    problems.append(f"Chip size {config.chip_size} px is larger than the raster "
                                    f"({smallest} px); choose at most {smallest}.")
            if isinstance(labels_layer, QgsRasterLayer) and config.images:
                problems += [p.replace(" is not on the same grid", " (labels) is not on the same grid")
                             for p in grid_problems([config.images[0], labels_layer.source()])]
        unique = list(dict.fromkeys(problems))
        show_problems(self.bar, self.messages, "Cannot start training", unique)
        return unique

    def command(self, labels_file: str | None = None) -> list[str]:
        """The engine command for the current choices (after validation)."""
        return train_args(self.config(labels_file))

    def labels_writer(self, path: str):
        """before(task) for the EngineTask: the labels layer copied to ``path`` on the worker
        thread (its features are taken here, on the UI thread: cheap); the folder is the task's
        to remove."""
        copy = LayerCopy(self.labels.currentLayer())

        def before(task) -> None:  # worker thread
            try:
                count = copy.write(path, task.isCanceled)
            except LayerError as exc:
                raise EngineError(f"{exc}. Save the labels as a GeoPackage and choose that "
                                  "layer, then train again.") from None
            task.logLine.emit(f"Labels: {count} features of '{copy.name}' copied to {path}")
        return before

    # -- running -------------------------------------------------------------------------------
    def start(self) -> EngineTask | None:
        if self.task is not None:
            return None
        if self.validate():
            return None
        copy_to = temp_copy_path() if needs_copy(self.labels.currentLayer()) else None
        args = train_args(self._with_previews(self.config(copy_to)))
        self.metrics.setText("")  # nothing of the previous run stays on screen
        self.chart.clear()
        self.progress.setValue(0)
        self.messages.clear()
        self.bar.clearWidgets()
        self.messages.start_log("<engine python> -m engine " + " ".join(args))
        log("Train: <engine python> -m engine " + " ".join(args))
        mapper = ProgressMapper("train")
        self.task = EngineTask("GeoPEFT: training", settings.engine_python(), args,
                               progress=mapper.percent,
                               before=self.labels_writer(copy_to) if copy_to else None)
        if copy_to:
            self.task.temp_dirs.append(os.path.dirname(copy_to))  # removed when the task ends
        self._mapper = mapper
        self._metrics: dict[str, float] = {}
        self.task.engineEvent.connect(self._on_event)
        self.task.logLine.connect(self.messages.add_log)
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

    def _update_resume(self) -> None:
        """Offer Resume when the Output folder holds a cancelled run's resume checkpoint."""
        info = resume_info(self.out.filePath().strip())
        self.resume_button.setVisible(self.task is None and info is not None)
        if info is not None:
            self.resume_button.setToolTip(
                f"Continue the cancelled training in this folder: {info.get('epochs_done')} of "
                f"{info.get('epochs')} epochs are done; it goes on with the settings it started with.")

    def resume(self) -> EngineTask | None:
        """Continue the cancelled run in the Output folder (``train --resume``), whatever the
        dialog's other choices: the run keeps the ones it started with."""
        folder = self.out.filePath().strip()
        if self.task is not None or resume_info(folder) is None:
            return None
        args = ["train", "--resume", folder]
        self._drop_previews()  # a resumed run previews nothing
        self.metrics.setText("")
        self.chart.clear()
        self.progress.setValue(0)
        self.messages.clear()
        self.bar.clearWidgets()
        self.messages.start_log("<engine python> -m engine " + " ".join(args))
        log("Train (resume): <engine python> -m engine " + " ".join(args))
        self._mapper = ProgressMapper("train")
        self._metrics = {}
        self.task = EngineTask("GeoPEFT: resuming training", settings.engine_python(), args,
                               progress=self._mapper.percent)
        self.task.engineEvent.connect(self._on_event)
        self.task.logLine.connect(self.messages.add_log)
        self.task.ended.connect(self._on_completed)
        self._set_running(True)
        self.status.setText("Resuming the cancelled training…")
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def _set_running(self, running: bool) -> None:
        self.train_button.setEnabled(not running)
        self._update_resume()
        self.cancel_button.setEnabled(running)
        self.continue_button.setVisible(not running and bool(self._last_model))
        self.preview_now.setEnabled(running and self._preview_dir is not None)
        for widget in (self.rasters, self.band_table, self.labels, self.label_field, self.use_ignore,
                       self.ignore_value, self.class_table, self.backbone, self.weights, self.tuning,
                       self.decoder, self.chip_size, self.epochs, self.max_time, self.batch_size,
                       self.lr, self.device, self.out, self.init_from, self.preview_on, self.preview_every,
                       self.new_labels_button):
            widget.setEnabled(not running)
        if not running:
            self.weights_file.setEnabled(self.weights.currentData() == "file")
            self.preview_every.setEnabled(self.preview_on.isChecked())
            self._labels_changed(self.labels.currentLayer())
            self._init_from_changed()

    # -- continue training from a model ----------------------------------------------------------
    def _init_from_changed(self) -> None:
        """With a model to continue from, its choices are the run's: shown, and not editable."""
        folder = self.init_from.filePath().strip()
        card = read_card(folder) if folder else None
        inherited = (self.backbone, self.weights, self.weights_file, self.tuning, self.decoder, self.chip_size)
        for widget in inherited:
            widget.setEnabled(card is None and self.task is None)
        if card is None:
            if self.task is None:
                self.weights_file.setEnabled(self.weights.currentData() == "file")
            self.init_note.setVisible(bool(folder))
            self.init_note.setText(f"{folder} is not a trained model folder (it has no card.json)." if folder else "")
            return
        index = self.backbone.findText(card.get("backbone", {}).get("name", ""))
        if index >= 0:
            self.backbone.setCurrentIndex(index)
        for combo, value in ((self.tuning, card.get("tuning", {}).get("method")), (self.decoder, card.get("decoder"))):
            found = combo.findData(value)
            if found >= 0:
                combo.setCurrentIndex(found)
        self.chip_size.setValue(int(card.get("chip_size") or 0))
        training = card.get("training") or {}
        miou = training.get("best_val_miou")
        classes = ", ".join(str(c.get("name")) for c in card.get("classes", []))
        self.init_note.setText(
            f"Continues {os.path.basename(os.path.normpath(folder))}: {card.get('backbone', {}).get('name')} + "
            f"{card.get('decoder')}, {card.get('tuning', {}).get('method')}, classes {classes}"
            + (f"; its validation mIoU {miou:.3f}" if isinstance(miou, (int, float)) else "")
            + ". Its model choices, bands and classes are kept; labels may be new or corrected.")
        self.init_note.setVisible(True)

    def continue_from_last(self) -> None:
        """Set up the next round: continue from the model just written, into a new folder."""
        if not self._last_model:
            return
        self.init_from.setFilePath(self._last_model)
        self._auto_out = self.out.filePath().strip()
        self._suggest_output()
        self.status.setText(f"Next round: training continues from {self._last_model}. Correct or add labels, "
                            "then Train.")

    # -- previews on the map -----------------------------------------------------------------------
    def _preview_extent(self) -> str | None:
        """The map view in the first input raster's CRS, within the raster (None: no map view,
        or it misses the raster: the engine previews the raster's centre)."""
        layers = self.checked_rasters()
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        if not layers or canvas is None or canvas.extent().isEmpty():
            return None
        raster = layers[0]
        transform = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), raster.crs(), QgsProject.instance())
        try:
            box = transform.transformBoundingBox(canvas.extent())
        except Exception:  # noqa: BLE001 - QgsCsException: a view that does not project to the raster's CRS
            return None
        box = box.intersect(raster.extent())
        if box.isEmpty():
            return None
        return aoi_box(box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())

    def _with_previews(self, config: TrainConfig) -> TrainConfig:
        """The run's configuration with the preview options (a fresh temporary folder)."""
        self._drop_previews()
        self._preview_dir = tempfile.mkdtemp(prefix="geopeft-preview-")
        return replace(config, preview_dir=self._preview_dir,
                       preview_every=self.preview_every.value() if self.preview_on.isChecked() else 0,
                       preview_extent=self._preview_extent(),
                       preview_request=os.path.join(self._preview_dir, "request.json"))

    def request_preview(self) -> None:
        """Ask the running engine for a preview of the current map view (after its current batch)."""
        if self.task is None or self._preview_dir is None:
            return
        request = os.path.join(self._preview_dir, "request.json")
        tmp = request + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"extent": self._preview_extent()}, f)
        os.replace(tmp, request)  # the engine never reads half a request
        self.status.setText("Preview asked for: it comes after the current training step.")

    def _drop_previews(self) -> None:
        """The previous run's preview layer and files."""
        self.preview.remove()
        if self._preview_dir:
            shutil.rmtree(self._preview_dir, ignore_errors=True)
        self._preview_dir = None

    def _show_preview(self, event: dict) -> None:
        layer = self.preview.show(event["path"], event.get("classes") or self.classes,
                                  f"epoch {event.get('epoch')}")
        if layer is None:
            self.messages.add_log(f"Preview {event['path']} could not be loaded.")
        else:  # a picture of the model, never its input or labels
            self.labels.setExceptedLayerList([layer])

    def _on_event(self, event: dict) -> None:
        kind = event["event"]
        percent = self._mapper.percent(event)
        if percent is not None:
            self.progress.setValue(int(percent))
        if kind == "artifact" and event.get("kind") == "preview":
            self._show_preview(event)
        if kind == "progress":
            if event.get("stage") == "train":
                parts = []
                if event.get("epoch") is not None:
                    parts.append(f"Epoch {event['epoch']}")
                if event.get("total"):
                    parts.append(f"step {event['step']}/{event['total']}")
                if isinstance(event.get("loss"), (int, float)):
                    parts.append(f"loss {event['loss']:.4f}")
                left = time_left(event)
                if left:
                    parts.append(left)
                self.status.setText(" · ".join(parts) or "Training…")
            else:
                self.status.setText(event.get("message") or f"{event.get('stage', '').capitalize()}…")
        elif kind == "metric":
            self.chart.on_event(event)
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
            message = event.get("message", "")
            log(message, Qgis.MessageLevel.Warning)
            self.bar.pushMessage("Engine", message.split("\n")[0], message,
                                 Qgis.MessageLevel.Warning, 8)
            shown = self.messages.text.toPlainText()
            self.messages.show_text((shown + "\n" if shown else "") + "Warning: " + message)

    def _on_completed(self, task: EngineTask) -> None:
        self.task = None
        self._set_running(False)
        if task.error is not None:
            self.progress.setValue(0)
            self.status.setText("Training failed.")
            show_error(self.iface, self.bar, self.messages, task.error)
            return
        result = task.result
        out = (result.done.get("out") if result else None) or self.out.filePath()
        miou = result.done.get("best_val_miou") if result else None
        done = result.done if result else {}
        if task.cancelled and not done.get("finished_before_cancel"):
            written = os.path.isfile(os.path.join(out, "card.json"))
            text = (f"Training cancelled; the best model so far is in {out}." if written else
                    "Training cancelled before the first epoch ended; nothing was kept.")
            info = resume_info(self.out.filePath().strip())  # Resume is offered (_set_running)
            if info is not None:
                text += (f" {info.get('epochs_done')} of {info.get('epochs')} epochs are saved: "
                         "Resume continues the training.")
            self.status.setText(text)
            self.bar.pushMessage("GeoPEFT", text, Qgis.MessageLevel.Info, 10)
            return
        self.progress.setValue(100)
        text = f"Model saved to {out}" + (f" (best validation mIoU {miou:.3f})"
                                          if isinstance(miou, (int, float)) else "")
        if done.get("finished_before_cancel"):
            text = "Training finished before the cancel arrived: the model is complete. " + text
        self.status.setText(text)
        self.bar.pushMessage("GeoPEFT", text, Qgis.MessageLevel.Success, 0)
        if self.iface is not None:
            self.iface.messageBar().pushMessage("GeoPEFT", text, Qgis.MessageLevel.Success, 10)
        log(text)
        self._last_model = out
        self.continue_button.setVisible(True)
        self._auto_out = self.out.filePath().strip()  # the next run gets a new folder
        self._suggest_output()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        # the task keeps running in QGIS's task manager (with its own cancel button); the preview
        # layer stays on the map until the next run
        super().closeEvent(event)


def resume_info(folder: str) -> dict | None:
    """resume.json of a cancelled run's model folder that can resume (it has resume.ckpt), else None."""
    if not folder or not os.path.isfile(os.path.join(folder, "resume.ckpt")):
        return None
    try:
        with open(os.path.join(folder, "resume.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def set_choices(combo: QComboBox, values, labels: dict[str, str]) -> None:
    """Fill ``combo`` with ``values`` (item data) under their labels, keeping the current choice."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for value in values:
        combo.addItem(labels.get(value, value), value)
    combo.blockSignals(False)
    index = combo.findData(current)
    combo.setCurrentIndex(index if index >= 0 else 0)


def choices(combo: QComboBox) -> list[str]:
    return [combo.itemData(i) for i in range(combo.count())]
