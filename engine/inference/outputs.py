"""The outputs ``predict`` writes besides the class raster: per-pixel uncertainty, polygons,
cloud-optimised GeoTIFF layout with overviews, and a QGIS style (``.qml``) beside the class raster.

All of them are written to temporary names and renamed only when the whole prediction succeeded
(``predict`` wraps them in ``atomic_output``); this module only fills the temporary paths.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.features import shapes

from engine.protocol import EngineError

UNCERTAINTY_NODATA = 255
POLYGON_LAYER = "predictions"


def check_output_options(polygons=None, min_area: float | None = None, simplify: float | None = None) -> None:
    """Refuse bad output options before anything is predicted."""
    if polygons is not None and Path(polygons).suffix.lower() != ".gpkg":
        raise EngineError(f"--polygons {polygons} must be a GeoPackage (.gpkg)",
                          hint="give --polygons a name ending in .gpkg")
    if polygons is None and (min_area is not None or simplify is not None):
        raise EngineError("--min-area and --simplify apply to polygons, but no --polygons output was asked for",
                          hint="add --polygons out.gpkg, or drop --min-area/--simplify")
    for option, value in (("min-area", min_area), ("simplify", simplify)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise EngineError(f"--{option} {value} must be a number ≥ 0 (in the raster's CRS units)",
                              hint=f"give --{option} 0 or more, or leave it out")
    if simplify:
        try:
            import shapely  # noqa: F401
        except ImportError:
            raise EngineError("--simplify needs the shapely package, which is not installed in the engine's "
                              "environment", hint="pip install shapely in the engine's environment, or drop "
                              "--simplify (polygons then follow the pixel edges exactly)") from None


def style_path(out: str | os.PathLike) -> Path:
    """The sidecar style QGIS loads automatically with the raster: same name, ``.qml``."""
    return Path(out).with_suffix(".qml")


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of class probabilities ``p`` (K, ...) divided by its maximum log K: 0 for a sure
    pixel, 1 when all classes are equally likely. One class: always 0."""
    K = p.shape[0]
    if K < 2:
        return np.zeros(p.shape[1:], np.float32)
    q = np.clip(p, 1e-12, 1.0)
    q = q / q.sum(axis=0, keepdims=True)  # blended probabilities, renormalised against rounding
    return np.clip(-(q * np.log(q)).sum(axis=0) / math.log(K), 0.0, 1.0)


def uncertainty_uint8(p: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Normalised entropy × 100 as uint8 (0–100), ``UNCERTAINTY_NODATA`` where not ``ok``."""
    u = np.round(normalised_entropy(p) * 100).astype(np.uint8)
    u[~ok] = UNCERTAINTY_NODATA
    return u


def to_cog(src: str | os.PathLike, dst: str | os.PathLike, resampling: str) -> None:
    """Copy the streamed GeoTIFF ``src`` to ``dst`` with GDAL's COG driver: 256-pixel tiles,
    deflate, internal overviews (halving until one fits a tile) computed with ``resampling``
    (``NEAREST`` for classes, ``AVERAGE`` for percentages), overviews before the full
    resolution data. Colour table, nodata, tags and band descriptions are kept."""
    rasterio.shutil.copy(str(src), str(dst), driver="COG", compress="DEFLATE", blocksize=256,
                         overview_resampling=resampling, bigtiff="IF_SAFER")


def write_style(path: str | os.PathLike, classes: list[dict]) -> None:
    """A QGIS layer style: paletted renderer on band 1 with the card's class values, names and colours."""
    qgis = ET.Element("qgis", version="3.28.0", styleCategories="Symbology")
    pipe = ET.SubElement(qgis, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1",
                             nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for c in classes:
        ET.SubElement(palette, "paletteEntry", value=str(int(c["value"])), color=c["colour"].lower(),
                      alpha="255", label=str(c["name"]))
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0")
    ET.SubElement(pipe, "rasterresampler", maxOversample="2")
    ET.SubElement(qgis, "blendMode").text = "0"
    ET.indent(qgis)
    with open(path, "wb") as f:
        f.write(b"<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n")
        f.write(ET.tostring(qgis, encoding="utf-8"))
        f.write(b"\n")


def ring_area(ring) -> float:
    """Area of a closed ring of (x, y) coordinates (shoelace formula), always ≥ 0."""
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:, 0] - xy[0, 0], xy[:, 1] - xy[0, 1]  # relative coordinates: no cancellation on big offsets
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2


def polygon_area(geometry: dict) -> float:
    """Area of a GeoJSON Polygon (outer ring minus holes) in CRS units²."""
    rings = geometry["coordinates"]
    return ring_area(rings[0]) - sum(ring_area(r) for r in rings[1:])


def write_polygons(raster: str | os.PathLike, path: str | os.PathLike, classes: list[dict],
                   min_area: float | None = None, simplify: float | None = None, cancelled=lambda: False) -> dict:
    """Vectorise the finished class raster ``raster`` into the GeoPackage ``path`` (layer
    ``predictions``): one polygon per connected region of one class (4-connected), fields
    ``class_value``, ``class_name`` and ``area`` (CRS units², of the region's pixels, before any
    simplification). Regions smaller than ``min_area`` are dropped; ``simplify`` (CRS units)
    simplifies each polygon with shapely, keeping it valid.

    The raster is handed to GDAL's polygonizer as a band (``rasterio.band``), not as an array:
    GDAL reads it one scanline at a time and keeps only the polygons still open, so the whole
    raster is never in memory and there are no seams (vectorising strips or blocks separately
    would cut every region that crosses a strip edge). Returns counts of written and dropped
    polygons."""
    import fiona

    names = {int(c["value"]): str(c["name"]) for c in classes}
    simplifier = None
    if simplify:
        from shapely.geometry import mapping, shape

        def simplifier(g):
            return mapping(shape(g).simplify(simplify, preserve_topology=True))

    schema = {"geometry": "Polygon",
              "properties": {"class_value": "int", "class_name": "str", "area": "float"}}
    written = dropped = 0
    with rasterio.open(raster) as src:
        nodata = src.nodata
        crs_wkt = src.crs.to_wkt() if src.crs else ""
        with fiona.open(path, "w", driver="GPKG", layer=POLYGON_LAYER, schema=schema, crs_wkt=crs_wkt) as dst:
            batch = []
            for geometry, value in shapes(rasterio.band(src, 1), connectivity=4, transform=src.transform):
                if nodata is not None and value == nodata:
                    continue
                area = polygon_area(geometry)
                if min_area and area < min_area:
                    dropped += 1
                    continue
                if simplifier:
                    geometry = simplifier(geometry)
                    if geometry["type"] != "Polygon":  # simplified to nothing
                        dropped += 1
                        continue
                batch.append(fiona.Feature(geometry=fiona.Geometry.from_dict(geometry),
                                           properties={"class_value": int(value),
                                                       "class_name": names.get(int(value), str(int(value))),
                                                       "area": area}))
                if len(batch) == 1000:
                    if cancelled():
                        raise _PolygonsCancelled
                    dst.writerecords(batch)
                    written += len(batch)
                    batch = []
            if batch:
                dst.writerecords(batch)
                written += len(batch)
    return {"polygons": written, "dropped": dropped}


class _PolygonsCancelled(Exception):
    """Raised inside ``write_polygons`` when the reporter was cancelled; ``predict`` maps it to a cancel."""
