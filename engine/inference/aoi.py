"""Where ``predict`` predicts: an area of interest (a bounding box or polygons from a vector
file) and/or a raster mask on the input grid.

A ``Region`` answers, for any window of the input grid, which pixels lie inside: the AOI is
rasterised per window (``rasterio.features.geometry_mask`` with the window's transform, pixel
centres inside), the mask raster is read per window, so memory does not grow with the raster.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import fiona
import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import bounds as geometry_bounds
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import Window

from engine.data.rasters import Grid, RasterStack
from engine.protocol import EngineError

_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_BBOX = re.compile(rf"^({_NUMBER}),({_NUMBER}),({_NUMBER}),({_NUMBER})(?:@\s*(\S.*))?$")
_POLYGONAL = {"Polygon", "MultiPolygon"}


class Region:
    """The pixels to predict: inside the AOI (if any) and non-zero in the mask (if any)."""

    def __init__(self, grid: Grid, geometries: list[dict] | None = None, mask: RasterStack | None = None):
        self.grid = grid
        self.geometries = geometries
        self.mask = mask
        self.window = Window(0, 0, grid.width, grid.height)  # pixels outside it are outside the region
        if geometries:
            left, bottom, right, top = union_bounds(geometries)
            # pixel window of the bounds' corners (any orientation of the grid), one pixel of margin
            cols, rows = zip(*(~grid.transform @ (x, y) for x in (left, right) for y in (bottom, top)))
            col0, row0 = max(math.floor(min(cols)) - 1, 0), max(math.floor(min(rows)) - 1, 0)
            col1, row1 = min(math.ceil(max(cols)) + 1, grid.width), min(math.ceil(max(rows)) + 1, grid.height)
            if col1 <= col0 or row1 <= row0:
                raise EngineError(
                    f"the area of interest does not overlap the image ({grid.describe()}; AOI bounds "
                    f"{left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g} in the image's CRS)",
                    hint="check the coordinates and their CRS (a bounding box in another CRS needs "
                         "@EPSG:code, e.g. 12.1,45.2,12.3,45.4@EPSG:4326)")
            self.window = Window(col0, row0, col1 - col0, row1 - row0)

    def inside(self, window: Window) -> np.ndarray:
        """bool [h, w]: the window's pixels that are in the region (outside the raster: False)."""
        h, w = int(window.height), int(window.width)
        r, c = int(window.row_off), int(window.col_off)
        b = self.window
        if (r >= b.row_off + b.height or r + h <= b.row_off or c >= b.col_off + b.width or c + w <= b.col_off):
            return np.zeros((h, w), bool)
        if self.geometries:
            out = geometry_mask(self.geometries, out_shape=(h, w), invert=True,
                                transform=self.grid.transform @ Affine.translation(c, r))
        else:
            out = np.ones((h, w), bool)
        if self.mask is not None and out.any():
            data, valid = self.mask.read(window)
            out &= valid & (data[0] != 0)
        if r < 0 or c < 0 or r + h > self.grid.height or c + w > self.grid.width:
            outside = np.ones((h, w), bool)
            outside[max(-r, 0):self.grid.height - r, max(-c, 0):self.grid.width - c] = False
            out[outside] = False
        return out

    def close(self) -> None:
        if self.mask is not None:
            self.mask.close()


def load_region(grid: Grid, aoi: str | os.PathLike | None = None, aoi_layer: str | None = None,
                mask: str | os.PathLike | None = None) -> Region | None:
    """The region to predict for ``predict``'s ``aoi`` (``minx,miny,maxx,maxy`` in the image's
    CRS, ``…@EPSG:code`` in another, or a polygon vector file with an optional ``aoi_layer``)
    and ``mask`` (a raster on the image's grid, non-zero = predict); None when neither is given."""
    if aoi is None and mask is None:
        return None
    if aoi_layer is not None and aoi is None:
        raise EngineError("--aoi-layer needs --aoi", hint="give the vector file with --aoi PATH")
    geometries = None
    if aoi is not None:
        text = str(aoi).strip()
        match = _BBOX.match(text)
        if match:
            if aoi_layer is not None:
                raise EngineError("--aoi-layer goes with a vector file, not with a bounding box",
                                  hint="drop --aoi-layer, or give --aoi a GeoPackage/GeoJSON/Shapefile")
            geometries = [_bbox_geometry(text, match, grid)]
        else:
            geometries = _read_polygons(Path(text), aoi_layer, grid)
    stack = None
    if mask is not None:
        stack = RasterStack([mask], [1])
        other = stack.grid
        if not other.same_as(grid):
            stack.close()
            raise EngineError(f"mask {Path(mask).name} is not on the image's grid: {other.describe()} vs "
                              f"{grid.describe()}",
                              hint="give a mask with the image's CRS, pixel size, extent and size (e.g. "
                                   "gdalwarp it onto the image, or QGIS 'Align rasters')")
    try:
        return Region(grid, geometries, stack)
    except EngineError:
        if stack is not None:
            stack.close()
        raise


def _bbox_geometry(text: str, match: re.Match, grid: Grid) -> dict:
    minx, miny, maxx, maxy = (float(match.group(i)) for i in range(1, 5))
    if not (minx < maxx and miny < maxy):
        raise EngineError(f"bad --aoi {text!r}: need minx < maxx and miny < maxy",
                          hint="give the box as minx,miny,maxx,maxy")
    ring = [(minx, miny), (maxx, miny), (maxx, maxy), (minx, maxy), (minx, miny)]
    geometry = {"type": "Polygon", "coordinates": [ring]}
    if match.group(5):
        try:
            crs = CRS.from_user_input(match.group(5).strip())
        except CRSError as exc:
            raise EngineError(f"bad CRS in --aoi {text!r}: {exc}", hint="write it like @EPSG:4326") from None
        if grid.crs is None:
            raise EngineError(f"--aoi {text!r} names a CRS but the image has none",
                              hint="give the box in the image's pixel coordinates, without @CRS")
        if crs != grid.crs:  # edges densified first, so the reprojected box keeps its curved sides
            geometry = transform_geom(crs, grid.crs, _densified(ring), precision=-1)
    return geometry


def _densified(ring: list[tuple[float, float]], steps: int = 64) -> dict:
    points = [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
              for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]) for t in np.arange(steps) / steps]
    return {"type": "Polygon", "coordinates": [points + [ring[0]]]}


def _read_polygons(path: Path, layer: str | None, grid: Grid) -> list[dict]:
    if not path.exists():
        raise EngineError(f"--aoi {path}: neither a bounding box nor an existing file",
                          hint="give minx,miny,maxx,maxy (optionally @EPSG:code) or a GeoPackage/GeoJSON/"
                               "Shapefile with polygons")
    try:
        layers = fiona.listlayers(path)
    except Exception as exc:  # fiona raises driver-specific errors
        raise EngineError(f"cannot read the area of interest {path}: {exc}",
                          hint="give a vector file GDAL can read (GeoPackage, GeoJSON, Shapefile)") from None
    if layer is not None and layer not in layers:
        raise EngineError(f"{path.name} has no layer {layer!r} (layers: {', '.join(layers)})",
                          hint="pick one of its layers with --aoi-layer")
    if layer is None and len(layers) > 1:
        raise EngineError(f"{path.name} has several layers ({', '.join(layers)}): which is the area of interest?",
                          hint="pick one with --aoi-layer")
    with fiona.open(path, layer=layer or layers[0]) as src:
        src_crs = CRS.from_wkt(src.crs_wkt) if src.crs_wkt else None
        geometries, other = [], set()
        for feature in src:
            if feature.geometry is None:
                continue
            geometry = dict(feature.geometry.__geo_interface__)
            if geometry["type"] in _POLYGONAL:
                geometries.append(geometry)
            else:
                other.add(geometry["type"])
    if not geometries:
        found = f" (only {', '.join(sorted(other))})" if other else ""
        raise EngineError(f"the area of interest {path.name} has no polygons{found}",
                          hint="give a layer of polygons, e.g. drawn in QGIS")
    if src_crs is not None and grid.crs is not None and src_crs != grid.crs:
        geometries = transform_geom(src_crs, grid.crs, geometries, precision=-1)
    elif src_crs is None and grid.crs is not None:
        raise EngineError(f"the area of interest {path.name} has no CRS",
                          hint="assign it a CRS (e.g. in QGIS: Layer properties › Source)")
    return list(geometries)


def union_bounds(geometries: list[dict]) -> tuple[float, float, float, float]:
    boxes = np.array([geometry_bounds(g) for g in geometries], np.float64)
    return boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()

