"""geopeft:evaluate — compare a predicted class raster with reference labels."""
from __future__ import annotations

import json

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterRasterLayer,
)

from ..core.commands import EvaluateConfig, evaluate_args
from .base import EngineAlgorithm, layer_path
from .label_params import add_label_parameters, label_choice


class EvaluateAlgorithm(EngineAlgorithm):
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"
    REPORT = "REPORT"
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
            "Scores a predicted class raster against reference labels (a class raster, LABELS, "
            "or a polygon layer, LABEL_POLYGONS, with its class field, LABEL_FIELD; the "
            "raster's no-data values and the Ignore value are left out): mean IoU, pixel "
            "accuracy and the IoU of "
            "each class. The metrics are written to a JSON file and returned as outputs "
            "(MIOU, PIXEL_ACCURACY, PER_CLASS as JSON).\n\n"
            "Report (REPORT, optional; a temporary file unless skipped): one self-contained HTML "
            "page, shown in the Results Viewer, with the scores, charts of per-class IoU and F1 and "
            "of the confusion matrix, the area of each class in the reference and the prediction, "
            "and the training curves of the model the prediction was made with (when its folder "
            "is still there).")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Predicted classes")))
        add_label_parameters(self, self.tr("Reference labels"))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, self.tr("Metrics (JSON)"), fileFilter="JSON (*.json)"))
        # an HTML file destination is an HTML output: Processing lists it in its Results Viewer
        self.addParameter(QgsProcessingParameterFileDestination(
            self.REPORT, self.tr("Report (HTML)"), fileFilter=self.tr("HTML files (*.html)"),
            optional=True, createByDefault=True))
        self.addOutput(QgsProcessingOutputNumber(self.MIOU, self.tr("Mean IoU")))
        self.addOutput(QgsProcessingOutputNumber(self.PIXEL_ACCURACY, self.tr("Pixel accuracy")))
        self.addOutput(QgsProcessingOutputString(self.PER_CLASS, self.tr("Per-class IoU (JSON)")))

    def processAlgorithm(self, parameters, context, feedback):
        prediction = layer_path(self.parameterAsRasterLayer(parameters, self.INPUT, context))
        if prediction is None:
            raise QgsProcessingException(self.tr("Choose a file-based predicted raster."))
        labels = label_choice(self, parameters, context, feedback)
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        report = self.parameterAsFileOutput(parameters, self.REPORT, context) or None
        config = EvaluateConfig(prediction=prediction, labels=labels.path, label_field=labels.field,
                                ignore_index=labels.ignore_index, out=out, report=report)
        result = self.run_engine_command(evaluate_args(config), feedback)
        if result.cancelled:
            raise QgsProcessingException(self.tr("Evaluation cancelled."))
        summary = result.done
        metrics = result.artifact("metrics") or {}
        written = result.artifact("report") or {}
        return {self.OUTPUT: metrics.get("path") or out,
                self.REPORT: written.get("path") or report,
                self.MIOU: summary.get("miou"),
                self.PIXEL_ACCURACY: summary.get("pixel_accuracy"),
                self.PER_CLASS: json.dumps(summary.get("per_class"))}
