"""geopeft:train — fine-tune a foundation model on labelled rasters."""
from __future__ import annotations

import json
import os

from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from ..core.commands import (BACKBONES, DECODER_LABELS, DECODERS, DEVICES, TUNING_LABELS,
                             TUNING_METHODS, TrainConfig, parse_bands, train_args, validate_train)
from ..core.rasterinfo import grid_problems
from ..labels import raster_label_classes
from ..styling import classes_from_vector_layer, normalise_classes
from .base import EngineAlgorithm, layer_path
from .label_params import add_label_parameters, label_choice


class TrainAlgorithm(EngineAlgorithm):
    INPUT = "INPUT"
    BANDS = "BANDS"
    BAND_NAMES = "BAND_NAMES"
    CLASSES = "CLASSES"
    BACKBONE = "BACKBONE"
    PRETRAINED = "PRETRAINED"
    WEIGHTS = "WEIGHTS"
    TUNING = "TUNING"
    DECODER = "DECODER"
    CHIP_SIZE = "CHIP_SIZE"
    EPOCHS = "EPOCHS"
    MAX_TIME = "MAX_TIME"
    BATCH_SIZE = "BATCH_SIZE"
    LEARNING_RATE = "LEARNING_RATE"
    DEVICE = "DEVICE"
    SEED = "SEED"
    BACKBONE_NAME = "BACKBONE_NAME"
    FRAMES = "FRAMES"
    METADATA = "METADATA"
    DATES = "DATES"
    OUTPUT = "OUTPUT"
    CARD = "CARD"
    BEST_VAL_MIOU = "BEST_VAL_MIOU"
    EPOCHS_DONE = "EPOCHS_DONE"

    command = "train"

    def name(self) -> str:
        return "train"

    def displayName(self) -> str:
        return self.tr("Train segmentation model")

    def shortHelpString(self) -> str:
        return self.tr(
            "Fine-tunes a geospatial foundation model (Prithvi) for semantic segmentation with "
            "LoRA or another parameter-efficient method, in the separate GeoPEFT engine "
            "environment.\n\n"
            "<b>Input rasters</b>: one or more rasters on the same grid; their bands are "
            "stacked in order. <b>Bands</b>: optional comma-separated 1-based band numbers of "
            "the stack (empty: all). <b>Band names</b>: optional names of those bands, "
            "comma-separated (empty: the band descriptions); bands named like the model's "
            "pretrained bands (e.g. BLUE or B02) start from its pretrained weights.\n\n"
            "<b>Labels</b>: a class raster (LABELS), or a polygon layer (LABEL_POLYGONS) with "
            "a class field (LABEL_FIELD); class names and colours come from the raster's "
            "palette, the field values or the layer's categorized style, or from <b>Classes</b> "
            "(JSON: [{\"value\": 1, \"name\": \"water\", \"colour\": \"#1f78b4\"}]). "
            "<b>Ignore value</b>: a label value meaning \"no label\"; empty: the raster's "
            "no-data values, including one set in QGIS (Layer Properties ▸ Transparency).\n\n"
            "<b>Tuning method</b>, <b>Decoder</b>, <b>Chip size</b>, <b>Epochs</b> and "
            "<b>Learning rate</b> are chosen by the engine unless set: tuning auto is LoRA on "
            "pretrained weights and full fine-tuning on random ones; decoder auto is a light "
            "linear head for linear-probe and a UNet otherwise; the chip size follows the "
            "extent of the labels (a set size is a multiple of the model's patch size); the "
            "learning rate follows the tuning method. Training stops at the epochs or the time "
            "budget, whichever comes first.\n\n"
            "<b>Output</b>: a model folder (card.json + adapter.safetensors) for the Predict "
            "and Export ONNX algorithms. Cancelling keeps the best weights validated so far; "
            "a run cancelled before its first validation leaves nothing behind.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.INPUT, self.tr("Input rasters (same grid)"), QgsProcessing.SourceType.TypeRaster))
        self.addParameter(QgsProcessingParameterString(
            self.BANDS, self.tr("Bands (e.g. 1,2,3,4,5,6; empty: all)"), optional=True,
            defaultValue=""))
        self.addParameter(QgsProcessingParameterString(
            self.BAND_NAMES, self.tr("Band names (e.g. B02,B03,B04; empty: band descriptions)"),
            optional=True, defaultValue=""))
        add_label_parameters(self, self.tr("Labels"))
        self.addParameter(QgsProcessingParameterEnum(
            self.BACKBONE, self.tr("Foundation model"), options=list(BACKBONES), defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum(
            self.TUNING, self.tr("Tuning method"),
            options=[TUNING_LABELS.get(m, m) for m in TUNING_METHODS],
            defaultValue=TUNING_METHODS.index("auto")))
        self.addParameter(QgsProcessingParameterNumber(
            self.CHIP_SIZE, self.tr("Chip size (pixels; empty: automatic, from the labelled area)"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=14, maxValue=4096))
        self.addParameter(QgsProcessingParameterNumber(
            self.EPOCHS, self.tr("Epochs (empty: the engine's default)"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=10000))
        advanced = [
            QgsProcessingParameterBoolean(
                self.PRETRAINED, self.tr("Start from pretrained weights (off: random, for tests)"),
                defaultValue=True),
            QgsProcessingParameterFile(
                self.WEIGHTS, self.tr("Weights file (empty: download/cache automatically)"),
                optional=True, fileFilter="Weights (*.pt *.pth *.safetensors *.ckpt *.bin)"),
            QgsProcessingParameterString(
                self.CLASSES, self.tr("Classes (JSON list of value, name, colour; empty: from "
                                      "the labels)"), optional=True, multiLine=True),
            QgsProcessingParameterEnum(
                self.DECODER, self.tr("Decoder"), options=[DECODER_LABELS.get(d, d) for d in DECODERS],
                defaultValue=DECODERS.index("auto")),
            QgsProcessingParameterString(
                self.MAX_TIME, self.tr("Time budget (e.g. 90s, 5m, 1h; empty: none)"),
                optional=True, defaultValue=""),
            QgsProcessingParameterNumber(
                self.BATCH_SIZE, self.tr("Batch size"), QgsProcessingParameterNumber.Type.Integer,
                defaultValue=8, minValue=1, maxValue=1024),
            QgsProcessingParameterNumber(
                self.LEARNING_RATE, self.tr("Learning rate (empty: automatic, by tuning method)"),
                QgsProcessingParameterNumber.Type.Double, optional=True, minValue=1e-7, maxValue=1.0),
            QgsProcessingParameterEnum(
                self.DEVICE, self.tr("Device"), options=list(DEVICES), defaultValue=0),
            QgsProcessingParameterNumber(
                self.SEED, self.tr("Random seed"), QgsProcessingParameterNumber.Type.Integer,
                optional=True, minValue=0),
            QgsProcessingParameterString(
                self.BACKBONE_NAME, self.tr("Other foundation model, overriding the list (e.g. "
                                            "timm:vit_small_patch16_224)"), optional=True, defaultValue=""),
            QgsProcessingParameterNumber(
                self.FRAMES, self.tr("Dates in the input rasters (one raster per date, the same bands each)"),
                QgsProcessingParameterNumber.Type.Integer, defaultValue=1, minValue=1, maxValue=64),
            QgsProcessingParameterBoolean(
                self.METADATA, self.tr("Give -TL models the acquisition dates and scene location"),
                defaultValue=False),
            QgsProcessingParameterString(
                self.DATES, self.tr("Acquisition dates, YYYY-MM-DD per date, comma-separated (empty: from "
                                    "the rasters' metadata)"), optional=True, defaultValue=""),
        ]
        for param in advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterFolderDestination(
            self.OUTPUT, self.tr("Trained model folder")))
        self.addOutput(QgsProcessingOutputFile(self.CARD, self.tr("Model card (card.json)")))
        self.addOutput(QgsProcessingOutputNumber(self.BEST_VAL_MIOU, self.tr("Best validation mIoU")))
        self.addOutput(QgsProcessingOutputNumber(self.EPOCHS_DONE, self.tr("Epochs trained")))

    def config(self, parameters, context, feedback) -> TrainConfig:
        """Parameters -> TrainConfig (QgsProcessingException for anything the user must fix)."""
        layers = self.parameterAsLayerList(parameters, self.INPUT, context)
        images = [layer_path(layer) for layer in layers]
        if not layers or None in images:
            raise QgsProcessingException(self.tr("Choose one or more file-based input rasters."))
        bands = parse_bands(self.parameterAsString(parameters, self.BANDS, context))
        if bands is None:
            raise QgsProcessingException(self.tr("Bands must be comma-separated band numbers, e.g. 1,2,3."))
        band_count = sum(layer.bandCount() for layer in layers)
        if any(b > band_count for b in bands):
            raise QgsProcessingException(self.tr("The input rasters have {} bands; band {} does "
                                                 "not exist.").format(band_count, max(bands)))
        names = [n.strip() for n in self.parameterAsString(parameters, self.BAND_NAMES, context)
                 .split(",") if n.strip()]
        if names and len(names) != (len(bands) or band_count):
            raise QgsProcessingException(self.tr(
                "Band names (BAND_NAMES) gives {} names for {} bands; give one name per selected "
                "band.").format(len(names), len(bands) or band_count))
        labels = label_choice(self, parameters, context, feedback)
        classes = self.classes(parameters, context, labels)
        if classes:
            feedback.pushInfo(self.tr("Classes: {}").format(
                ", ".join(f"{c['value']}={c['name']}" for c in classes)))
        pretrained = self.parameterAsBoolean(parameters, self.PRETRAINED, context)
        weights = self.parameterAsFile(parameters, self.WEIGHTS, context)
        max_time = self.parameterAsString(parameters, self.MAX_TIME, context).strip() or None
        other = self.parameterAsString(parameters, self.BACKBONE_NAME, context).strip()
        dates = [d.strip() for d in self.parameterAsString(parameters, self.DATES, context).split(",") if d.strip()]
        return TrainConfig(
            images=images, bands=bands, band_names=names,
            labels=labels.path, label_field=labels.field, ignore_index=labels.ignore_index,
            classes=classes,
            backbone=other or BACKBONES[self.parameterAsEnum(parameters, self.BACKBONE, context)],
            frames=self.parameterAsInt(parameters, self.FRAMES, context),
            metadata=self.parameterAsBoolean(parameters, self.METADATA, context), dates=dates,
            weights=weights if pretrained and weights else ("auto" if pretrained else "none"),
            tuning=TUNING_METHODS[self.parameterAsEnum(parameters, self.TUNING, context)],
            decoder=DECODERS[self.parameterAsEnum(parameters, self.DECODER, context)],
            chip_size=self.optional_number(parameters, self.CHIP_SIZE, context, self.parameterAsInt),
            epochs=self.optional_number(parameters, self.EPOCHS, context, self.parameterAsInt),
            max_time=max_time,
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            lr=self.optional_number(parameters, self.LEARNING_RATE, context, self.parameterAsDouble),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            seed=self.optional_number(parameters, self.SEED, context, self.parameterAsInt),
            out=self.parameterAsString(parameters, self.OUTPUT, context),
        )

    @staticmethod
    def optional_number(parameters, name, context, read):
        """An optional number parameter: None when not set (the engine then decides)."""
        value = parameters.get(name)
        unset = value is None or value == "" or getattr(value, "isNull", lambda: False)()  # NULL
        return None if unset else read(parameters, name, context)

    def classes(self, parameters, context, labels) -> list[dict]:
        """CLASSES when given, else the classes of the labels layer."""
        text = self.parameterAsString(parameters, self.CLASSES, context).strip()
        if text:
            try:
                return normalise_classes(json.loads(text))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise QgsProcessingException(self.tr(
                    "Classes (CLASSES) is not a JSON list like [{{\"value\": 1, \"name\": "
                    "\"water\", \"colour\": \"#1f78b4\"}}]: {}").format(exc)) from None
        if labels.is_raster:
            return [{k: c[k] for k in ("value", "name", "colour")}
                    for c in raster_label_classes(labels.layer, labels.ignore_index)]
        return classes_from_vector_layer(labels.layer, labels.field)

    def processAlgorithm(self, parameters, context, feedback):
        config = self.config(parameters, context, feedback)
        problems = validate_train(config) + grid_problems(config.images)
        if problems:
            raise QgsProcessingException("\n".join(problems))
        result = self.run_engine_command(train_args(config), feedback)
        summary = result.done
        card = result.artifact("card")
        model = result.artifact("model")
        out = summary.get("out") or (model or {}).get("path") or config.out
        if result.cancelled and not os.path.isfile(os.path.join(out, "card.json")):
            feedback.reportError(self.tr("Training was cancelled before the first validation: "
                                         "no model was written."), fatalError=False)
            return {self.OUTPUT: None, self.CARD: None, self.BEST_VAL_MIOU: None,
                    self.EPOCHS_DONE: summary.get("epochs")}
        return {
            self.OUTPUT: out,
            self.CARD: (card or {}).get("path") or os.path.join(out, "card.json"),
            self.BEST_VAL_MIOU: summary.get("best_val_miou"),
            self.EPOCHS_DONE: summary.get("epochs"),
        }
