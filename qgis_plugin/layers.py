"""Layers -> files the engine can read.

A layer the engine cannot read as it is (a memory or database layer, a subset, one layer of a
multi-layer file) is copied to a temporary GeoPackage. Copying iterates every feature and
writes a file: never on the UI thread. Dialogs take a :class:`LayerCopy` on the UI thread
(cheap: a thread-safe feature source) and ``write`` it in their task; Processing algorithms
call :func:`layer_path` in ``processAlgorithm`` (Processing's worker thread). Either way the
temporary folder is removed when the run ends.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from qgis.core import (
    QgsCoordinateTransformContext,
    QgsDataProvider,
    QgsMapLayer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsVectorLayerFeatureSource,
)

from .styling import style_prediction

TEMP_PREFIX = "geopeft-layer-"


class LayerError(Exception):
    pass


def needs_copy(layer: QgsMapLayer | None) -> bool:
    """Whether the engine needs a copy of ``layer`` (a vector layer that is not one plain file)."""
    if layer is None or isinstance(layer, QgsRasterLayer):
        return False
    path = layer.source().split("|")[0]
    return not (layer.providerType() == "ogr" and os.path.isfile(path)
                and not layer.subsetString() and _single_layer(path))


def layer_path(layer: QgsMapLayer | None, log=None, temp_dirs: list | None = None) -> str | None:
    """A file the engine can read for ``layer``: its own file, or a temporary GeoPackage copy
    (memory/database layers, subsets, one layer of a multi-layer GeoPackage) whose folder is
    appended to ``temp_dirs`` (the caller removes it). Copies on the calling thread: call it
    from a worker thread (Processing), never from a dialog's slot."""
    if layer is None:
        return None
    if isinstance(layer, QgsRasterLayer):
        return layer.source() if os.path.exists(layer.source()) else None
    if not needs_copy(layer):
        return layer.source().split("|")[0]
    out = temp_copy_path()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if temp_dirs is not None:
        temp_dirs.append(os.path.dirname(out))
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    error = QgsVectorFileWriter.writeAsVectorFormatV2(layer, out, QgsCoordinateTransformContext(),
                                                      options)
    if error[0] != QgsVectorFileWriter.WriterError.NoError:
        raise LayerError(f"Could not copy layer {layer.name()} for the engine: {error[1]}")
    if log is not None:
        log(f"Copied {layer.name()} to {out} for the engine")
    return out


def temp_copy_path(name: str = "labels") -> str:
    """A new path ``<temp>/geopeft-layer-<random>/<name>.gpkg``; nothing is created yet."""
    return os.path.join(tempfile.gettempdir(), TEMP_PREFIX + uuid.uuid4().hex, name + ".gpkg")


def remove_temp(path: str | None) -> None:
    """Delete the folder of a ``temp_copy_path`` (only such a folder), if it exists."""
    if path and os.path.basename(os.path.dirname(path)).startswith(TEMP_PREFIX):
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


class LayerCopy:
    """A vector layer's features, taken on the UI thread (cheap), written to a GeoPackage on a
    worker thread with :meth:`write` (the layer's subset and unsaved edits included)."""

    def __init__(self, layer: QgsVectorLayer):
        self.name = layer.name()
        self.source = QgsVectorLayerFeatureSource(layer)
        self.fields = layer.fields()
        self.wkb_type = layer.wkbType()
        self.crs = layer.crs()

    def write(self, path: str, is_cancelled=lambda: False) -> int:
        """Write the features to ``path`` (its folder is created); LayerError if impossible.
        Returns how many were written. Worker thread only."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            writer = gpkg_writer(path, self.fields, self.wkb_type, self.crs)
        except OSError as exc:
            raise LayerError(f"Could not copy layer {self.name} for the engine: {exc}") from None
        count = 0
        try:
            for feature in self.source.getFeatures():
                if is_cancelled():
                    break
                if not writer.addFeature(feature):
                    raise LayerError(f"Could not copy layer {self.name} for the engine: "
                                     f"{writer.errorMessage()}")
                count += 1
        finally:
            del writer  # closes the GeoPackage
        return count


STYLE_TABLE = "layer_styles"  # where QGIS keeps a GeoPackage's default style: not data


def _single_layer(path: str) -> bool:
    """One data layer in the file (QGIS's style table aside: the engine reads the first layer)."""
    from osgeo import ogr
    ds = ogr.Open(path)
    if ds is None:
        return False
    names = [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]
    return len(names) - (STYLE_TABLE in names[1:]) == 1


def gpkg_writer(path: str, fields, wkb_type, crs, layer_name: str | None = None):
    """A QgsVectorFileWriter on a new GeoPackage (UTF-8; ``layer_name`` or the file's name);
    OSError with GDAL's message when it cannot be created. Worker thread only, unless no
    features follow (an empty template: ``labels.create_labels_layer``)."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.fileEncoding = "UTF-8"
    if layer_name:
        options.layerName = layer_name
    writer = QgsVectorFileWriter.create(path, fields, wkb_type, crs, QgsCoordinateTransformContext(), options)
    if writer.hasError() != QgsVectorFileWriter.WriterError.NoError:
        message = writer.errorMessage()
        del writer
        raise OSError(message)
    return writer


class PreviewLayer:
    """The map layer of training previews: one temporary layer that updates in place (its source
    moves to each new preview file the engine writes) with the classes' colours. Loading a small
    GeoTIFF is quick: done on the UI thread when the engine's event arrives."""

    NAME = "GeoPEFT training preview"

    def __init__(self):
        self.layer_id: str | None = None
        self.updates = 0

    @property
    def layer(self) -> QgsRasterLayer | None:
        return QgsProject.instance().mapLayer(self.layer_id) if self.layer_id else None

    def show(self, path: str, classes: list[dict], label: str = "") -> QgsRasterLayer | None:
        name = self.NAME + (f" ({label})" if label else "")
        layer = self.layer
        if layer is None:
            layer = QgsRasterLayer(path, name, "gdal")
            if not layer.isValid():
                return None
            style_prediction(layer, classes)
            self.layer_id = layer.id()  # known before the project announces it (dialogs list layers then)
            QgsProject.instance().addMapLayer(layer)
        else:
            layer.setDataSource(path, name, "gdal", QgsDataProvider.ProviderOptions())
            if not layer.isValid():
                return None
            style_prediction(layer, classes)
        self.updates += 1
        return layer

    def remove(self) -> None:
        if self.layer is not None:
            QgsProject.instance().removeMapLayer(self.layer_id)
        self.layer_id = None
        self.updates = 0
