"""The Predict dialog: raster + model -> class raster (styled), probabilities, uncertainty,
class polygons and the most uncertain areas, all written by the engine and added to the map
styled; the dialog then steps the map through the uncertain areas (where to label next)."""
from __future__ import annotations

import os

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsUnitTypes,
    QgsVectorLayer,
    QgsVectorLayerFeatureSource,
)
from qgis.gui import QgsDoubleSpinBox, QgsFileWidget, QgsMapLayerComboBox, QgsMessageBar
from qgis.PyQt.QtCore import QSize, Qt, QUrl
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .. import settings
from ..aoi import AoiError, extent_aoi, overlaps, remove_temp, temp_aoi_path, write_polygons
from ..core.bands import ModelsInfo, cached_models_info
from ..core.commands import DEVICES, PredictConfig, predict_args, read_card, validate_predict
from ..core.engine_client import EngineError
from ..layers import layer_path
from ..core.rasterinfo import band_descriptions, grid_problems
from ..icons import icon
from ..processing.base import ProgressMapper
from ..styling import (AREAS_RANK_FIELD, classes_from_raster_file, normalise_classes, save_areas_style,
                       save_polygon_style, style_polygons, style_prediction, style_uncertain_areas,
                       style_uncertainty)
from .defaults import default_layers, results_folder
from .engine_info import request_models_info
from .messages import MessagePanel, show_error, show_problems
from .task import EngineTask, log
from .train_dialog import DEVICE_LABELS


BAND_NUMBER = Qt.ItemDataRole.UserRole
# "Area": where to predict (the engine's --aoi / --mask)
AREA_MARGIN = 1.2  # the map shows an uncertain area with a fifth of a square around it
AREAS = (("all", "Whole raster"),
         ("canvas", "Current map view"),
         ("polygons", "Inside the polygons of a layer"),
         ("mask", "Where a mask raster is non-zero"))


class PredictDialog(QDialog):
    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.task: EngineTask | None = None
        self.added_layers: list = []
        self.card: dict | None = None
        self.areas: list[dict] = []  # the uncertain areas of the last run, by rank (see set_areas)
        self.area_index = -1
        self._areas_crs = None
        self._areas_layer_id = None
        self.setWindowTitle("GeoPEFT — Predict classes")
        self.setWindowIcon(icon("predict.svg"))
        self._build()
        self._models_task = request_models_info(lambda info, error: self._update_bands())

    def _build(self) -> None:
        self.bar = QgsMessageBar(self)
        self.bar.setSizePolicy(QSizePolicy.Policy.Minimum, QSizePolicy.Policy.Fixed)

        inputs = QGroupBox("Input")
        form = QFormLayout(inputs)
        self.raster = QgsMapLayerComboBox()
        self.raster.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.raster.layerChanged.connect(self._raster_changed)
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
        form.addRow("Area", self._build_area())

        self.band_group = QGroupBox("Bands")
        bands = QVBoxLayout(self.band_group)
        self.band_info = QLabel("Choose a model: its card says which bands it needs.")
        self.band_info.setWordWrap(True)
        self.band_choice = QTableWidget(0, 2)
        self.band_choice.setHorizontalHeaderLabels(["Model band", "Band of the raster"])
        self.band_choice.verticalHeader().setVisible(False)
        self.band_choice.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.band_choice.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.band_choice.verticalHeader().setDefaultSectionSize(26)
        self.band_choice.setMaximumHeight(190)
        bands.addWidget(self.band_info)
        bands.addWidget(self.band_choice)

        outputs = QGroupBox("Outputs")
        oform = QFormLayout(outputs)
        self.out = save_file_widget("GeoTIFF (*.tif)")
        oform.addRow("Classes raster", self.out)
        self.want_probabilities, self.probabilities = optional_output(
            oform, "Class probabilities", "GeoTIFF (*.tif)",
            "Per pixel, the probability of each class (percent), one band per class.")
        self.want_uncertainty, self.uncertainty = optional_output(
            oform, "Uncertainty (where to label next)", "GeoTIFF (*.tif)",
            "Per pixel, how unsure the model is (0-100: normalised entropy of the class "
            "probabilities). Label the dark red places next and train again.")
        self.want_areas, self.areas_path = optional_output(
            oform, "List the most uncertain areas (where to label next)", "GeoPackage (*.gpkg)",
            "The squares (the model's chip size) where the model is least sure on average, most "
            "uncertain first: outlined and numbered on the map, and the dialog steps the map "
            "through them. Needs the uncertainty raster.")
        self.area_count = QSpinBox()
        self.area_count.setRange(1, 1000)
        self.area_count.setValue(10)
        self.area_count.setSuffix(" areas")
        self.area_count.setToolTip("How many of the most uncertain squares to list.")
        self.area_count.setEnabled(False)
        oform.addRow("Number of areas", self.area_count)
        self.want_areas.toggled.connect(self.area_count.setEnabled)
        # the areas come from the uncertainty: ticking them ticks it, unticking it unticks them
        self.want_areas.toggled.connect(lambda on: on and self.want_uncertainty.setChecked(True))
        self.want_uncertainty.toggled.connect(lambda on: on or self.want_areas.setChecked(False))
        self.want_polygons, self.polygons = optional_output(
            oform, "Polygons (GeoPackage)", "GeoPackage (*.gpkg)",
            "The classes as polygons: fields class_value, class_name, area; styled by class.")
        self.min_area = QgsDoubleSpinBox()
        self.min_area.setRange(0, 1e12)
        self.min_area.setDecimals(1)
        self.min_area.setClearValue(0)
        self.min_area.setSpecialValueText("keep all")
        self.min_area.setToolTip("Drop polygons smaller than this area (in the raster's CRS "
                                 "units squared); 0 keeps every region.")
        self.min_area.setEnabled(False)
        oform.addRow("Minimum area", self.min_area)
        self.want_polygons.toggled.connect(self.min_area.setEnabled)
        self.device = QComboBox()
        for device in DEVICES:
            self.device.addItem(DEVICE_LABELS[device], device)
        oform.addRow("Device", self.device)

        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.status.setOpenExternalLinks(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.area_steps = QWidget()
        steps = QHBoxLayout(self.area_steps)
        steps.setContentsMargins(0, 0, 0, 0)
        self.previous_area = QPushButton("◀ Previous")
        self.previous_area.setToolTip("Zoom the map to the previous uncertain area")
        self.next_area = QPushButton("Next uncertain area ▶")
        self.next_area.setToolTip("Zoom the map to the next uncertain area (most uncertain first)")
        self.area_label = QLabel("")
        self.previous_area.clicked.connect(lambda: self.step_area(-1))
        self.next_area.clicked.connect(lambda: self.step_area(1))
        steps.addWidget(self.previous_area)
        steps.addWidget(self.next_area)
        steps.addWidget(self.area_label, 1)
        self.area_steps.setVisible(False)
        self.messages = MessagePanel(self.iface, self)
        self.buttons = QDialogButtonBox()
        self.run_button = QPushButton(icon("predict.svg"), "Predict")
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.buttons.addButton(self.run_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.buttons.addButton(self.cancel_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.buttons.addButton(self.messages.log_button, QDialogButtonBox.ButtonRole.HelpRole)
        self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(self.bar)
        layout.addWidget(inputs)
        layout.addWidget(self.band_group)
        layout.addWidget(outputs)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.area_steps)
        layout.addWidget(self.messages)
        layout.addWidget(self.buttons)
        self.resize(QSize(660, 780))
        image, _labels = default_layers()  # the topmost multi-band raster: an image, not labels
        if image is not None:
            self.raster.setLayer(image)
        self._raster_changed(self.raster.currentLayer())

    def _build_area(self) -> QWidget:
        """Area: a choice, and under it the polygon layer (+ selected only) or the mask raster."""
        box = QWidget()
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 0, 0, 0)
        self.area = QComboBox()
        for key, text in AREAS:
            self.area.addItem(text, key)
        self.area.setToolTip("Predict only part of the raster: pixels outside are nodata, and "
                             "the parts outside are not computed (faster).")
        self.area_polygons = QWidget()
        row = QHBoxLayout(self.area_polygons)
        row.setContentsMargins(0, 0, 0, 0)
        self.aoi_layer = QgsMapLayerComboBox()
        self.aoi_layer.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.aoi_layer.setToolTip("A polygon layer of the project, in any CRS: pixels whose "
                                  "centre is inside a polygon are predicted.")
        self.aoi_selected = QCheckBox("Selected features only")
        row.addWidget(self.aoi_layer, 1)
        row.addWidget(self.aoi_selected)
        self.mask_layer = QgsMapLayerComboBox()
        self.mask_layer.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.mask_layer.setToolTip("A raster on exactly the input's grid; band 1 non-zero = "
                                   "predict, 0 or nodata = skip.")
        self.area_note = QLabel("")
        self.area_note.setWordWrap(True)
        for widget in (self.area, self.area_polygons, self.mask_layer, self.area_note):
            layout.addWidget(widget)
        self.area.currentIndexChanged.connect(self._area_changed)
        self._area_changed()
        return box

    def _area_changed(self, *_args) -> None:
        area = self.area.currentData()
        self.area_polygons.setVisible(area == "polygons")
        self.mask_layer.setVisible(area == "mask")
        notes = {"canvas": "The extent of the map view when you press Predict (in the map's CRS).",
                 "mask": "Same grid as the raster (size, pixel size, origin, CRS)."}
        self.area_note.setText(notes.get(area, ""))
        self.area_note.setVisible(area in notes)

    # -- choices -------------------------------------------------------------------------------
    def _choose_model_folder(self) -> None:
        from qgis.PyQt.QtWidgets import QFileDialog
        folder = QFileDialog.getExistingDirectory(self, "Trained model folder")
        if folder:
            self.model.setFilePath(folder)

    def _model_changed(self, path: str) -> None:
        self.card = read_card(path)
        self.model_info.setText(describe_model(path))
        self._update_bands()

    def _raster_changed(self, layer) -> None:
        self._suggest_output(layer)
        self._update_bands()
        units = QgsUnitTypes.toAbbreviatedString(layer.crs().mapUnits()) if layer is not None else ""
        self.min_area.setSuffix(f" {units}²" if units else "")
        # areas in degrees² are tiny: room for them on a geographic CRS
        self.min_area.setDecimals(10 if layer is not None and layer.crs().isGeographic() else 1)

    def _suggest_output(self, layer) -> None:
        if layer is None or self.out.filePath():
            return
        folder = results_folder(layer.source())
        stem = os.path.splitext(os.path.basename(layer.source().split("|")[0]))[0]
        base = os.path.join(folder, stem)
        self.out.setFilePath(base + "_classes.tif")
        self.probabilities.setFilePath(base + "_probabilities.tif")
        self.uncertainty.setFilePath(base + "_uncertainty.tif")
        self.polygons.setFilePath(base + "_classes.gpkg")
        self.areas_path.setFilePath(base + "_uncertain_areas.gpkg")

    # -- bands: from the model card, matched by name --------------------------------------------
    def model_bands(self) -> list[str]:
        """The names of the bands the model was trained on ('' where unnamed)."""
        if not self.card:
            return []
        inp = self.card.get("input", {})
        numbers = inp.get("bands") or []
        names = list(inp.get("band_names") or [])
        return names + [""] * (len(numbers) - len(names))

    def _update_bands(self) -> None:
        layer = self.raster.currentLayer()
        wanted = self.model_bands()
        self.band_group.setVisible(bool(self.card))
        self.band_choice.setRowCount(0)
        if not wanted or layer is None:
            return
        names = band_descriptions(layer.source()) or [""] * layer.bandCount()
        info = cached_models_info(settings.engine_python()) or ModelsInfo()
        found = info.find_bands(wanted, names)
        trained_numbers = self.card.get("input", {}).get("bands") or []
        self.band_choice.setRowCount(len(wanted))
        for row, (name, number) in enumerate(zip(wanted, found)):
            fallback = trained_numbers[row] if row < len(trained_numbers) else None
            item = QTableWidgetItem(name or f"band {row + 1}")
            item.setFlags(Qt.ItemFlag.ItemIsEnabled)
            self.band_choice.setItem(row, 0, item)
            combo = QComboBox()
            combo.addItem("— choose —", None)
            for b, description in enumerate(names, start=1):
                combo.addItem(f"{b}: {description or 'Band ' + str(b)}", b)
            choice = number or (fallback if fallback and fallback <= len(names) else None)
            combo.setCurrentIndex(max(combo.findData(choice), 0))
            self.band_choice.setCellWidget(row, 1, combo)
        missing = [n or f"band {i + 1}" for i, (n, f) in enumerate(zip(wanted, found)) if f is None]
        if not missing:
            self.band_info.setText(f"All {len(wanted)} bands of the model found by name in "
                                   f"'{layer.name()}'.")
        else:
            self.band_info.setText(
                f"Not found by name in '{layer.name()}': {', '.join(missing)}. Check the band "
                "chosen for each below (preselected: the band numbers used in training).")

    def chosen_bands(self) -> list[int | None]:
        return [self.band_choice.cellWidget(r, 1).currentData()
                for r in range(self.band_choice.rowCount())]

    def set_band(self, model_band: int, raster_band: int) -> None:
        """Choose ``raster_band`` for the model's ``model_band``-th band (1-based)."""
        combo = self.band_choice.cellWidget(model_band - 1, 1)
        combo.setCurrentIndex(combo.findData(raster_band))

    # -- where to predict ------------------------------------------------------------------------
    def canvas_area(self) -> tuple[str | None, str | None]:
        """(--aoi box of the map view's extent, problem): read now, on the UI thread (cheap)."""
        layer = self.raster.currentLayer()
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        if canvas is None:
            return None, "There is no map view to take the extent from; choose another Area."
        rect, crs = canvas.extent(), canvas.mapSettings().destinationCrs()
        if rect.isEmpty():
            return None, "The map view has no extent yet; choose another Area."
        if layer is None:
            return None, None
        try:
            aoi = extent_aoi(rect, crs, layer.crs(), QgsProject.instance().transformContext())
        except AoiError as exc:
            return None, str(exc)
        if not overlaps(rect, crs, layer):
            return aoi, (f"The map view does not overlap '{layer.name()}': zoom to the raster, or "
                         "choose another Area.")
        return aoi, None

    def area_problems(self) -> list[str]:
        area = self.area.currentData()
        problems = []
        if area == "canvas":
            problem = self.canvas_area()[1]
            problems += [problem] if problem else []
        elif area == "polygons":
            layer = self.aoi_layer.currentLayer()
            if layer is None:
                problems.append("Under Area, choose the polygon layer to predict inside.")
            elif self.aoi_selected.isChecked() and layer.selectedFeatureCount() == 0:
                problems.append(f"No polygons of '{layer.name()}' are selected: select some, or "
                                "untick Selected features only.")
            elif not self.aoi_selected.isChecked() and layer.featureCount() == 0:
                problems.append(f"'{layer.name()}' has no polygons to predict inside.")
        elif area == "mask":
            mask = self.mask_layer.currentLayer()
            image = self.raster.currentLayer()
            if mask is None:
                problems.append("Under Area, choose the mask raster.")
            elif layer_path(mask) is None:
                problems.append(f"The mask '{mask.name()}' must be a raster file (e.g. a GeoTIFF).")
            elif image is not None:
                problems += [p.replace(" is not on the same grid", " (mask) is not on the same grid")
                             for p in grid_problems([image.source(), mask.source()])]
        return problems

    def aoi_writer(self, path: str):
        """before(task) for the EngineTask: the polygon layer's features (the selection only, if
        so chosen) written to ``path`` on the worker thread. The feature source and the ids are
        taken here, on the UI thread (cheap); iterating them is thread-safe."""
        layer = self.aoi_layer.currentLayer()
        source = QgsVectorLayerFeatureSource(layer)
        request = QgsFeatureRequest().setNoAttributes()
        if self.aoi_selected.isChecked():
            request.setFilterFids(layer.selectedFeatureIds())
        crs, name = layer.crs(), layer.name()

        def before(task) -> None:  # worker thread
            try:
                count = write_polygons(source.getFeatures(request), crs, path, name, task.isCanceled)
            except AoiError as exc:
                raise EngineError(str(exc)) from None
            task.logLine.emit(f"Area of interest: {count} polygons of '{name}' written to {path}")
        return before

    # -- config, validation, command -----------------------------------------------------------
    def config(self, aoi_file: str | None = None) -> PredictConfig:
        """The dialog's choices. With Area 'polygons', ``aoi_file``: where the polygons will be
        written (by the task, see ``start``); without it there is no --aoi yet."""
        layer = self.raster.currentLayer()
        chosen = self.chosen_bands()
        polygons = self._optional_path(self.want_polygons, self.polygons)
        area = self.area.currentData()
        aoi = mask = None
        if area == "canvas":
            aoi = self.canvas_area()[0]
        elif area == "polygons":
            aoi = aoi_file
        elif area == "mask" and self.mask_layer.currentLayer() is not None:
            mask = layer_path(self.mask_layer.currentLayer())
        return PredictConfig(
            model=self.model.filePath().strip(),
            images=[layer.source()] if layer is not None else [],
            out=self.out.filePath().strip(),
            probabilities=self._optional_path(self.want_probabilities, self.probabilities),
            uncertainty=self._optional_path(self.want_uncertainty, self.uncertainty),
            polygons=polygons,
            min_area=self.min_area.value() if polygons and self.min_area.value() > 0 else None,
            bands=chosen if chosen and None not in chosen else [],
            device=self.device.currentData(),
            aoi=aoi,
            mask=mask,
            uncertain_areas=self._optional_path(self.want_areas, self.areas_path),
            area_count=self.area_count.value() if self.want_areas.isChecked() else None,
        )

    @staticmethod
    def _optional_path(wanted: QCheckBox, widget: QgsFileWidget) -> str | None:
        return (widget.filePath().strip() or None) if wanted.isChecked() else None

    def validate(self) -> list[str]:
        config = self.config()
        problems = validate_predict(config)
        layer = self.raster.currentLayer()
        unset = [self.band_choice.item(r, 0).text() for r, b in enumerate(self.chosen_bands())
                 if b is None]
        if unset and layer is not None:
            problems.append(f"Under Bands, choose the band of '{layer.name()}' that holds "
                            f"{', '.join(unset)} (the model needs {self.band_choice.rowCount()} "
                            f"bands; the raster has {layer.bandCount()}).")
        for wanted, path, what in ((self.want_probabilities, config.probabilities, "class probabilities"),
                                   (self.want_uncertainty, config.uncertainty, "uncertainty raster"),
                                   (self.want_polygons, config.polygons, "class polygons"),
                                   (self.want_areas, config.uncertain_areas, "uncertain areas")):
            if wanted.isChecked() and not path:
                problems.append(f"Choose where to write the {what}, or untick it.")
        if config.images and layer is not None:
            problems += grid_problems(config.images)
        problems += self.area_problems()
        problems = list(dict.fromkeys(problems))
        show_problems(self.bar, self.messages, "Cannot predict", problems)
        return problems

    def command(self, aoi_file: str | None = None) -> list[str]:
        return predict_args(self.config(aoi_file))

    # -- running -------------------------------------------------------------------------------
    def start(self) -> EngineTask | None:
        if self.task is not None or self.validate():
            return None
        aoi_file = temp_aoi_path() if self.area.currentData() == "polygons" else None
        config = self.config(aoi_file)
        args = predict_args(config)
        self.messages.clear()
        self.bar.clearWidgets()
        self.progress.setValue(0)
        self.set_areas(None)
        self.messages.start_log("<engine python> -m engine " + " ".join(args))
        log("Predict: <engine python> -m engine " + " ".join(args))

        card_classes = normalise_classes((self.card or {}).get("classes"))

        def after(result, task):  # worker thread: file reads and the GeoPackage's default style
            return prediction_results(result, config, card_classes)

        mapper = ProgressMapper("predict")
        self.task = EngineTask("GeoPEFT: prediction", settings.engine_python(), args,
                               progress=mapper.percent, after=after,
                               before=self.aoi_writer(aoi_file) if aoi_file else None,
                               cleanup=(lambda: remove_temp(aoi_file)) if aoi_file else None)
        self._mapper = mapper
        self.task.engineEvent.connect(self._on_event)
        self.task.logLine.connect(self.messages.add_log)
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
            if event.get("stage") == "polygons":
                self.status.setText("Writing the class polygons…")
            elif event.get("stage") == "uncertain_areas":
                self.status.setText("Finding the most uncertain areas…")
            elif event.get("total"):
                self.status.setText(f"Predicting: tile {event['step']}/{event['total']}")
        elif event["event"] == "warning":
            message = event.get("message", "")
            self.bar.pushMessage("Engine", message.split("\n")[0], message,
                                 Qgis.MessageLevel.Warning, 8)
            self.messages.show_text(message)

    def _on_completed(self, task: EngineTask) -> None:
        self.task = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if task.error is not None:
            self.progress.setValue(0)
            self.status.setText("Prediction failed.")
            show_error(self.iface, self.bar, self.messages, task.error)
            return
        if task.cancelled or not task.after_result:
            self.progress.setValue(0)
            self.status.setText("Prediction cancelled; nothing was written.")
            return
        self.progress.setValue(100)
        self.added_layers = add_results(task.after_result)
        self.set_areas(next((x for x in self.added_layers if x.source().split("|")[0]
                             == task.after_result.get("uncertain_areas")), None))
        text = "Classes written to " + file_link(task.after_result["out"])
        self.status.setText(text)
        self.bar.pushMessage("GeoPEFT", text, Qgis.MessageLevel.Success, 10)
        if self.iface is not None:
            self.iface.messageBar().pushMessage("GeoPEFT", text, Qgis.MessageLevel.Success, 0)

    # -- where to label next: stepping through the uncertain areas -------------------------------
    def set_areas(self, layer) -> None:
        """Offer to step through the features of ``layer`` (the engine's uncertain areas), by
        rank; None hides the stepping buttons."""
        self.areas, self.area_index = [], -1
        self._areas_layer_id = layer.id() if layer is not None else None
        self._areas_crs = layer.crs() if layer is not None else None
        if layer is not None:
            for feature in layer.getFeatures():
                self.areas.append({"fid": feature.id(), "rank": feature[AREAS_RANK_FIELD],
                                   "mean": feature["mean_uncertainty"],
                                   "bbox": QgsRectangle(feature.geometry().boundingBox())})
            self.areas.sort(key=lambda a: a["rank"])
        self.area_steps.setVisible(layer is not None)
        self.previous_area.setEnabled(bool(self.areas))
        self.next_area.setEnabled(bool(self.areas))
        if layer is not None and not self.areas:
            self.area_label.setText("No uncertain area: no square is half valid.")
        elif self.areas:
            self.area_label.setText(f"{len(self.areas)} uncertain areas: Next shows the most uncertain.")

    def step_area(self, step: int) -> None:
        """Zoom the map to the next (``step`` 1) or previous (-1) uncertain area, wrapping around."""
        if not self.areas:
            return
        if self.area_index < 0:
            index = 0 if step > 0 else len(self.areas) - 1
        else:
            index = (self.area_index + step) % len(self.areas)
        self.show_area(index)

    def show_area(self, index: int) -> None:
        """Zoom the map canvas to uncertain area ``index`` (0 = the most uncertain), with a margin."""
        self.area_index = index
        area = self.areas[index]
        self.area_label.setText(f"Area {index + 1} of {len(self.areas)}, uncertainty {area['mean']:.0f} %")
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        if canvas is None:
            return
        rect = QgsRectangle(area["bbox"])
        target = canvas.mapSettings().destinationCrs()
        if self._areas_crs is not None and self._areas_crs.isValid() and target.isValid() \
                and target != self._areas_crs:
            transform = QgsCoordinateTransform(self._areas_crs, target, QgsProject.instance())
            try:
                rect = transform.transformBoundingBox(rect)
            except Exception as exc:  # noqa: BLE001 - QgsCsException: cannot be shown in the map's CRS
                self.bar.pushMessage("GeoPEFT", f"Cannot show the area in the map's CRS: {exc}",
                                     Qgis.MessageLevel.Warning, 8)
                return
        rect.scale(AREA_MARGIN)
        canvas.setExtent(rect)
        canvas.refresh()
        layer = QgsProject.instance().mapLayer(self._areas_layer_id) if self._areas_layer_id else None
        if layer is not None:
            canvas.flashFeatureIds(layer, [area["fid"]])


def save_file_widget(file_filter: str) -> QgsFileWidget:
    widget = QgsFileWidget()
    widget.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
    widget.setFilter(file_filter)
    return widget


def optional_output(form: QFormLayout, text: str, file_filter: str, tooltip: str):
    """A ticked-or-not output row: (checkbox, file widget enabled only while ticked)."""
    wanted = QCheckBox(text)
    wanted.setToolTip(tooltip)
    widget = save_file_widget(file_filter)
    widget.setEnabled(False)
    wanted.toggled.connect(widget.setEnabled)
    form.addRow(wanted, widget)
    return wanted, widget


def file_link(path: str) -> str:
    """An HTML link that opens ``path``'s folder (message bars and labels open it)."""
    folder = QUrl.fromLocalFile(os.path.dirname(os.path.abspath(path))).toString()
    return f'<a href="{folder}">{path}</a>'


def prediction_results(result, config: PredictConfig, card_classes: list[dict]) -> dict:
    """The engine's outputs from its ``artifact`` events (the paths asked for where it reported
    none), with the classes: the raster artifact's, else the file's tag, else the model card's.
    Runs on the task's worker thread."""
    def path(kind: str, asked: str | None) -> str | None:
        return (result.artifact(kind) or {}).get("path") or asked

    raster = result.artifact("raster") or {}
    out = raster.get("path") or config.out
    classes = (normalise_classes(raster.get("classes")) or classes_from_raster_file(out)
               or card_classes)
    polygons = path("polygons", config.polygons) if config.polygons else None
    if polygons:
        save_polygon_style(polygons, classes)
    areas = path("uncertain_areas", config.uncertain_areas) if config.uncertain_areas else None
    if areas:
        save_areas_style(areas)
    return {"out": out, "classes": classes, "polygons": polygons,
            "uncertainty": path("uncertainty", config.uncertainty) if config.uncertainty else None,
            "uncertain_areas": areas}


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path.split("|")[0]))[0]


def add_results(results: dict) -> list:
    """Add the results to the project, each styled: the uncertainty (pseudocolour, below), the
    class raster (paletted by class), the polygons (categorized by class) and the uncertain
    areas (outlined squares numbered by rank, on top)."""
    classes = results["classes"]
    added = []
    if results.get("uncertainty"):
        uncertainty = QgsRasterLayer(results["uncertainty"], _stem(results["uncertainty"]))
        if style_uncertainty(uncertainty):
            added.append(uncertainty)
    raster = QgsRasterLayer(results["out"], _stem(results["out"]))
    if raster.isValid():
        style_prediction(raster, classes)
        added.append(raster)
    if results.get("polygons"):
        polygons = QgsVectorLayer(results["polygons"], _stem(results["polygons"]) + " polygons", "ogr")
        if polygons.isValid():
            style_polygons(polygons, classes)
            added.append(polygons)
    if results.get("uncertain_areas"):
        areas = QgsVectorLayer(results["uncertain_areas"], _stem(results["uncertain_areas"]), "ogr")
        if style_uncertain_areas(areas):
            added.append(areas)
    for layer in added:
        QgsProject.instance().addMapLayer(layer)
    return added


def describe_model(path: str) -> str:
    """One line about a model: backbone, tuning, classes and bands from its card."""
    if path.lower().endswith(".onnx") and os.path.isfile(path):
        return "ONNX model (runs with onnxruntime; bands by number, as in training)."
    info = read_card(path)
    if info is None:
        card = os.path.join(path, "card.json") if os.path.isdir(path) else path
        return "card.json could not be read." if card.endswith("card.json") and os.path.isfile(card) else ""
    try:
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
    except (ValueError, AttributeError, TypeError, KeyError):
        return "card.json could not be read."
