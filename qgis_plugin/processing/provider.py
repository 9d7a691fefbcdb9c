"""The "GeoPEFT" Processing provider: Train, Predict, Export ONNX, Evaluate, Embed."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider

from ..icons import icon, icon_path
from .embed import EmbedAlgorithm
from .evaluate import EvaluateAlgorithm
from .export_onnx import ExportOnnxAlgorithm
from .predict import PredictAlgorithm
from .train import TrainAlgorithm

ALGORITHMS = (TrainAlgorithm, PredictAlgorithm, ExportOnnxAlgorithm, EvaluateAlgorithm, EmbedAlgorithm)


class GeoPEFTProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "geopeft"

    def name(self) -> str:
        return "GeoPEFT"

    def longName(self) -> str:
        return "GeoPEFT — fine-tune geospatial foundation models"

    def icon(self):
        return icon("geopeft.svg")

    def svgIconPath(self) -> str:
        return icon_path("geopeft.svg")

    def loadAlgorithms(self):
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())

    def supportedOutputRasterLayerExtensions(self):
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self):
        return ["gpkg", "shp", "geojson", "fgb"]
