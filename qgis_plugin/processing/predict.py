"""geopeft:predict — classify a raster with a trained model (folder or ONNX)."""
from __future__ import annotations

import json

from qgis.core import (
    QgsFeatureRequest,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputString,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsRasterLayer,
)

from .. import settings
from ..aoi import AoiError, extent_aoi, remove_temp, temp_aoi_path, write_polygons
from ..core.bands import ModelsInfo, fetch_models_info
from ..core.commands import DEVICES, PredictConfig, parse_bands, predict_args, read_card, validate_predict
from ..core.engine_client import EngineError
from ..core.rasterinfo import band_descriptions, grid_problems
from ..styling import (classes_from_raster_file, normalise_classes, save_areas_style, save_polygon_style,
                       style_polygons, style_prediction, style_uncertain_areas, style_uncertainty)
from .base import EngineAlgorithm, layer_path

MODEL_FILTER = "GeoPEFT model (card.json *.onnx);;All files (*)"  # "(*)" lets a folder through

# Post-processors must outlive the algorithm instance (Processing keeps only a pointer).
_POST_PROCESSORS: list = []


class ClassStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles a result layer when Processing loads it into the project: the class raster and
    polygons by class, the uncertainty raster on its ramp, the uncertain areas outlined with their
    rank (``kind``: raster/vector/uncertainty/areas)."""

    def __init__(self, classes: list[dict], kind: str):
        super().__init__()
        self.classes = classes
        self.kind = kind

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - Qt API
        if self.kind == "raster":
            style_prediction(layer, self.classes)
        elif self.kind == "uncertainty":
            style_uncertainty(layer)
        elif self.kind == "areas":
            style_uncertain_areas(layer)
        else:
            style_polygons(layer, self.classes)

    @classmethod
    def attach(cls, context, layer_id: str, classes: list[dict], kind: str) -> None:
        if not context.willLoadLayerOnCompletion(layer_id):
            return
        styler = cls(classes, kind)
        _POST_PROCESSORS.append(styler)
        del _POST_PROCESSORS[:-20]
        context.layerToLoadOnCompletionDetails(layer_id).setPostProcessor(styler)


class PredictAlgorithm(EngineAlgorithm):
    INPUT = "INPUT"
    EXTRA_INPUTS = "EXTRA_INPUTS"
    BANDS = "BANDS"
    MODEL = "MODEL"
    OUTPUT = "OUTPUT"
    PROBABILITIES = "PROBABILITIES"
    UNCERTAINTY = "UNCERTAINTY"
    POLYGONS = "POLYGONS"
    MIN_AREA = "MIN_AREA"
    UNCERTAIN_AREAS = "UNCERTAIN_AREAS"
    AREA_COUNT = "AREA_COUNT"
    BATCH_SIZE = "BATCH_SIZE"
    DEVICE = "DEVICE"
    CLASSES = "CLASSES"
    EXTENT = "EXTENT"
    AOI = "AOI"
    MASK = "MASK"

    command = "predict"

    def name(self) -> str:
        return "predict"

    def displayName(self) -> str:
        return self.tr("Predict classes (segment raster)")

    def shortHelpString(self) -> str:
        return self.tr(
            "Classifies every pixel of a raster with a model trained by GeoPEFT (its folder or "
            "card.json) or exported to ONNX. The model card says which bands, normalisation and "
            "chip size to use. <b>Bands</b> (empty): the bands named as in training are found "
            "by name in the raster (B02 and BLUE count as the same band), else the band "
            "numbers of training are used; or give the band numbers, e.g. 2,3,4,9,12,13.\n\n"
            "<b>Output</b>: a class GeoTIFF on exactly the input grid, styled with the model's "
            "class names and colours. Optionally the per-class probabilities; the <b>uncertainty</b> "
            "(0-100, normalised entropy of the probabilities: label the high places next); and "
            "class <b>polygons</b> in a GeoPackage (fields class_value, class_name, area; styled "
            "by class), without regions smaller than <b>Minimum polygon area</b> (CRS units²); and "
            "the <b>most uncertain areas</b> (where to label next): the squares of the model's chip "
            "size with the highest mean uncertainty, at least half valid, as polygons ranked 1 = "
            "most uncertain (fields rank, mean_uncertainty, valid_fraction; <b>Number of uncertain "
            "areas</b>, default 10).\n\n"
            "<b>Where to predict</b> (all optional; default: the whole raster). Pixels outside are "
            "nodata in every output, tiles with nothing inside are not computed, and the outputs "
            "stay on the input's grid. <b>Predict only inside this extent</b>: a box in any CRS, "
            "e.g. the map canvas or a layer's extent. <b>Predict only inside these polygons</b>: "
            "a polygon layer in any CRS (tick 'Selected features only' to use only the "
            "selection); a pixel is inside when its centre is. Give either the extent or the "
            "polygons, not both (to combine them, clip the polygons to the extent first). "
            "<b>Predict only where this raster is non-zero</b>: a mask raster on exactly the "
            "input's grid (band 1; 0 and nodata = skip); with an extent or polygons, only pixels "
            "inside both are predicted.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Input raster")))
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, self.tr("Model (trained folder's card.json, or .onnx)"),
            fileFilter=MODEL_FILTER))
        self.addParameter(QgsProcessingParameterExtent(
            self.EXTENT, self.tr("Predict only inside this extent"), optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AOI, self.tr("Predict only inside these polygons"),
            [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.MASK, self.tr("Predict only where this raster is non-zero (same grid as the input)"),
            optional=True))
        extra = QgsProcessingParameterMultipleLayers(
            self.EXTRA_INPUTS, self.tr("Additional rasters stacked after the input (as in training)"),
            QgsProcessing.SourceType.TypeRaster, optional=True)
        bands = QgsProcessingParameterString(
            self.BANDS, self.tr("Bands of the input for the model's bands (e.g. 2,3,4; empty: by "
                                "name from the model card)"), optional=True, defaultValue="")
        batch = QgsProcessingParameterNumber(
            self.BATCH_SIZE, self.tr("Batch size (empty: engine default)"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=1024)
        device = QgsProcessingParameterEnum(self.DEVICE, self.tr("Device"), options=list(DEVICES),
                                            defaultValue=0)
        for param in (extra, bands, batch, device):
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, self.tr("Classes")))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.PROBABILITIES, self.tr("Class probabilities"), optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.UNCERTAINTY, self.tr("Uncertainty (where to label next)"), optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.POLYGONS, self.tr("Class polygons (GeoPackage)"), QgsProcessing.SourceType.TypeVectorPolygon,
            optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterNumber(
            self.MIN_AREA, self.tr("Minimum polygon area (CRS units², with polygons; empty: keep all)"),
            QgsProcessingParameterNumber.Type.Double, optional=True, minValue=0))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.UNCERTAIN_AREAS, self.tr("Most uncertain areas: where to label next (GeoPackage)"),
            QgsProcessing.SourceType.TypeVectorPolygon, optional=True, createByDefault=False))
        count = QgsProcessingParameterNumber(
            self.AREA_COUNT, self.tr("Number of uncertain areas (empty: 10)"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=10000)
        count.setFlags(count.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
        self.addParameter(count)
        self.addOutput(QgsProcessingOutputString(self.CLASSES, self.tr("Classes (JSON)")))

    def bands(self, parameters, context, model: str, images: list[str], feedback) -> list[int]:
        """BANDS, else the card's bands found by name in the input (empty: the card's numbers)."""
        text = self.parameterAsString(parameters, self.BANDS, context)
        bands = parse_bands(text)
        if bands is None:
            raise QgsProcessingException(self.tr("Bands (BANDS) must be band numbers such as "
                                                 "2,3,4; got {!r}.").format(text))
        card = read_card(model)
        if bands or card is None:
            return bands
        wanted = [str(n) for n in card.get("input", {}).get("band_names") or []]
        names = [n for image in images for n in band_descriptions(image)]
        try:
            info = fetch_models_info(settings.engine_python())
        except EngineError:
            info = ModelsInfo()  # exact names only; the engine's own error comes later
        found = info.find_bands(wanted, names)
        if wanted and None not in found:
            feedback.pushInfo(self.tr("Bands found by name: {}").format(
                ", ".join(f"{w} = band {b}" for w, b in zip(wanted, found))))
            return found
        if wanted:
            feedback.pushWarning(self.tr(
                "Not found by name in the input: {}; using the band numbers of training ({}). "
                "Set Bands (BANDS) if they differ.").format(
                    ", ".join(w for w, b in zip(wanted, found) if b is None),
                    ", ".join(str(b) for b in card.get("input", {}).get("bands") or [])))
        return []

    def config(self, parameters, context, feedback) -> PredictConfig:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        extra = self.parameterAsLayerList(parameters, self.EXTRA_INPUTS, context) or []
        images = [layer_path(layer)] + [layer_path(x) for x in extra if isinstance(x, QgsRasterLayer)]
        if layer is None or None in images:
            raise QgsProcessingException(self.tr("Choose a file-based input raster."))
        probabilities = self.parameterAsOutputLayer(parameters, self.PROBABILITIES, context) or None
        uncertainty = self.parameterAsOutputLayer(parameters, self.UNCERTAINTY, context) or None
        polygons = self.parameterAsOutputLayer(parameters, self.POLYGONS, context) or None
        if polygons and not polygons.split("|")[0].lower().endswith(".gpkg"):
            raise QgsProcessingException(self.tr(
                "Class polygons (POLYGONS) are written as a GeoPackage: give a .gpkg file "
                "(got {}).").format(polygons))
        areas = self.parameterAsOutputLayer(parameters, self.UNCERTAIN_AREAS, context) or None
        if areas and not areas.split("|")[0].lower().endswith(".gpkg"):
            raise QgsProcessingException(self.tr(
                "The uncertain areas (UNCERTAIN_AREAS) are written as a GeoPackage: give a .gpkg "
                "file (got {}).").format(areas))
        area_count = parameters.get(self.AREA_COUNT)
        area_count = (None if area_count in (None, "") or not areas
                      else self.parameterAsInt(parameters, self.AREA_COUNT, context))
        min_area = parameters.get(self.MIN_AREA)
        min_area = (None if min_area in (None, "") or not polygons
                    else self.parameterAsDouble(parameters, self.MIN_AREA, context) or None)
        batch = parameters.get(self.BATCH_SIZE)
        model = self.parameterAsFile(parameters, self.MODEL, context)
        aoi = self.extent_aoi(parameters, context, layer)
        if aoi and parameters.get(self.AOI) not in (None, ""):
            raise QgsProcessingException(self.tr(
                "Give either an extent (EXTENT) or polygons (AOI) to predict inside, not both: the "
                "engine takes one area of interest. To combine them, clip the polygons to the "
                "extent first (Vector ▸ Geoprocessing ▸ Clip, or 'Extract/clip by extent')."))
        mask = None
        if parameters.get(self.MASK) not in (None, ""):
            mask = layer_path(self.parameterAsRasterLayer(parameters, self.MASK, context))
            if mask is None:
                raise QgsProcessingException(self.tr("The mask (MASK) must be a file-based raster."))
        return PredictConfig(
            model=model,
            images=images,
            bands=self.bands(parameters, context, model, images, feedback),
            out=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            probabilities=probabilities,
            uncertainty=uncertainty,
            polygons=polygons.split("|")[0] if polygons else None,
            min_area=min_area,
            batch_size=None if batch in (None, "") else self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            aoi=aoi,
            mask=mask,
            uncertain_areas=areas.split("|")[0] if areas else None,
            area_count=area_count,
        )

    def extent_aoi(self, parameters, context, layer) -> str | None:
        """EXTENT as the engine's --aoi box: '…@EPSG:code' in the extent's CRS, else reprojected
        to the input raster's CRS; None without an extent."""
        if parameters.get(self.EXTENT) in (None, ""):
            return None
        rect = self.parameterAsExtent(parameters, self.EXTENT, context)
        if rect is None or rect.isNull() or rect.isEmpty():
            return None
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        try:
            return extent_aoi(rect, crs, layer.crs(), context.transformContext())
        except AoiError as exc:
            raise QgsProcessingException(str(exc)) from None

    def write_aoi(self, parameters, context, feedback) -> str | None:
        """AOI's polygons (the selection only, if so chosen) in a temporary GeoPackage; its path,
        or None without AOI. Runs in processAlgorithm: Processing's worker thread."""
        if parameters.get(self.AOI) in (None, ""):
            return None
        source = self.parameterAsSource(parameters, self.AOI, context)
        if source is None:
            raise QgsProcessingException(self.tr("Could not read the polygons (AOI)."))
        path = temp_aoi_path()
        try:
            count = write_polygons(source.getFeatures(QgsFeatureRequest().setNoAttributes()),
                                   source.sourceCrs(), path, source.sourceName(), feedback.isCanceled)
        except AoiError as exc:
            remove_temp(path)
            raise QgsProcessingException(str(exc)) from None
        feedback.pushInfo(self.tr("Area of interest: {} polygons of {}").format(count, source.sourceName()))
        return path

    def processAlgorithm(self, parameters, context, feedback):
        config = self.config(parameters, context, feedback)
        problems = validate_predict(config) + grid_problems(config.images)
        if config.mask:
            problems += [p.replace(" is not on the same grid", " (mask) is not on the same grid")
                         for p in grid_problems([config.images[0], config.mask])]
        if problems:
            raise QgsProcessingException("\n".join(problems))
        config.aoi = self.write_aoi(parameters, context, feedback) or config.aoi
        try:
            if feedback.isCanceled():
                raise QgsProcessingException(self.tr("Prediction cancelled; no output was written."))
            result = self.run_engine_command(predict_args(config), feedback)
        finally:
            if config.aoi and parameters.get(self.AOI) not in (None, ""):
                remove_temp(config.aoi)
        if result.cancelled:
            raise QgsProcessingException(self.tr("Prediction cancelled; no output was written."))
        raster = result.artifact("raster") or {}
        out = raster.get("path") or config.out
        classes = normalise_classes(raster.get("classes")) or classes_from_raster_file(out)
        ClassStyler.attach(context, config.out, classes, "raster")
        results = {self.OUTPUT: out, self.CLASSES: json.dumps(classes),
                   self.PROBABILITIES: None, self.UNCERTAINTY: None, self.POLYGONS: None,
                   self.UNCERTAIN_AREAS: None}
        for key, kind, asked in ((self.PROBABILITIES, "probabilities", config.probabilities),
                                 (self.UNCERTAINTY, "uncertainty", config.uncertainty),
                                 (self.POLYGONS, "polygons", config.polygons),
                                 (self.UNCERTAIN_AREAS, "uncertain_areas", config.uncertain_areas)):
            if asked:
                results[key] = (result.artifact(kind) or {}).get("path") or asked
        if config.uncertainty:
            ClassStyler.attach(context, config.uncertainty, classes, "uncertainty")
        if config.polygons:
            save_polygon_style(results[self.POLYGONS], classes)
            ClassStyler.attach(context, self.parameterAsOutputLayer(parameters, self.POLYGONS, context),
                               classes, "vector")
        if config.uncertain_areas:
            save_areas_style(results[self.UNCERTAIN_AREAS])
            ClassStyler.attach(context, self.parameterAsOutputLayer(parameters, self.UNCERTAIN_AREAS, context),
                               classes, "areas")
        return results
