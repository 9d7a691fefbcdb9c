"""geopeft:evaluate — compare a predicted class raster with reference labels."""
from __future__ import annotations

import json

from qgis.core import (
    QgsMapLayer,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterRasterLayer,
)

from ..core.commands import EvaluateConfig, evaluate_args
from .base import EngineAlgorithm, labels_parameter, layer_path


class EvaluateAlgorithm(EngineAlgorithm):
    INPUT = "INPUT"
    LABELS = "LABELS"
    LABEL_FIELD = "LABEL_FIELD"
    OUTPUT = "OUTPUT"
    MIOU = "MIOU"
    PIXEL_ACCURACY = "PIXEL_ACCURACY"
    PER_CLASS = "PER_CLASS"

    command = "evaluate"

    def name(self) -> str:
        return "evaluate"

    def displayName(self) -> str:
        return self.tr("Evaluate prediction")

    def shortHelpString(self) -> str:
        return self.tr(
            "Scores a predicted class raster against reference labels (a class raster on the "
            "same grid, or polygons with a class field): mean IoU, pixel accuracy and the IoU of "
            "each class. The metrics are written to a JSON file and returned as outputs "
            "(MIOU, PIXEL_ACCURACY, PER_CLASS as JSON).")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Predicted classes")))
        self.addParameter(labels_parameter(self.LABELS, self.tr("Reference labels (raster or polygons)")))
        self.addParameter(QgsProcessingParameterField(
            self.LABEL_FIELD, self.tr("Class field (polygon labels)"),
            parentLayerParameterName=self.LABELS, optional=True))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, self.tr("Metrics (JSON)"), fileFilter="JSON (*.json)"))
        self.addOutput(QgsProcessingOutputNumber(self.MIOU, self.tr("Mean IoU")))
        self.addOutput(QgsProcessingOutputNumber(self.PIXEL_ACCURACY, self.tr("Pixel accuracy")))
        self.addOutput(QgsProcessingOutputString(self.PER_CLASS, self.tr("Per-class IoU (JSON)")))

    def processAlgorithm(self, parameters, context, feedback):
        prediction = layer_path(self.parameterAsRasterLayer(parameters, self.INPUT, context))
        labels_layer = self.parameterAsLayer(parameters, self.LABELS, context)
        if prediction is None:
            raise QgsProcessingException(self.tr("Choose a file-based predicted raster."))
        if labels_layer is None:
            raise QgsProcessingException(self.tr("Choose the reference labels."))
        field = self.parameterAsString(parameters, self.LABEL_FIELD, context) or None
        if labels_layer.type() == QgsMapLayer.VectorLayer:
            if not field or labels_layer.fields().indexOf(field) < 0:
                raise QgsProcessingException(self.tr("Polygon labels need a class field (LABEL_FIELD)."))
        else:
            field = None
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        config = EvaluateConfig(prediction=prediction, labels=layer_path(labels_layer, feedback),
                                label_field=field, out=out)
        result = self.run_engine_command(evaluate_args(config), feedback)
        if result.cancelled:
            raise QgsProcessingException(self.tr("Evaluation cancelled."))
        summary = result.done
        metrics = result.artifact("metrics") or {}
        return {self.OUTPUT: metrics.get("path") or out,
                self.MIOU: summary.get("miou"),
                self.PIXEL_ACCURACY: summary.get("pixel_accuracy"),
                self.PER_CLASS: json.dumps(summary.get("per_class"))}
