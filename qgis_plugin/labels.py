"""Label rasters as QGIS sees them: their no-data values (the file's and the analyst's own), the
class values they hold, and the classes (value, name, colour) to train with.

The engine honours the file's no-data by itself; what QGIS adds (Layer Properties ▸
Transparency ▸ additional no-data value) and the analyst's "ignore value" become the engine's
``--ignore-index``, which takes one value.
"""
from __future__ import annotations

import functools
import math
import os

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsDefaultValue,
    QgsEditorWidgetSetup,
    QgsExpression,
    QgsFieldConstraints,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)

from .styling import categorized_renderer, classes_from_raster_layer, colour_for_name, normalise_classes

# The labels template ("New labels layer…" in the Train dialog): a polygon GeoPackage whose
# integer field ``class`` the engine trains on, ``name`` filled in from the class.
TEMPLATE_LAYER = "labels"
TEMPLATE_CLASS_FIELD = "class"
TEMPLATE_NAME_FIELD = "name"
TEMPLATE_STYLE = "geopeft labels"


class LabelsError(Exception):
    pass


def file_nodata(layer: QgsRasterLayer) -> float | None:
    provider = layer.dataProvider()
    if provider is None or not provider.sourceHasNoDataValue(1):
        return None
    return provider.sourceNoDataValue(1)


def user_nodata(layer: QgsRasterLayer) -> list[float]:
    """The analyst's no-data values of band 1 (QgsRasterDataProvider.userNoDataValues); a range that
    holds more than one whole number cannot be passed on, and raises ``LabelsError``."""
    provider = layer.dataProvider()
    values = []
    for rng in (provider.userNoDataValues(1) if provider is not None else []):
        low, high = rng.min(), rng.max()
        whole = [v for v in (low, high) if math.isfinite(v)]
        if len(whole) != 2 or math.floor(high) - math.ceil(low) > 0:
            raise LabelsError(
                f"Labels layer '{layer.name()}' has the no-data range {low:g} to {high:g}; GeoPEFT "
                "can ignore single values only. Set single values in Layer Properties ▸ "
                "Transparency (additional no-data value), or use the Ignore value.")
        if math.ceil(low) == low:
            values.append(low)
    return values


def ignore_index(layer: QgsRasterLayer | None, explicit: int | None = None) -> int | None:
    """The one label value besides the file's no-data that means "no label": the layer's
    user-set no-data and/or ``explicit`` (the dialog's or algorithm's ignore value)."""
    values = set()
    source = None
    if layer is not None:
        source = file_nodata(layer)
        values |= {int(v) for v in user_nodata(layer) if v != source}
    if explicit is not None and explicit != source:
        values.add(int(explicit))
    if len(values) > 1:
        name = layer.name() if layer is not None else "labels"
        raise LabelsError(
            f"Labels layer '{name}': values {', '.join(str(v) for v in sorted(values))} are all "
            "marked as no label, but GeoPEFT can ignore one value besides the file's own no-data. "
            "Keep one of them (Ignore value, or Layer Properties ▸ Transparency).")
    return values.pop() if values else None


def label_values(layer: QgsRasterLayer, limit: int = 4096) -> list[int] | None:
    """The class values present in band 1 (the file's no-data left out), from GDAL's histogram
    (exact below 64 Mpx, else from overviews or a sample). None if unknown (not an integer
    raster, unreadable, or more than ``limit`` distinct values possible). Cached per file
    version: dialogs ask again on every change of the ignore value."""
    path = layer.source()
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return None
    values = _label_values(path, stamp, limit)
    return None if values is None else list(values)


@functools.lru_cache(maxsize=32)
def _label_values(path: str, _stamp: int, limit: int) -> tuple[int, ...] | None:
    from osgeo import gdal
    # GetHistogram would store the histogram in a .aux.xml beside the analyst's file: not here
    previous = gdal.GetThreadLocalConfigOption("GDAL_PAM_ENABLED", None)
    gdal.SetThreadLocalConfigOption("GDAL_PAM_ENABLED", "NO")
    try:
        return _histogram_values(gdal, path, limit)
    finally:
        gdal.SetThreadLocalConfigOption("GDAL_PAM_ENABLED", previous)


def _histogram_values(gdal, path: str, limit: int) -> tuple[int, ...] | None:
    try:
        ds = gdal.Open(path)
    except RuntimeError:
        return None
    if ds is None:
        return None
    band = ds.GetRasterBand(1)
    if gdal.GetDataTypeName(band.DataType) not in ("Byte", "Int8", "UInt16", "Int16", "UInt32",
                                                   "Int32", "UInt64", "Int64"):
        return None
    approx = ds.RasterXSize * ds.RasterYSize > 64_000_000
    try:
        low, high = band.ComputeRasterMinMax(approx)
    except RuntimeError:  # only no-data
        return ()
    if low is None or high - low + 1 > limit:
        return None
    low, high = int(low), int(high)
    counts = band.GetHistogram(low - 0.5, high + 0.5, high - low + 1, 0, approx)
    return tuple(low + i for i, count in enumerate(counts) if count > 0)


def negative_values_warning(layer: QgsRasterLayer, values: list[int] | None,
                            ignore: int | None) -> str | None:
    """A warning when negative values would become classes (often a "no label" marker)."""
    negative = [v for v in values or [] if v < 0 and v != ignore]
    if not negative:
        return None
    shown = ", ".join(str(v) for v in negative[:5])
    return (f"Labels '{layer.name()}' hold the negative value{'s' if len(negative) > 1 else ''} "
            f"{shown}, which would become {'classes' if len(negative) > 1 else 'a class'}. If "
            f"{'they mean' if len(negative) > 1 else 'it means'} \"no label\", set the Ignore value "
            "(or the layer's no-data value).")


def raster_label_classes(layer: QgsRasterLayer, ignore: int | None = None) -> list[dict]:
    """The classes to train with: the values present (without no-data and the ignore value),
    named and coloured by the layer's palette or category names where it has them, else by
    ``colour_for_name``. Each class has ``"from_layer"``: True when its colour came from the layer.
    """
    known = {c["value"]: c for c in classes_from_raster_layer(layer)}
    values = label_values(layer)
    if values is None:
        values = sorted(known)
    skip = {ignore} | {int(v) for v in user_nodata(layer)}
    source = file_nodata(layer)
    if source is not None:
        skip.add(int(source))
    classes = []
    for i, value in enumerate(v for v in values if v not in skip):
        if value in known:
            classes.append({**known[value], "from_layer": True})
        else:
            name = f"class {value}"
            classes.append({"value": value, "name": name, "colour": colour_for_name(name, i),
                            "from_layer": False})
    return classes


# -- a new labels layer to draw in --------------------------------------------------------------
def template_classes(classes=None) -> list[dict]:
    """The classes of a new labels layer: ``classes`` (value, name, colour), else two default
    classes "class 1" and "class 2" in two distinct palette colours."""
    classes = normalise_classes(classes)
    if classes:
        return classes
    return [{"value": v, "name": f"class {v}", "colour": colour_for_name(f"class {v}", v - 1)} for v in (1, 2)]


def create_labels_layer(path: str, crs: QgsCoordinateReferenceSystem, classes=None,
                        name: str | None = None) -> QgsVectorLayer:
    """Create a GeoPackage ``path`` (overwritten) with an empty polygon layer ``labels`` in
    ``crs`` (fields ``class`` integer and ``name`` text) and open it, ready to draw in: styled
    by class (categorised by ``class``, from ``template_classes(classes)``), with a value map
    of the classes on ``class`` (the first class by default, never empty) and ``name`` filled in
    from the class; that style is stored in the GeoPackage as its default, so the file opens
    styled anywhere. Raises LabelsError when the file cannot be written. The file is empty: fast
    enough for the UI thread."""
    from .layers import gpkg_writer

    classes = template_classes(classes)
    # the fields, typed without QVariant (Qt 5 and 6 alike): a memory layer's from its URI
    fields = QgsVectorLayer(f"Polygon?field={TEMPLATE_CLASS_FIELD}:integer&field={TEMPLATE_NAME_FIELD}:string(80)",
                            "fields", "memory").fields()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LabelsError(f"Cannot create the labels layer {path}: the folder {folder} does not exist.")
    try:
        writer = gpkg_writer(path, fields, QgsWkbTypes.Type.Polygon, crs, TEMPLATE_LAYER)
    except OSError as exc:
        raise LabelsError(f"Cannot create the labels layer {path}: {exc}") from None
    del writer  # closes the GeoPackage
    layer = QgsVectorLayer(path, name or os.path.splitext(os.path.basename(path))[0], "ogr")
    if not layer.isValid():
        raise LabelsError(f"The new labels layer {path} could not be opened.")
    style_labels_template(layer, classes)
    error = layer.saveStyleToDatabase(TEMPLATE_STYLE, "GeoPEFT labels: classes and class field", True, "")
    if error:
        raise LabelsError(f"The labels layer {path} was created, but its style could not be stored in it: {error}")
    return layer


def style_labels_template(layer: QgsVectorLayer, classes: list[dict]) -> None:
    """Categorised by ``class``; a value map of the classes (by name) on ``class``, the first
    class by default and never empty; ``name`` follows the class."""
    classes = normalise_classes(classes)
    layer.setRenderer(categorized_renderer(classes, TEMPLATE_CLASS_FIELD))
    index = layer.fields().indexOf(TEMPLATE_CLASS_FIELD)
    layer.setEditorWidgetSetup(index, QgsEditorWidgetSetup(
        "ValueMap", {"map": [{c["name"]: c["value"]} for c in classes]}))
    layer.setDefaultValueDefinition(index, QgsDefaultValue(str(classes[0]["value"])))
    layer.setFieldConstraint(index, QgsFieldConstraints.Constraint.ConstraintNotNull)
    cases = " ".join(f"WHEN {QgsExpression.quotedColumnRef(TEMPLATE_CLASS_FIELD)} = {c['value']} "
                     f"THEN {QgsExpression.quotedString(c['name'])}" for c in classes)
    layer.setDefaultValueDefinition(layer.fields().indexOf(TEMPLATE_NAME_FIELD),
                                    QgsDefaultValue(f"CASE {cases} END", True))
    layer.triggerRepaint()
