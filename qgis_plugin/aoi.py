"""Where predict predicts, as the engine takes it: an extent -> the ``--aoi`` box (with
``@EPSG:code`` when it is in another CRS), polygons -> a temporary GeoPackage (``--aoi PATH``).

``write_polygons`` iterates features and writes a file: call it on a worker thread (Processing's
``processAlgorithm``, a QgsTask), never on the UI thread. The rest is cheap.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsFeature,
    QgsFields,
    QgsGeometry,
    QgsRectangle,
    QgsWkbTypes,
)

from .core.commands import aoi_box
from .layers import gpkg_writer

TEMP_PREFIX = "geopeft-aoi-"
AOI_LAYER = "aoi"


class AoiError(Exception):
    """An area of interest the engine could not use; the message says what to change."""


def extent_aoi(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem | None,
               image_crs: QgsCoordinateReferenceSystem,
               transform_context: QgsCoordinateTransformContext | None = None) -> str:
    """The --aoi box for ``rect`` in ``crs``: '…@EPSG:code' when the CRS has an EPSG code (the
    engine reprojects it); else reprojected here to ``image_crs`` and given without a CRS; no
    (valid) CRS: taken as the image's."""
    if crs is None or not crs.isValid():
        return aoi_box(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
    authid = crs.authid()
    if authid.upper().startswith("EPSG:"):
        return aoi_box(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), authid)
    if not image_crs.isValid():
        raise AoiError("The extent has a CRS but the input raster has none: give the extent in "
                       "the raster's coordinates.")
    box = reproject(rect, crs, image_crs, transform_context)
    return aoi_box(box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())


def reproject(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem,
              target: QgsCoordinateReferenceSystem,
              transform_context: QgsCoordinateTransformContext | None = None) -> QgsRectangle:
    """``rect``'s bounding box in ``target`` (edges densified by QGIS); AoiError if impossible."""
    if not crs.isValid() or not target.isValid() or crs == target:
        return QgsRectangle(rect)
    transform = QgsCoordinateTransform(crs, target, transform_context or QgsCoordinateTransformContext())
    try:
        return transform.transformBoundingBox(rect)
    except QgsCsException as exc:
        raise AoiError(f"Could not reproject the extent from {crs.userFriendlyIdentifier()} to "
                       f"{target.userFriendlyIdentifier()}: {exc}") from None


def overlaps(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem | None, layer) -> bool:
    """Whether ``rect`` (in ``crs``; None/invalid: the layer's) overlaps ``layer``'s extent."""
    try:
        box = reproject(rect, crs, layer.crs()) if crs is not None else rect
    except AoiError:
        return True  # the engine decides
    return box.intersects(layer.extent())


def temp_aoi_path() -> str:
    """A new temporary folder with the GeoPackage path to write the polygons to."""
    return os.path.join(tempfile.mkdtemp(prefix=TEMP_PREFIX), "aoi.gpkg")


def remove_temp(path: str | None) -> None:
    """Delete the folder of a ``temp_aoi_path`` (only such a folder)."""
    if path and os.path.basename(os.path.dirname(path)).startswith(TEMP_PREFIX):
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def polygonal(geometry: QgsGeometry) -> QgsGeometry | None:
    """A 2D MultiPolygon copy of a polygon geometry (curves segmentised); None for others."""
    if geometry is None or geometry.isNull() or geometry.isEmpty():
        return None
    if geometry.type() != QgsWkbTypes.GeometryType.PolygonGeometry:
        return None
    out = QgsGeometry(geometry)
    if QgsWkbTypes.isCurvedType(out.wkbType()):
        out = QgsGeometry(out.constGet().segmentize())
    part = out.get()
    part.dropZValue()
    part.dropMValue()
    out.convertToMultiType()
    return out


def write_polygons(features, crs: QgsCoordinateReferenceSystem, path: str, name: str = "",
                   is_cancelled=None) -> int:
    """Write the polygons of ``features`` (an iterable of QgsFeature; attributes dropped: the
    engine needs only the shapes) to a GeoPackage at ``path`` (layer 'aoi') in ``crs``. Returns
    how many were written; AoiError if none or the file cannot be written. Worker thread only."""
    try:
        writer = gpkg_writer(path, QgsFields(), QgsWkbTypes.Type.MultiPolygon, crs, AOI_LAYER)
    except OSError as exc:
        raise AoiError(f"Could not write the area of interest to {path}: {exc}") from None
    count = 0
    try:
        for feature in features:
            if is_cancelled is not None and is_cancelled():
                break
            geometry = polygonal(feature.geometry())
            if geometry is None:
                continue
            out = QgsFeature()
            out.setGeometry(geometry)
            if not writer.addFeature(out):
                raise AoiError(f"Could not write the area of interest to {path}: "
                               f"{writer.errorMessage()}")
            count += 1
    finally:
        del writer  # closes the GeoPackage
    if count == 0 and not (is_cancelled is not None and is_cancelled()):
        what = f"'{name}'" if name else "The area of interest"
        raise AoiError(f"{what} has no polygons to predict inside (with 'selected features only': "
                       "select some first).")
    return count
