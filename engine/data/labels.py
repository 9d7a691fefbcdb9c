"""Labels on the image grid: a class raster (resampled when its grid differs) or polygons with
a class field (rasterised, reprojected when CRSs differ), as a mask of class indices.

Classes are ``{"value": int, "name": str, "colour": "#rrggbb"}`` dicts; the mask holds the
index of the class in that list, and -1 where there is no label.

The mask is kept only where the labels are: a few polygons on a 50 000 px mosaic must not cost a
full-grid array. A label raster is scanned strip by strip and polygons are rasterised only in
the blocks their bounding boxes touch; what is kept is a list of disjoint windows (each inside
one ``LABEL_BLOCK`` block of the grid, cropped to its labelled pixels).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from engine.data.rasters import Grid, block_cache, open_raster
from engine.protocol import EngineError, Reporter

NO_LABEL = -1
VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".kml", ".gml", ".sqlite"}
# A qualitative palette (ColorBrewer Paired/Set1 mix) for classes without a colour of their own.
PALETTE = ["#1f78b4", "#33a02c", "#e31a1c", "#ff7f00", "#6a3d9a", "#b15928", "#a6cee3", "#b2df8a",
           "#fb9a99", "#fdbf6f", "#cab2d6", "#ffff99", "#8dd3c7", "#bebada", "#80b1d3", "#fccde5"]


LABEL_BLOCK = 512  # side of the grid blocks labels are scanned, rasterised and kept in


@dataclass
class LabelWindow:
    """Class indices (NO_LABEL where unlabelled) of one window of the image grid."""

    row: int
    col: int
    index: np.ndarray  # int16 [h, w]

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.index.shape[1], self.index.shape[0])


@dataclass
class LabelMask:
    """Class indices on a ``height`` x ``width`` grid, held as disjoint ``windows``: every pixel
    outside them is unlabelled. Training targets (train/validation) share this form."""

    windows: list[LabelWindow]
    classes: list[dict]
    height: int
    width: int

    @classmethod
    def of_array(cls, index: np.ndarray, classes: Sequence[dict] = ()) -> "LabelMask":
        """One window covering the whole grid (a label array already in memory)."""
        return cls([LabelWindow(0, 0, np.asarray(index))], list(classes), *np.shape(index))

    def with_indices(self, indices: Sequence[np.ndarray]) -> "LabelMask":
        """The same windows holding other class indices (e.g. a training target)."""
        return LabelMask([LabelWindow(w.row, w.col, i) for w, i in zip(self.windows, indices)],
                         self.classes, self.height, self.width)

    def on_classes(self, classes: Sequence[dict]) -> "LabelMask":
        """The same labels indexing ``classes`` (every value of this mask's classes among them):
        e.g. the classes of a model training continues from, some of which the new labels lack."""
        position = {int(c["value"]): i for i, c in enumerate(classes)}
        lookup = np.array([position[int(c["value"])] for c in self.classes] + [NO_LABEL], np.int16)
        # index -1 (no label) picks the last entry: NO_LABEL
        return LabelMask([LabelWindow(w.row, w.col, lookup[w.index]) for w in self.windows],
                         list(classes), self.height, self.width)

    @property
    def labelled(self) -> int:
        return sum(int((w.index >= 0).sum()) for w in self.windows)

    def class_counts(self) -> np.ndarray:
        """Labelled pixels per class."""
        counts = np.zeros(len(self.classes), np.int64)
        for w in self.windows:
            counts += np.bincount(w.index[w.index >= 0].ravel(), minlength=len(self.classes))[:len(counts)]
        return counts

    @cached_property
    def bounds(self) -> np.ndarray:
        """[N, 4] (row0, col0, row1, col1) of the windows."""
        return np.array([(w.row, w.col, w.row + w.index.shape[0], w.col + w.index.shape[1])
                         for w in self.windows], np.int64).reshape(-1, 4)

    def crop(self, window: Window) -> np.ndarray:
        """int16 [h, w] class indices of any window of the grid (NO_LABEL outside the labels)."""
        r, c = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        out = np.full((h, w), NO_LABEL, np.int16)
        b = self.bounds
        for k in np.flatnonzero((b[:, 0] < r + h) & (b[:, 2] > r) & (b[:, 1] < c + w) & (b[:, 3] > c)):
            lw = self.windows[k]
            r0, c0, r1, c1 = max(r, b[k, 0]), max(c, b[k, 1]), min(r + h, b[k, 2]), min(c + w, b[k, 3])
            out[r0 - r:r1 - r, c0 - c:c1 - c] = lw.index[r0 - lw.row:r1 - lw.row, c0 - lw.col:c1 - lw.col]
        return out

    @property
    def index(self) -> np.ndarray:
        """The whole grid as one array: only for small rasters (training and evaluation work by
        window and never build it)."""
        return self.crop(Window(0, 0, self.width, self.height))


def as_labels(index) -> LabelMask:
    """A ``LabelMask`` as it is, or a label array as one window covering its grid."""
    return index if isinstance(index, LabelMask) else LabelMask.of_array(index)


def labelled_box(labelled: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, cols) slices of the bounding box of the True pixels; None when there are none."""
    rows, cols = np.flatnonzero(labelled.any(axis=1)), np.flatnonzero(labelled.any(axis=0))
    if not len(rows):
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def label_window(row: int, col: int, index: np.ndarray) -> LabelWindow | None:
    """The window at (row, col) cropped to its labelled pixels; None when it holds none."""
    box = labelled_box(index >= 0)
    if box is None:
        return None
    rows, cols = box
    return LabelWindow(row + rows.start, col + cols.start, index[rows, cols].copy())


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
                ignore_value: int | None = None, classes: Sequence[dict] | None = None,
                reporter: Reporter | None = None, target: str = "the image") -> LabelMask:
    """Labels from a class raster or a vector file, on ``grid``.

    ``ignore_value``: a label value that means "no label" (e.g. -1 in Sen1Floods11).
    ``classes``: optional names/colours; for a text class field, names map to values.
    ``reporter`` gets the warnings (features skipped); ``target`` names the raster whose grid
    ``grid`` is in messages (e.g. "the prediction pred.tif").
    """
    path = Path(path)
    if not path.exists():
        raise EngineError(f"labels file not found: {path}", hint="check the --labels path")
    if is_vector(path):
        mask = _vector_labels(path, grid, field, classes, reporter or Reporter("quiet"))
    else:
        mask = _raster_labels(path, grid, ignore_value, classes, target)
    if mask.labelled == 0:
        raise EngineError(f"labels {path.name} do not overlap {target}: no labelled pixel falls on it",
                          hint=f"check that the labels and {target} cover the same area (and their CRS)")
    return mask


def _raster_labels(path: Path, grid: Grid, ignore_value, classes, target: str = "the image") -> LabelMask:
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
            with block_cache(grid.width, 4 * LABEL_BLOCK, np.dtype(ds.dtypes[0]).itemsize):
                found, present = _scan_label_raster(ds, Window(0, 0, grid.width, grid.height), nodata,
                                                    ignore_value)
        else:
            if ds.crs is None or grid.crs is None:
                raise EngineError(f"labels {path.name} are on another grid than {target}, and "
                                  f"{'the labels have' if ds.crs is None else f'{target} has'} no CRS",
                                  hint=f"give labels on the grid of {target}, or georeferenced rasters")
            left, bottom, right, top = transform_bounds(ds.crs, grid.crs, *ds.bounds)
            gl, gb, gr, gt = grid.bounds
            if right <= gl or left >= gr or top <= gb or bottom >= gt:
                raise EngineError(f"labels {path.name} do not overlap {target}",
                                  hint=f"check that the labels and {target} cover the same area (and their CRS)")
            # Nearest neighbour: class numbers must not be averaged. The alpha band marks the
            # pixels the labels cover, so no class value (0 included) stands in for "outside".
            # Only the part of the image grid under the labels' bounds is scanned.
            with block_cache(grid.width, 4 * LABEL_BLOCK, np.dtype(ds.dtypes[0]).itemsize), \
                    WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width,
                              height=grid.height, resampling=Resampling.nearest, add_alpha=True) as vrt:
                region = _pixel_region((left, bottom, right, top), grid)
                found, present = _scan_label_raster(vrt, region, nodata, ignore_value, covered=True)
    cls = make_classes(present, classes, colours)
    lookup = {c["value"]: i for i, c in enumerate(cls)}
    windows = []
    for row, col, values, valid in found:
        index = np.full(values.shape, NO_LABEL, np.int16)
        for v, i in lookup.items():
            index[(values == v) & valid] = i
        windows.append(LabelWindow(row, col, index))
    return LabelMask(windows, cls, grid.height, grid.width)


def _pixel_region(bounds, grid: Grid) -> Window:
    """The window of the grid (whole pixels and one more around, clipped to the grid) covering
    ``bounds`` (left, bottom, right, top in its CRS); empty when they miss the grid."""
    left, bottom, right, top = bounds
    inverse = ~grid.transform
    cols, rows = zip(*(inverse @ (x, y) for x in (left, right) for y in (bottom, top)))
    r0, c0 = max(int(np.floor(min(rows))) - 1, 0), max(int(np.floor(min(cols))) - 1, 0)
    r1 = min(int(np.ceil(max(rows))) + 1, grid.height)
    c1 = min(int(np.ceil(max(cols))) + 1, grid.width)
    return Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0))


def _block_starts(start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) cut at the multiples of LABEL_BLOCK."""
    edges = [start, *range((start // LABEL_BLOCK + 1) * LABEL_BLOCK, stop, LABEL_BLOCK), stop]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _scan_label_raster(src, region: Window, nodata, ignore_value, covered: bool = False):
    """Read ``region`` of a label raster on the image grid one strip of LABEL_BLOCK rows at a
    time; keep, per block of the strip, the labelled pixels' bounding window (raw values and
    validity). Returns ([(row, col, values, valid)], label values present)."""
    r0, c0 = int(region.row_off), int(region.col_off)
    r1, c1 = r0 + int(region.height), c0 + int(region.width)
    found, present = [], set()
    if c1 <= c0:
        return found, present
    for top, bottom in _block_starts(r0, r1):
        strip = Window(c0, top, c1 - c0, bottom - top)
        values = src.read(1, window=strip)
        valid = src.read_masks(1, window=strip) > 0 if covered else np.ones(values.shape, bool)
        if nodata is not None:
            valid &= values != nodata
        if ignore_value is not None:
            valid &= values != ignore_value
        if not valid.any():
            continue
        present.update(np.unique(values[valid]).tolist())
        for left, right in _block_starts(c0, c1):
            box = labelled_box(valid[:, left - c0:right - c0])
            if box is not None:
                rows, cols = box[0], slice(box[1].start + left - c0, box[1].stop + left - c0)
                found.append((top + rows.start, c0 + cols.start, values[rows, cols].copy(), valid[rows, cols].copy()))
    return found, present


def _usable(geom) -> bool:
    """Whether a GeoJSON-like geometry can be burnt into the grid: a known type with coordinates,
    all finite, and polygon rings closed with at least four positions. (Self-intersections are
    burnt as they are.)"""
    if geom is None:
        return False

    def get(obj, key):
        return getattr(obj, key, None) if not isinstance(obj, dict) else obj.get(key)

    def positions(seq, least):
        try:
            arr = np.asarray(seq, dtype=float)
        except (TypeError, ValueError):
            return False
        return arr.ndim == 2 and arr.shape[0] >= least and arr.shape[1] >= 2 and bool(np.isfinite(arr).all())

    def ring(seq):
        return positions(seq, 4) and tuple(seq[0][:2]) == tuple(seq[-1][:2])

    kind, coords = get(geom, "type"), get(geom, "coordinates")
    if kind == "GeometryCollection":
        parts = get(geom, "geometries") or []
        return bool(parts) and all(_usable(p) for p in parts)
    if not coords:
        return False
    try:
        if kind == "Point":
            return positions([coords], 1)
        if kind in ("LineString", "MultiPoint"):
            return positions(coords, 2 if kind == "LineString" else 1)
        if kind == "MultiLineString":
            return all(positions(line, 2) for line in coords)
        if kind == "Polygon":
            return all(ring(r) for r in coords)
        if kind == "MultiPolygon":
            return all(p and all(ring(r) for r in p) for p in coords)
    except (TypeError, IndexError):
        return False
    return False


def _vector_labels(path: Path, grid: Grid, field: str | None, classes, reporter: Reporter) -> LabelMask:
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
        broken = unvalued = 0
        for feat in src:
            geom, value = feat.geometry, feat.properties[field]
            if value is None:
                unvalued += 1
                continue
            if not _usable(geom):
                broken += 1
                continue
            if need_reproject:
                geom = transform_geom(src_crs, grid.crs.to_wkt(), geom)
            records.append((geom, value))
    skipped = [f"{broken} feature(s) with an empty or invalid geometry" if broken else "",
               f"{unvalued} feature(s) without a {field!r} value" if unvalued else ""]
    skipped = " and ".join(s for s in skipped if s)
    if not records:
        raise EngineError(f"vector labels {path.name} have no usable feature"
                          + (f": {skipped}" if skipped else " (the layer is empty)"),
                          hint=f"fix the geometries (e.g. QGIS 'Fix geometries'), fill the {field!r} field, or "
                               "give other labels")
    if skipped:
        reporter.warning(f"vector labels {path.name}: skipped {skipped}; {len(records)} feature(s) used")
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
    shapes = [(geom, lookup[v]) for (geom, _), v in zip(records, values)]
    return LabelMask(_rasterise_by_block(shapes, grid), cls, grid.height, grid.width)


def _rasterise_by_block(shapes: list, grid: Grid) -> list[LabelWindow]:
    """Rasterise (geometry, class index) pairs only in the LABEL_BLOCK blocks of the grid their
    bounding boxes touch, each block with its own transform (later shapes over earlier ones,
    as one rasterisation of the whole grid would)."""
    from rasterio.features import bounds as geometry_bounds

    boxes, in_block = {}, {}
    for k, (geom, _) in enumerate(shapes):
        box = _pixel_region(geometry_bounds(geom), grid)
        if box.width <= 0 or box.height <= 0:
            continue  # outside the image
        boxes[k] = r0, c0, r1, c1 = box.row_off, box.col_off, box.row_off + box.height, box.col_off + box.width
        for top, bottom in _block_starts(r0, r1):
            for left, right in _block_starts(c0, c1):
                in_block.setdefault((top // LABEL_BLOCK, left // LABEL_BLOCK), []).append(k)
    windows = []
    for (br, bc), ks in sorted(in_block.items()):
        # the part of the block the shapes' boxes cover
        r0 = max(br * LABEL_BLOCK, min(boxes[k][0] for k in ks))
        c0 = max(bc * LABEL_BLOCK, min(boxes[k][1] for k in ks))
        r1 = min((br + 1) * LABEL_BLOCK, max(boxes[k][2] for k in ks))
        c1 = min((bc + 1) * LABEL_BLOCK, max(boxes[k][3] for k in ks))
        window = Window(c0, r0, c1 - c0, r1 - r0)
        index = rasterize([shapes[k] for k in ks], out_shape=(r1 - r0, c1 - c0),
                          transform=window_transform(window, grid.transform), fill=NO_LABEL, dtype="int16")
        found = label_window(r0, c0, index)
        if found is not None:
            windows.append(found)
    return windows
