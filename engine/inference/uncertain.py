"""Where to label next: the most uncertain squares of an uncertainty raster, as polygons.

``predict --uncertainty`` writes the model's per-pixel uncertainty (normalised entropy × 100,
uint8, nodata 255). An analyst wants fewer, bigger places to look at: ``uncertain_areas`` cuts
the raster into a grid of squares of ``size_px`` pixels (from the raster's top-left corner),
takes the mean uncertainty of each square's valid pixels, and keeps the ``count`` squares with
the highest mean among those at least ``min_valid`` valid (default half). The valid fraction
is counted over the whole square, so the cut-off squares at the right and bottom edges are
listed only when at least that much of them lies inside the raster; their polygon is the part
inside the raster (exactly the pixels that were averaged).

The default square is the model's chip size (``predict`` passes the card's): the model sees
the image in tiles of that size and trains on crops of that size, so a square labelled in full
is one whole training chip, small enough that one hesitant field or shoreline is not averaged
away, large enough to be worth an analyst's visit. Without a model, ``DEFAULT_SIZE``.

Memory stays flat on any raster (20000² px and more): the raster is read one row of squares
at a time, in column chunks, and only the best ``count`` squares so far are kept (a heap).
The GeoPackage layer ``uncertain_areas`` (fields ``rank`` 1 = most uncertain,
``mean_uncertainty`` 0-100, ``valid_fraction`` 0-1; polygons in the raster's CRS) is written
to a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import rasterio
from rasterio.windows import Window

from engine.inference.outputs import UNCERTAINTY_NODATA
from engine.protocol import EngineError

AREAS_LAYER = "uncertain_areas"
DEFAULT_SIZE = 128  # pixels, when no model says its chip size
DEFAULT_COUNT = 10
MIN_VALID = 0.5
CHUNK_PX = 4096  # columns read at once (rounded to whole squares)


@dataclass(frozen=True)
class Area:
    """One square: its pixel window (row, col, height, width; the part inside the raster),
    mean uncertainty of its valid pixels (0-100) and valid fraction of the whole square."""

    row: int
    col: int
    height: int
    width: int
    mean: float
    valid_fraction: float


def check_area_options(size_px: int | None = None, count: int | None = None) -> None:
    """Refuse a square size or count that cannot work, before anything is predicted."""
    if size_px is not None and int(size_px) < 1:
        raise EngineError(f"--area-size {size_px} must be at least 1 pixel",
                          hint="give --area-size in pixels, e.g. the model's chip size (224), or leave it out")
    if count is not None and int(count) < 1:
        raise EngineError(f"--area-count {count} must be at least 1", hint="give --area-count 10, or leave it out")


def find_uncertain_areas(uncertainty_tif: str | os.PathLike, size_px: int = DEFAULT_SIZE,
                         count: int = DEFAULT_COUNT, min_valid: float = MIN_VALID,
                         cancelled: Callable[[], bool] = lambda: False) -> list[Area]:
    """The ``count`` most uncertain squares of ``uncertainty_tif`` (band 1), most uncertain
    first (ties: the upper, then the left one first). Pixels equal to the raster's nodata
    (255 when it has none), above 100 or masked by GDAL are not valid."""
    check_area_options(size_px, count)
    size, count = int(size_px), int(count)
    best: list[tuple] = []  # min-heap of (mean, -row, -col, Area): the best ``count`` so far
    with rasterio.open(uncertainty_tif) as src:
        nodata = src.nodata if src.nodata is not None else UNCERTAINTY_NODATA
        H, W = src.height, src.width
        chunk = max(1, CHUNK_PX // size) * size
        for row in range(0, H, size):
            h = min(size, H - row)
            for col0 in range(0, W, chunk):
                if cancelled():
                    raise AreasCancelled
                w = min(chunk, W - col0)
                data = src.read(1, window=Window(col0, row, w, h))
                valid = (data != nodata) & (data <= 100)
                if src.nodata is None and np.issubdtype(data.dtype, np.floating):
                    valid &= np.isfinite(data)
                starts = np.arange(0, w, size)
                sums = np.add.reduceat(np.where(valid, data, 0).astype(np.float64).sum(axis=0), starts)
                counts = np.add.reduceat(valid.sum(axis=0), starts)
                fractions = counts / float(size * size)
                for k in np.flatnonzero((fractions >= min_valid) & (counts > 0)):
                    col = col0 + int(starts[k])
                    mean = float(sums[k] / counts[k])
                    key = (mean, -row, -col)
                    if len(best) < count or key > best[0][:3]:
                        area = Area(row, col, h, min(size, W - col), mean, float(fractions[k]))
                        item = (*key, area)
                        if len(best) < count:
                            heapq.heappush(best, item)
                        else:
                            heapq.heapreplace(best, item)
    return [item[3] for item in sorted(best, key=lambda i: i[:3], reverse=True)]


def write_areas(areas: list[Area], path: str | os.PathLike, transform, crs) -> None:
    """The areas as the GeoPackage layer ``uncertain_areas`` at ``path`` (a new file)."""
    import fiona

    schema = {"geometry": "Polygon",
              "properties": {"rank": "int", "mean_uncertainty": "float", "valid_fraction": "float"}}
    crs_wkt = crs.to_wkt() if crs else ""
    features = []
    for rank, a in enumerate(areas, start=1):
        corners = [transform @ (a.col + dx, a.row + dy) for dx, dy in
                   ((0, 0), (a.width, 0), (a.width, a.height), (0, a.height), (0, 0))]
        geometry = {"type": "Polygon", "coordinates": [[(float(x), float(y)) for x, y in corners]]}
        features.append(fiona.Feature(geometry=fiona.Geometry.from_dict(geometry),
                                      properties={"rank": rank, "mean_uncertainty": round(a.mean, 3),
                                                  "valid_fraction": round(a.valid_fraction, 4)}))
    with fiona.open(path, "w", driver="GPKG", layer=AREAS_LAYER, schema=schema, crs_wkt=crs_wkt) as dst:
        if features:
            dst.writerecords(features)


def write_uncertain_areas(uncertainty_tif: str | os.PathLike, path: str | os.PathLike,
                          size_px: int = DEFAULT_SIZE, count: int = DEFAULT_COUNT, min_valid: float = MIN_VALID,
                          cancelled: Callable[[], bool] = lambda: False) -> dict:
    """Find the areas and write them straight to ``path`` (``predict`` passes its temporary
    name); returns a summary: areas written, square size, best mean."""
    areas = find_uncertain_areas(uncertainty_tif, size_px, count, min_valid, cancelled)
    with rasterio.open(uncertainty_tif) as src:
        transform, crs = src.transform, src.crs
    write_areas(areas, path, transform, crs)
    return {"areas": len(areas), "size_px": int(size_px), "count": int(count),
            "max_mean_uncertainty": round(areas[0].mean, 3) if areas else None}


def uncertain_areas(uncertainty_tif: str | os.PathLike, out_gpkg: str | os.PathLike, size_px: int = DEFAULT_SIZE,
                    count: int = DEFAULT_COUNT, min_valid: float = MIN_VALID,
                    cancelled: Callable[[], bool] = lambda: False) -> dict:
    """The ``count`` most uncertain ``size_px`` squares of ``uncertainty_tif`` with at least
    ``min_valid`` valid pixels, written atomically (temporary name, then rename) to the
    GeoPackage ``out_gpkg``, layer ``uncertain_areas``. Returns ``write_uncertain_areas``'s summary."""
    from pathlib import Path

    from engine.data.rasters import atomic_output

    if Path(out_gpkg).suffix.lower() != ".gpkg":
        raise EngineError(f"uncertain areas {out_gpkg} must be a GeoPackage (.gpkg)",
                          hint="give a file name ending in .gpkg")
    with atomic_output(out_gpkg) as tmp:
        return write_uncertain_areas(uncertainty_tif, tmp, size_px, count, min_valid, cancelled)


class AreasCancelled(Exception):
    """Raised inside ``find_uncertain_areas`` when ``cancelled()`` turned true."""
