"""geopeft:embed — a foundation model's patch features (or their principal components) as a raster."""
from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from .. import settings
from ..core.bands import cached_models_info
from ..core.commands import BACKBONES, DEVICES, EmbedConfig, embed_args, parse_bands, validate_embed
from ..styling import style_embedding
from .base import EngineAlgorithm, layer_path

MODEL_FILTER = "GeoPEFT model (card.json);;All files (*)"  # "(*)" lets a folder through

# Post-processors must outlive the algorithm instance (Processing keeps only a pointer).
_POST_PROCESSORS: list = []


def backbone_names() -> list[str]:
    """The foundation models as the engine lists them (`engine models`, once some dialog or
    algorithm has asked it in this session), else the plugin's offline copy, kept equal to the
    engine's by a test. Processing builds its choices when QGIS starts: no engine run here."""
    info = cached_models_info(settings.engine_python())
    return list(info.bands) if info is not None and info.bands else list(BACKBONES)


class EmbeddingStyler(QgsProcessingLayerPostProcessorInterface):
    """Shows a loaded embedding in false colour: components 1-3 as red, green, blue."""

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - Qt API
        style_embedding(layer)

    @classmethod
    def attach(cls, context, layer_id: str) -> None:
        if not context.willLoadLayerOnCompletion(layer_id):
            return
        styler = cls()
        _POST_PROCESSORS.append(styler)
        del _POST_PROCESSORS[:-20]
        context.layerToLoadOnCompletionDetails(layer_id).setPostProcessor(styler)


class EmbedAlgorithm(EngineAlgorithm):
    INPUT = "INPUT"
    BANDS = "BANDS"
    MODEL = "MODEL"
    BACKBONE = "BACKBONE"
    PRETRAINED = "PRETRAINED"
    WEIGHTS = "WEIGHTS"
    COMPONENTS = "COMPONENTS"
    BATCH_SIZE = "BATCH_SIZE"
    DEVICE = "DEVICE"
    OUTPUT = "OUTPUT"

    command = "embed"

    def __init__(self):
        super().__init__()
        self.backbones = backbone_names()  # the choices of BACKBONE, by index

    def name(self) -> str:
        return "embed"

    def displayName(self) -> str:
        return self.tr("Embed raster (foundation model features)")

    def shortHelpString(self) -> str:
        return self.tr(
            "Runs a foundation model over a raster and writes what it sees: one feature vector "
            "per patch (e.g. 16 x 16 pixels), as a float GeoTIFF on the input's grid coarsened "
            "by the patch size. Useful to cluster the scene (e.g. K-means on the bands) or to "
            "find places that look alike.\n\n"
            "<b>Model</b>: a model trained by GeoPEFT (its folder or card.json): its tuned "
            "backbone, bands and normalisation. Or <b>Foundation model</b>: a backbone as "
            "published (pretrained weights downloaded or from the cache, or the <b>Weights "
            "file</b>); the bands named like its pretrained bands are matched by name and the "
            "normalisation comes from the raster. Give one of the two.\n\n"
            "<b>Principal components</b>: how many bands to keep (the features' principal "
            "components, PC 1 with the most variance); 0 keeps every feature (192 to 1280 "
            "bands); empty: the engine's default. The result opens in false colour (PC 1-3 as "
            "red, green, blue). Patches with no valid input pixel are no-data.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Input raster")))
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, self.tr("Model (trained folder's card.json; or choose a foundation model)"),
            fileFilter=MODEL_FILTER, optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.BACKBONE, self.tr("Foundation model (without a trained model)"), options=self.backbones,
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.COMPONENTS, self.tr("Principal components (0: every feature; empty: engine default)"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=0, maxValue=4096))
        advanced = [
            QgsProcessingParameterBoolean(
                self.PRETRAINED, self.tr("Foundation model: pretrained weights (off: random, for tests)"),
                defaultValue=True),
            QgsProcessingParameterFile(
                self.WEIGHTS, self.tr("Foundation model: weights file (empty: download/cache automatically)"),
                optional=True, fileFilter="Weights (*.pt *.pth *.safetensors *.ckpt *.bin)"),
            QgsProcessingParameterString(
                self.BANDS, self.tr("Bands (e.g. 1,2,3; empty: the model's, or all)"), optional=True,
                defaultValue=""),
            QgsProcessingParameterNumber(
                self.BATCH_SIZE, self.tr("Batch size (empty: engine default)"),
                QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=1024),
            QgsProcessingParameterEnum(self.DEVICE, self.tr("Device"), options=list(DEVICES), defaultValue=0),
        ]
        for param in advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, self.tr("Embedding")))

    def config(self, parameters, context) -> EmbedConfig:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        image = layer_path(layer) if layer is not None else None
        if image is None:
            raise QgsProcessingException(self.tr("Choose a file-based input raster."))
        model = self.parameterAsFile(parameters, self.MODEL, context) or None
        backbone = None
        if parameters.get(self.BACKBONE) not in (None, ""):
            backbone = self.backbones[self.parameterAsEnum(parameters, self.BACKBONE, context)]
        weights = None
        if backbone:
            weights = self.parameterAsFile(parameters, self.WEIGHTS, context) or None
            if not self.parameterAsBool(parameters, self.PRETRAINED, context):
                weights = "none"
        text = self.parameterAsString(parameters, self.BANDS, context)
        bands = parse_bands(text)
        if bands is None:
            raise QgsProcessingException(self.tr("Bands (BANDS) must be band numbers such as "
                                                 "2,3,4; got {!r}.").format(text))
        components = parameters.get(self.COMPONENTS)
        batch = parameters.get(self.BATCH_SIZE)
        return EmbedConfig(
            images=[image], out=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            model=model, backbone=backbone, weights=weights, bands=bands,
            components=None if components in (None, "") else self.parameterAsInt(parameters, self.COMPONENTS,
                                                                                 context),
            batch_size=None if batch in (None, "") else self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)])

    def processAlgorithm(self, parameters, context, feedback):
        config = self.config(parameters, context)
        problems = validate_embed(config)
        if problems:
            raise QgsProcessingException("\n".join(problems))
        result = self.run_engine_command(embed_args(config), feedback)
        if result.cancelled:
            raise QgsProcessingException(self.tr("Embedding cancelled; no output was written."))
        out = (result.artifact("embedding") or {}).get("path") or config.out
        EmbeddingStyler.attach(context, config.out)
        return {self.OUTPUT: out}
