"""geopeft:export_onnx — merge the adapter and export one self-contained ONNX model."""
from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
)

from ..core.commands import ExportConfig, export_args, model_path_problem
from .base import EngineAlgorithm
from .predict import MODEL_FILTER


class ExportOnnxAlgorithm(EngineAlgorithm):
    MODEL = "MODEL"
    OUTPUT = "OUTPUT"
    MAX_ABS_DIFF = "MAX_ABS_DIFF"

    command = "export"

    def name(self) -> str:
        return "export_onnx"

    def displayName(self) -> str:
        return self.tr("Export model to ONNX")

    def shortHelpString(self) -> str:
        return self.tr(
            "Merges a trained model's adapter into its backbone and writes one ONNX file with "
            "the model card in its metadata. The ONNX model runs with the Predict algorithm (or "
            "any ONNX runtime) without PyTorch. The engine checks the export against the "
            "PyTorch model; the largest difference is returned as MAX_ABS_DIFF.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, self.tr("Trained model (folder's card.json)"), fileFilter=MODEL_FILTER))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, self.tr("ONNX model"), fileFilter="ONNX model (*.onnx)"))
        self.addOutput(QgsProcessingOutputNumber(self.MAX_ABS_DIFF,
                                                 self.tr("Largest difference to PyTorch")))

    def processAlgorithm(self, parameters, context, feedback):
        config = ExportConfig(model=self.parameterAsFile(parameters, self.MODEL, context),
                              out=self.parameterAsFileOutput(parameters, self.OUTPUT, context))
        problem = model_path_problem(config.model)
        if problem:
            raise QgsProcessingException(problem)
        if config.model.lower().endswith(".onnx"):
            raise QgsProcessingException(self.tr("The model is already an ONNX file."))
        if not config.out.lower().endswith(".onnx"):
            config.out += ".onnx"
        result = self.run_engine_command(export_args(config), feedback)
        if result.cancelled:
            raise QgsProcessingException(self.tr("Export cancelled; no output was written."))
        onnx = result.artifact("onnx") or {}
        return {self.OUTPUT: onnx.get("path") or config.out,
                self.MAX_ABS_DIFF: result.done.get("max_abs_diff")}
