"""Layers -> files the engine can read."""
from __future__ import annotations

import os
import tempfile

from qgis.core import QgsCoordinateTransformContext, QgsMapLayer, QgsVectorFileWriter


class LayerError(Exception):
    pass


def layer_path(layer: QgsMapLayer | None, log=None) -> str | None:
    """A file the engine can read for ``layer``: its own file, or a temporary GeoPackage copy
    (memory/database layers, subsets, one layer of a multi-layer GeoPackage)."""
    if layer is None:
        return None
    if layer.type() == QgsMapLayer.RasterLayer:
        return layer.source() if os.path.exists(layer.source()) else None
    parts = layer.source().split("|")
    path = parts[0]
    simple = (layer.providerType() == "ogr" and os.path.isfile(path) and not layer.subsetString()
              and _single_layer(path))
    if simple:
        return path
    out = os.path.join(tempfile.mkdtemp(prefix="geopeft-"), "labels.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    error = QgsVectorFileWriter.writeAsVectorFormatV2(layer, out, QgsCoordinateTransformContext(),
                                                      options)
    if error[0] != QgsVectorFileWriter.NoError:
        raise LayerError(f"Could not copy layer {layer.name()} for the engine: {error[1]}")
    if log is not None:
        log(f"Copied {layer.name()} to {out} for the engine")
    return out


def _single_layer(path: str) -> bool:
    from osgeo import ogr
    ds = ogr.Open(path)
    return ds is not None and ds.GetLayerCount() == 1
