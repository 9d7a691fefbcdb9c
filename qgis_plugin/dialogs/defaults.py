"""Defaults that fit an analyst's project: which layer is the image and which the labels, and
where a new model goes."""
from __future__ import annotations

import os
import re
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCategorizedSymbolRenderer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)

INTEGER_TYPES = (Qgis.DataType.Byte, Qgis.DataType.UInt16, Qgis.DataType.Int16,
                 Qgis.DataType.UInt32, Qgis.DataType.Int32)
CLASS_FIELD_NAMES = ("class_id", "classid", "class", "label", "class_name", "classname")


def project_layers() -> list:
    """The project's layers in the Layers panel's order (top first), then any not in the tree."""
    project = QgsProject.instance()
    ordered = [node.layer() for node in project.layerTreeRoot().findLayers() if node.layer()]
    seen = {layer.id() for layer in ordered}
    return ordered + [layer for layer in project.mapLayers().values() if layer.id() not in seen]


def is_polygon_layer(layer) -> bool:
    return (isinstance(layer, QgsVectorLayer)
            and layer.geometryType() == QgsWkbTypes.GeometryType.PolygonGeometry)


def is_class_raster(layer) -> bool:
    """A single-band integer raster: what class labels look like."""
    return (isinstance(layer, QgsRasterLayer) and layer.isValid() and layer.bandCount() == 1
            and layer.dataProvider().dataType(1) in INTEGER_TYPES)


def preferred_class_field(layer: QgsVectorLayer) -> str | None:
    """The categorized renderer's field, else a field named like a class, else None."""
    names = [f.name() for f in layer.fields()]
    renderer = layer.renderer()
    if isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() in names:
        return renderer.classAttribute()
    for candidate in CLASS_FIELD_NAMES:
        for name in names:
            if name.lower() == candidate:
                return name
    return None


def _label_score(layer, image) -> int:
    """How much a layer looks like labels: polygons with a class field or a paletted class
    raster 2, other polygons or class rasters 1, +1 for a class raster on the image's grid;
    0 = not labels."""
    if is_polygon_layer(layer):
        return 2 if preferred_class_field(layer) else 1
    if not is_class_raster(layer):
        return 0
    from osgeo import gdal
    ds = gdal.OpenEx(layer.source()) if os.path.isfile(layer.source()) else None
    paletted = (isinstance(layer.renderer(), QgsPalettedRasterRenderer)
                or (ds is not None and ds.GetRasterBand(1).GetColorTable() is not None))
    same_grid = image is not None and (layer.width(), layer.height(), layer.extent()) == \
        (image.width(), image.height(), image.extent()) and layer.crs() == image.crs()
    return (2 if paletted else 1) + (1 if same_grid else 0)


def default_layers(layers=None) -> tuple[QgsRasterLayer | None, object]:
    """(image, labels): the topmost multi-band raster as the image; as labels the layer that
    looks most like labels (a class raster or polygons), never the image itself."""
    layers = [x for x in (project_layers() if layers is None else layers) if x.isValid()]
    rasters = [x for x in layers if isinstance(x, QgsRasterLayer)]
    image = next((x for x in rasters if x.bandCount() > 1), None)
    scores = {x.id(): _label_score(x, image) for x in layers if x is not image}
    candidates = [x for x in layers if scores.get(x.id(), 0) > 0]
    labels = max(candidates, key=lambda x: scores[x.id()], default=None)  # first of the best
    if image is None:
        image = next((x for x in rasters if x is not labels), None)
    return image, labels


# -- where new models go ---------------------------------------------------------------------
def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists writable, or could be created (nearest existing parent)."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


def models_folder() -> Path:
    """'models' beside the saved project when writable, else ~/GeoPEFT/models."""
    home = QgsProject.instance().absolutePath()
    if home:
        folder = Path(home) / "models"
        if _writable(folder):
            return folder
    return Path.home() / "GeoPEFT" / "models"


def new_model_folder(name: str) -> str:
    """A model folder that does not exist yet (or is empty) in ``models_folder()``."""
    base = models_folder()
    stem = re.sub(r"[^\w.-]+", "_", name).strip("._") or "model"
    for i in range(1, 1000):
        candidate = base / (stem if i == 1 else f"{stem}_{i}")
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return str(candidate)
    return str(base / stem)


def results_folder(layer_source: str) -> str:
    """Beside the input raster when writable, else ~/GeoPEFT/results."""
    folder = Path(layer_source.split("|")[0]).parent
    if folder.is_dir() and os.access(folder, os.W_OK):
        return str(folder)
    return str(Path.home() / "GeoPEFT" / "results")
