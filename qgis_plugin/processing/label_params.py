"""The labels parameters of Train and Evaluate: a class raster *or* a polygon layer with a class
field, and an ignore value.

Two separate parameters on purpose: a field parameter whose parent may hold a raster crashes
QGIS's Processing dialog (QgsProcessingFieldWidgetWrapper::setParentLayerWrapperValue), so the
class field's parent is only ever the polygon layer parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

from qgis.core import (
    QgsMapLayer,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
    QgsRasterLayer,
)

from ..labels import LabelsError, ignore_index, label_values, negative_values_warning
from .base import layer_path, tr

LABELS = "LABELS"
LABEL_POLYGONS = "LABEL_POLYGONS"
LABEL_FIELD = "LABEL_FIELD"
IGNORE_VALUE = "IGNORE_VALUE"


@dataclass
class LabelsChoice:
    layer: QgsMapLayer
    path: str
    field: str | None  # polygons only
    ignore_index: int | None

    @property
    def is_raster(self) -> bool:
        return isinstance(self.layer, QgsRasterLayer)


def add_label_parameters(alg, what: str) -> None:
    """LABELS (class raster), LABEL_POLYGONS + LABEL_FIELD, IGNORE_VALUE; ``what``: e.g. 'Labels'."""
    alg.addParameter(QgsProcessingParameterRasterLayer(
        LABELS, tr("{}: class raster").format(what), optional=True))
    alg.addParameter(QgsProcessingParameterVectorLayer(
        LABEL_POLYGONS, tr("{}: polygon layer (instead of a class raster)").format(what),
        [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
    alg.addParameter(QgsProcessingParameterField(
        LABEL_FIELD, tr("Class field of the polygon layer"), parentLayerParameterName=LABEL_POLYGONS,
        optional=True))
    alg.addParameter(QgsProcessingParameterNumber(
        IGNORE_VALUE, tr("Ignore value: label meaning \"no label\" (empty: the layer's no-data)"),
        QgsProcessingParameterNumber.Type.Integer, optional=True))


def label_choice(alg, parameters, context, feedback) -> LabelsChoice:
    """The chosen labels (QgsProcessingException naming the parameter to fix)."""
    raster = alg.parameterAsRasterLayer(parameters, LABELS, context)
    polygons = alg.parameterAsVectorLayer(parameters, LABEL_POLYGONS, context)
    explicit = None
    if parameters.get(IGNORE_VALUE) not in (None, ""):
        explicit = alg.parameterAsInt(parameters, IGNORE_VALUE, context)
    if raster is not None and polygons is not None:
        raise QgsProcessingException(tr(
            "Give the labels either as a class raster (LABELS) or as a polygon layer "
            "(LABEL_POLYGONS), not both."))
    if polygons is not None:
        field = alg.parameterAsString(parameters, LABEL_FIELD, context) or None
        if not field:
            raise QgsProcessingException(tr(
                "Polygon labels '{}' need a class field (LABEL_FIELD).").format(polygons.name()))
        if polygons.fields().indexOf(field) < 0:
            raise QgsProcessingException(tr("Polygon labels '{}' have no field '{}'; choose one of: {}.")
                                         .format(polygons.name(), field,
                                                 ", ".join(polygons.fields().names())))
        return LabelsChoice(polygons, layer_path(polygons, feedback), field, explicit)
    if raster is None:
        raise QgsProcessingException(tr(
            "Choose the labels: a class raster (LABELS), or a polygon layer (LABEL_POLYGONS) with "
            "its class field (LABEL_FIELD)."))
    path = layer_path(raster, feedback)
    if path is None:
        raise QgsProcessingException(tr("Labels '{}' are not a file; save the raster as a GeoTIFF "
                                        "first.").format(raster.name()))
    try:
        ignore = ignore_index(raster, explicit)
    except LabelsError as exc:
        raise QgsProcessingException(str(exc)) from None
    if ignore is not None:
        feedback.pushInfo(tr("Label value {} means \"no label\" (ignored).").format(ignore))
    warning = negative_values_warning(raster, label_values(raster), ignore)
    if warning:
        feedback.pushWarning(warning.replace("Ignore value", "Ignore value (IGNORE_VALUE)"))
    return LabelsChoice(raster, path, None, ignore)
