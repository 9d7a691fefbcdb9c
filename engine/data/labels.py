"""Labels on the image grid: a class raster (resampled when its grid differs) or polygons with
a class field (rasterised, reprojected when CRSs differ), as a mask of class indices.

Classes are ``{"value": int, "name": str, "colour": "#rrggbb"}`` dicts; the mask holds the
index of the class in that list, and -1 where there is no label.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from engine.data.rasters import Grid, open_raster
from engine.protocol import EngineError

NO_LABEL = -1
VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".kml", ".gml", ".sqlite"}
# A qualitative palette (ColorBrewer Paired/Set1 mix) for classes without a colour of their own.
PALETTE = ["#1f78b4", "#33a02c", "#e31a1c", "#ff7f00", "#6a3d9a", "#b15928", "#a6cee3", "#b2df8a",
           "#fb9a99", "#fdbf6f", "#cab2d6", "#ffff99", "#8dd3c7", "#bebada", "#80b1d3", "#fccde5"]


@dataclass
class LabelMask:
    index: np.ndarray  # int16 [H, W]: class index, NO_LABEL where unlabelled
    classes: list[dict]

    @property
    def labelled(self) -> int:
        return int((self.index >= 0).sum())


def is_vector(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def load_classes_option(text: str | None) -> list[dict] | None:
    """``--classes``: a JSON list (or a path to one) of {value, name, colour}."""
    if not text:
        return None
    try:
        raw = Path(text).read_text() if Path(text).suffix == ".json" and Path(text).exists() else text
        classes = json.loads(raw)
        return [{"value": int(c["value"]), "name": str(c.get("name", c["value"])),
                 "colour": c.get("colour") or PALETTE[i % len(PALETTE)]} for i, c in enumerate(classes)]
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"bad --classes: {exc}",
                          hint='give a JSON list like [{"value": 1, "name": "water", "colour": "#1f78b4"}]') from None


def make_classes(values: Sequence[int], known: Sequence[dict] | None = None,
                 colours: dict[int, str] | None = None) -> list[dict]:
    """Class dicts for sorted values; names/colours from ``known`` first, then ``colours``."""
    by_value = {int(c["value"]): c for c in (known or [])}
    out = []
    for i, v in enumerate(sorted(int(x) for x in values)):
        k = by_value.get(v, {})
        out.append({"value": v, "name": k.get("name") or f"class {v}",
                    "colour": k.get("colour") or (colours or {}).get(v) or PALETTE[i % len(PALETTE)]})
    return out


def load_labels(path: str | os.PathLike, grid: Grid, field: str | None = None,
                ignore_value: int | None = None, classes: Sequence[dict] | None = None) -> LabelMask:
    """Labels from a class raster or a vector file, on ``grid``.

    ``ignore_value``: a label value that means "no label" (e.g. -1 in Sen1Floods11).
    ``classes``: optional names/colours; for a text class field, names map to values.
    """
    path = Path(path)
    if not path.exists():
        raise EngineError(f"labels file not found: {path}", hint="check the --labels path")
    if is_vector(path):
        mask = _vector_labels(path, grid, field, classes)
    else:
        mask = _raster_labels(path, grid, ignore_value, classes)
    if mask.labelled == 0:
        raise EngineError(f"labels {path.name} do not overlap the image: no labelled pixel falls on it",
                          hint="check that labels and image cover the same area (and their CRS)")
    return mask


def _raster_labels(path: Path, grid: Grid, ignore_value, classes) -> LabelMask:
    with open_raster(path, "labels") as ds:
        if ds.count < 1:
            raise EngineError(f"labels raster {path.name} has no band")
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise EngineError(f"labels raster {path.name} holds {ds.dtypes[0]} values, not class numbers",
                              hint="give an integer class raster (e.g. UInt8/Int16)")
        nodata = ds.nodata
        try:
            colours = {int(v): "#%02x%02x%02x" % tuple(c[:3]) for v, c in ds.colormap(1).items()}
        except ValueError:
            colours = {}
        tagged = ds.tags().get("GEOPEFT_CLASSES")  # names written by GeoPEFT (demo labels, predictions)
        if tagged and not classes:
            try:
                classes = load_classes_option(tagged)
            except EngineError:
                classes = None
        if Grid.of(ds).same_as(grid):
            values = ds.read(1)
            covered = np.ones(values.shape, bool)
        else:
            if ds.crs is None or grid.crs is None:
                raise EngineError(f"labels {path.name} are on another grid than the image and have no CRS",
                                  hint="give labels on the image grid, or georeferenced labels")
            left, bottom, right, top = transform_bounds(ds.crs, grid.crs, *ds.bounds)
            gl, gb, gr, gt = grid.bounds
            if right <= gl or left >= gr or top <= gb or bottom >= gt:
                raise EngineError(f"labels {path.name} do not overlap the image",
                                  hint="check that labels and image cover the same area (and their CRS)")
            # Nearest neighbour: class numbers must not be averaged. The alpha band marks the
            # pixels the labels cover, so no class value (0 included) stands in for "outside".
            with WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width,
                           height=grid.height, resampling=Resampling.nearest, add_alpha=True) as vrt:
                values = vrt.read(1)
                covered = vrt.read_masks(1) > 0
    invalid = ~covered
    if nodata is not None:
        invalid |= values == nodata
    if ignore_value is not None:
        invalid |= values == ignore_value
    present = np.unique(values[~invalid])
    cls = make_classes(present, classes, colours)
    index = np.full(values.shape, NO_LABEL, np.int16)
    lookup = {c["value"]: i for i, c in enumerate(cls)}
    for v, i in lookup.items():
        index[(values == v) & ~invalid] = i
    return LabelMask(index, cls)


def _vector_labels(path: Path, grid: Grid, field: str | None, classes) -> LabelMask:
    import fiona
    from fiona.transform import transform_geom

    try:
        src = fiona.open(path)
    except Exception as exc:  # fiona raises several driver-specific errors
        raise EngineError(f"cannot read vector labels {path}: {exc}",
                          hint="give a GeoPackage, GeoJSON or Shapefile") from None
    with src:
        fields = list(src.schema["properties"])
        if not field:
            raise EngineError(f"vector labels {path.name} need a class field",
                              hint=f"pass --label-field, one of: {', '.join(fields)}")
        if field not in fields:
            raise EngineError(f"field {field!r} not found in {path.name}",
                              hint=f"choose one of: {', '.join(fields)}")
        src_crs = src.crs
        need_reproject = bool(src_crs) and grid.crs is not None and \
            rasterio.crs.CRS.from_user_input(src_crs) != grid.crs
        records = []
        for feat in src:
            geom, value = feat.geometry, feat.properties[field]
            if geom is None or value is None:
                continue
            if need_reproject:
                geom = transform_geom(src_crs, grid.crs.to_wkt(), geom)
            records.append((geom, value))
    if not records:
        raise EngineError(f"vector labels {path.name} have no features with a {field!r} value")
    raw_values = [v for _, v in records]
    if all(isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer())
           for v in raw_values):
        values = [int(v) for v in raw_values]
        cls = make_classes(set(values), classes)
    else:
        # Text classes: names from the field; values from --classes when given, else 1..K.
        names = sorted({str(v) for v in raw_values})
        by_name = {c["name"]: c for c in (classes or [])}
        cls = []
        for i, name in enumerate(names):
            known = by_name.get(name, {})
            cls.append({"value": int(known.get("value", i + 1)), "name": name,
                        "colour": known.get("colour") or PALETTE[i % len(PALETTE)]})
        value_of = {c["name"]: c["value"] for c in cls}
        values = [value_of[str(v)] for v in raw_values]
        cls = sorted(cls, key=lambda c: c["value"])
    lookup = {c["value"]: i for i, c in enumerate(cls)}
    shapes = ((geom, lookup[v]) for (geom, _), v in zip(records, values))
    index = rasterize(shapes, out_shape=(grid.height, grid.width), transform=grid.transform,
                      fill=NO_LABEL, dtype="int16")
    return LabelMask(index, cls)
