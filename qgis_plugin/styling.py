"""Class palettes: read classes from layers and results, style rasters and polygons by class.

A *class* is ``{"value": int, "name": str, "colour": "#rrggbb"}``, the engine's own format
(the ``classes`` of a raster artifact, and the GeoTIFF tag ``GEOPEFT_CLASSES``).
"""
from __future__ import annotations

import json
import os

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFeatureRequest,
    QgsFillSymbol,
    QgsPalettedRasterRenderer,
    QgsPalLayerSettings,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
    QgsWkbTypes,
)
from qgis.PyQt.QtGui import QColor

CLASSES_TAG = "GEOPEFT_CLASSES"
CLASS_FIELD = "class_value"  # fields of the engine's predicted polygons (layer "predictions")
NAME_FIELD = "class_name"
UNCERTAINTY_NODATA = 255  # the engine's uncertainty raster: uint8 0-100, nodata 255
# Sequential ramp for uncertainty (ColorBrewer YlOrRd): pale where the model is sure, dark red
# where it hesitates, so the places worth labelling next stand out.
UNCERTAINTY_RAMP = ((0, "#ffffb2", "0 — low uncertainty"), (25, "#fecc5c", "25"),
                    (50, "#fd8d3c", "50"), (75, "#f03b20", "75"),
                    (100, "#bd0026", "100 — high uncertainty (label here next)"))

# The engine's uncertain areas (layer "uncertain_areas": rank 1 = most uncertain): outlined
# squares in a colour the uncertainty ramp (yellow to red) never uses, labelled with the rank.
AREAS_OUTLINE = "#00b7eb"
AREAS_RANK_FIELD = "rank"

# Distinct, readable colours for classes without a colour of their own; no red early on, so
# that an unnamed class (often water, in flood maps) does not come out red.
PALETTE = ("#1f78b4", "#33a02c", "#ff7f00", "#6a3d9a", "#b15928", "#a6cee3", "#b2df8a",
           "#fdbf6f", "#cab2d6", "#ffff99", "#66c2a5", "#8da0cb", "#e78ac3", "#a6d854",
           "#ffd92f", "#e5c494", "#b3b3b3", "#fc8d62", "#fb9a99", "#e31a1c")

# Colours for classes named like common land covers (first match wins; "wetland" before "water").
NAMED_COLOURS = (
    (("wetland", "marsh", "swamp", "mangrove"), "#41b6c4"),
    (("water", "river", "lake", "sea", "ocean", "flood", "reservoir", "pond"), "#1f78b4"),
    (("snow", "ice", "glacier"), "#d6eef5"),
    (("cloud",), "#f0f0f0"),
    (("shadow",), "#525252"),
    (("forest", "tree", "wood"), "#1b7837"),
    (("vegetation", "grass", "shrub", "meadow", "pasture", "green"), "#7fbc41"),
    (("crop", "agri", "farm", "field", "cultivated"), "#f2d15b"),
    (("urban", "built", "building", "road", "settlement", "impervious", "city"), "#d7301f"),
    (("bare", "soil", "sand", "desert", "rock"), "#c2a878"),
)
NEUTRAL_COLOUR = "#bdbdbd"  # "not water", "background", "other"
NEGATIONS = ("not ", "non ", "non-", "no ", "not-", "no-")
NEUTRAL_NAMES = ("background", "other", "unknown", "unclassified", "none")


def colour_for_name(name: str, index: int) -> str:
    """A sensible colour for a class called ``name``: blue for water, green for forest, …;
    grey for "not water", "background" and the like; else the palette's ``index``-th colour."""
    text = (name or "").strip().lower()
    if text.startswith(NEGATIONS) or text in NEUTRAL_NAMES:
        return NEUTRAL_COLOUR
    for words, colour in NAMED_COLOURS:
        if any(word in text for word in words):
            return colour
    return PALETTE[index % len(PALETTE)]


def normalise_classes(classes) -> list[dict]:
    """Sorted by value, every class with a name and a colour."""
    out = []
    for i, c in enumerate(sorted(classes or [], key=lambda c: int(c["value"]))):
        value = int(c["value"])
        name = str(c.get("name") or f"class {value}")
        out.append({"value": value, "name": name,
                    "colour": str(c.get("colour") or c.get("color") or colour_for_name(name, i))})
    return out


# -- reading classes ---------------------------------------------------------------------------
def classes_from_raster_file(path: str) -> list[dict]:
    """The classes of a GeoPEFT prediction: the GEOPEFT_CLASSES tag, else its colour table."""
    from osgeo import gdal  # QGIS's GDAL bindings; no ML here

    ds = gdal.Open(str(path))
    if ds is None:
        return []
    text = ds.GetMetadataItem(CLASSES_TAG) or ds.GetRasterBand(1).GetMetadataItem(CLASSES_TAG)
    if text:
        try:
            return normalise_classes(json.loads(text))
        except (ValueError, KeyError, TypeError):
            pass
    band = ds.GetRasterBand(1)
    table = band.GetColorTable()
    names = band.GetCategoryNames() or []
    nodata = band.GetNoDataValue()
    if table is None:
        return []
    classes = []
    for value in range(table.GetCount()):
        if nodata is not None and value == int(nodata):
            continue
        r, g, b, a = table.GetColorEntry(value)
        named = value < len(names) and bool(names[value])
        if a == 0 or ((r, g, b) == (0, 0, 0) and not named):
            continue
        name = names[value] if named else f"class {value}"
        classes.append({"value": value, "name": name, "colour": QColor(r, g, b).name()})
    return classes


def classes_from_raster_layer(layer: QgsRasterLayer) -> list[dict]:
    """Classes of a label raster: its paletted renderer, else its file's tag/colour table.

    A colour table's unused entries (a GeoTIFF palette always has 256) and the nodata value are
    left out: an entry counts when it has a name or a colour other than black.
    """
    renderer = layer.renderer()
    provider = layer.dataProvider()
    nodata = provider.sourceNoDataValue(1) if provider.sourceHasNoDataValue(1) else None
    if isinstance(renderer, QgsPalettedRasterRenderer) and renderer.classes():
        classes = []
        for c in renderer.classes():
            value = int(c.value)
            named = bool(c.label) and c.label != str(value)
            black = c.color.name() == "#000000"
            if (nodata is not None and value == int(nodata)) or not (named or not black):
                continue
            classes.append({"value": value, "name": c.label if named else f"class {value}",
                            "colour": c.color.name()})
        # a palette QGIS made from the colour table names classes by number: the file's
        # GEOPEFT_CLASSES tag (demo labels, predictions) names them
        tagged = {c["value"]: c["name"] for c in classes_from_raster_file(layer.source())}
        for c in classes:
            if c["name"] == f"class {c['value']}" and tagged.get(c["value"]):
                c["name"] = tagged[c["value"]]
        return normalise_classes(classes)
    return classes_from_raster_file(layer.source())


def classes_from_vector_layer(layer: QgsVectorLayer, field: str, limit: int = 256) -> list[dict]:
    """Classes of a polygon label layer's ``field``.

    A categorized renderer on that field gives the names (legend labels) and colours. Otherwise
    the field's distinct values are the classes: integer values are kept as class values, text
    values are numbered 1..n in sorted order and become the class names.
    """
    renderer = layer.renderer()
    if isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == field:
        cats = [c for c in renderer.categories() if c.value() not in (None, "") and c.renderState()]
        if cats and all(_is_int(c.value()) for c in cats):
            return normalise_classes({"value": int(c.value()), "name": c.label() or str(c.value()),
                                      "colour": c.symbol().color().name()} for c in cats)
        if cats:
            cats = sorted(cats, key=lambda c: str(c.value()))
            return [{"value": i + 1, "name": c.label() or str(c.value()),
                     "colour": c.symbol().color().name()} for i, c in enumerate(cats)]
    index = layer.fields().indexOf(field)
    if index < 0:
        return []
    values = [v for v in layer.uniqueValues(index, limit) if v not in (None, "") and not _is_null(v)]
    if values and all(_is_int(v) for v in values):
        ints = sorted({int(v) for v in values})
        names = _names_beside(layer, field, ints)
        return [{"value": v, "name": names.get(v, str(v)),
                 "colour": colour_for_name(names.get(v, ""), i)} for i, v in enumerate(ints)]
    names = sorted({str(v) for v in values})
    return [{"value": i + 1, "name": n, "colour": colour_for_name(n, i)} for i, n in enumerate(names)]


def _names_beside(layer: QgsVectorLayer, field: str, values: list[int]) -> dict[int, str]:
    """Names for integer classes from a text field such as ``class_name`` next to ``class_id``."""
    name_field = next((f.name() for f in layer.fields()
                       if f.name().lower() in ("class_name", "name", "label", "classname")
                       and f.name() != field), None)
    if not name_field:
        return {}
    names: dict[int, str] = {}
    request = QgsFeatureRequest().setFlags(QgsFeatureRequest.Flag.NoGeometry)
    request.setSubsetOfAttributes([field, name_field], layer.fields())
    for feature in layer.getFeatures(request):
        value = feature[field]
        if _is_int(value) and int(value) not in names and feature[name_field]:
            names[int(value)] = str(feature[name_field])
        if len(names) == len(values):
            break
    return names


def _is_null(value) -> bool:
    return hasattr(value, "isNull") and value.isNull()


def _is_int(value) -> bool:
    if isinstance(value, bool) or _is_null(value):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    try:
        int(str(value))
        return True
    except ValueError:
        return False


# -- styling -----------------------------------------------------------------------------------
def paletted_renderer(layer: QgsRasterLayer, classes: list[dict]) -> QgsPalettedRasterRenderer:
    items = [QgsPalettedRasterRenderer.Class(c["value"], QColor(c["colour"]), c["name"])
             for c in normalise_classes(classes)]
    return QgsPalettedRasterRenderer(layer.dataProvider(), 1, items)


def style_prediction(layer: QgsRasterLayer, classes: list[dict] | None = None) -> bool:
    """Paletted renderer with the class names and colours (classes read from the file if None)."""
    classes = classes or classes_from_raster_file(layer.source())
    if not classes or not layer.isValid():
        return False
    layer.setRenderer(paletted_renderer(layer, classes))
    layer.triggerRepaint()
    return True


def categorized_renderer(classes: list[dict], field: str = CLASS_FIELD,
                         geometry_type=QgsWkbTypes.GeometryType.PolygonGeometry) -> QgsCategorizedSymbolRenderer:
    categories = []
    for c in normalise_classes(classes):
        symbol = QgsFillSymbol.createSimple({"color": c["colour"], "outline_color": "#232323",
                                             "outline_width": "0.1"})
        categories.append(QgsRendererCategory(c["value"], symbol, c["name"]))
    return QgsCategorizedSymbolRenderer(field, categories)


def style_polygons(layer: QgsVectorLayer, classes: list[dict], field: str = CLASS_FIELD) -> bool:
    if not classes or not layer.isValid() or layer.fields().indexOf(field) < 0:
        return False
    layer.setRenderer(categorized_renderer(classes, field))
    layer.triggerRepaint()
    return True


def style_uncertainty(layer: QgsRasterLayer) -> bool:
    """Single-band pseudocolour 0-100 on a sequential ramp, legend from low to high uncertainty;
    nodata (255, and anything outside 0-100) transparent."""
    if not layer.isValid():
        return False
    provider = layer.dataProvider()
    if not provider.sourceHasNoDataValue(1):
        provider.setNoDataValue(1, UNCERTAINTY_NODATA)
    provider.setUseSourceNoDataValue(1, True)
    ramp = QgsColorRampShader(0, 100)
    ramp.setColorRampType(QgsColorRampShader.Type.Interpolated)
    ramp.setClip(True)  # values above 100 are not uncertainties: not drawn
    ramp.setColorRampItemList([QgsColorRampShader.ColorRampItem(value, QColor(colour), label)
                               for value, colour, label in UNCERTAINTY_RAMP])
    shader = QgsRasterShader(0, 100)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(provider, 1, shader)
    renderer.setClassificationMin(0)
    renderer.setClassificationMax(100)
    layer.setRenderer(renderer)
    layer.triggerRepaint()
    return True


def save_polygon_style(path: str, classes: list[dict]) -> bool:
    """Store the class style as the default style inside the engine's polygon GeoPackage, so it
    opens styled by class anywhere (and ``pred.gpkg`` never picks up ``pred.tif``'s ``pred.qml``).
    The class raster needs nothing: the engine writes its ``.qml`` beside it."""
    if not classes or not os.path.isfile(path):
        return False
    layer = QgsVectorLayer(path, "polygons", "ogr")
    if not style_polygons(layer, classes):
        return False
    return not layer.saveStyleToDatabase("geopeft classes", "GeoPEFT classes", True, "")


def style_uncertain_areas(layer: QgsVectorLayer) -> bool:
    """The uncertain areas as squares outlined (no fill: the uncertainty raster stays visible
    beneath) in a cyan the uncertainty ramp never uses, each labelled with its rank."""
    if not layer.isValid() or layer.fields().indexOf(AREAS_RANK_FIELD) < 0:
        return False
    symbol = QgsFillSymbol.createSimple({"style": "no", "outline_color": AREAS_OUTLINE,
                                         "outline_width": "0.8", "outline_width_unit": "MM"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    settings = QgsPalLayerSettings()
    settings.fieldName = AREAS_RANK_FIELD
    settings.placement = QgsPalLayerSettings.Placement.OverPoint
    text = QgsTextFormat()
    text.setSize(12)
    text.setColor(QColor("#003a4d"))
    font = text.font()
    font.setBold(True)
    text.setFont(font)
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.2)
    buffer.setColor(QColor("#ffffff"))
    text.setBuffer(buffer)
    settings.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()
    return True


def save_areas_style(path: str) -> bool:
    """Store the uncertain areas' style as the default style in their GeoPackage (it opens
    outlined and ranked anywhere). Any thread: the layer is its own."""
    if not path or not os.path.isfile(path):
        return False
    layer = QgsVectorLayer(path, "uncertain areas", "ogr")
    if not style_uncertain_areas(layer):
        return False
    return not layer.saveStyleToDatabase("geopeft uncertain areas", "GeoPEFT: where to label next", True, "")


def rgb_renderer(layer: QgsRasterLayer, bands: tuple[int, int, int], std_devs: float | None = None):
    """Red, green and blue from ``bands`` (a band past the last repeats the last), each stretched
    between its minimum and maximum, or its mean ± ``std_devs`` standard deviations (statistics
    of the layer, nodata left out)."""
    from qgis.core import QgsContrastEnhancement, QgsMultiBandColorRenderer, QgsRasterBandStats

    provider = layer.dataProvider()
    bands = [min(b, layer.bandCount()) for b in bands]
    renderer = QgsMultiBandColorRenderer(provider, *bands)
    for band, setter in zip(bands, (renderer.setRedContrastEnhancement, renderer.setGreenContrastEnhancement,
                                    renderer.setBlueContrastEnhancement)):
        provider.setUseSourceNoDataValue(band, True)
        stats = provider.bandStatistics(band, QgsRasterBandStats.Stats.All)
        low, high = stats.minimumValue, stats.maximumValue
        if std_devs is not None:
            low, high = max(low, stats.mean - std_devs * stats.stdDev), min(high, stats.mean + std_devs * stats.stdDev)
        enhancement = QgsContrastEnhancement(provider.dataType(band))
        enhancement.setContrastEnhancementAlgorithm(
            QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum)
        enhancement.setMinimumValue(low)
        enhancement.setMaximumValue(high)
        setter(enhancement)
    return renderer


def style_embedding(layer: QgsRasterLayer) -> bool:
    """False colour of an embedding's first three bands (principal components 1-3: red, green,
    blue), each stretched between its minimum and maximum. A one- or two-band embedding repeats
    its last band."""
    if not layer.isValid():
        return False
    layer.setRenderer(rgb_renderer(layer, (1, 2, 3)))
    layer.triggerRepaint()
    return True
