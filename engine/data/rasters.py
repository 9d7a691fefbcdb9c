"""Input rasters: several files on one grid, stacked band-wise, read window by window.

A pixel is valid when none of the selected bands holds its file's nodata value (or NaN) and
the file's dataset mask (an alpha band, a GDAL internal or .msk mask) does not mark it invalid:
an RGBA or masked GeoTIFF's transparent pixels are nodata. An alpha band stays a band index
like any other (band selection is unchanged); only its effect on validity is new.
Reads are boundless: a window reaching past the raster edge comes back padded with invalid
pixels, so tiles at the edges need no special case.
"""
from __future__ import annotations

import contextlib
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import CRSError, RasterioIOError
from rasterio.windows import Window

from engine.protocol import EngineError

METRES_PER_DEGREE = 111_320.0  # of latitude, and of longitude at the equator


@dataclass(frozen=True)
class Grid:
    """The pixel grid every output is written on: CRS, transform and size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @classmethod
    def of(cls, ds) -> "Grid":
        return cls(ds.crs, ds.transform, ds.width, ds.height)

    def same_as(self, other: "Grid", tol: float = 1e-6) -> bool:
        return (self.width == other.width and self.height == other.height
                and self.crs == other.crs and self.transform.almost_equals(other.transform, tol))

    def describe(self) -> str:
        crs = self.crs.to_string() if self.crs else "no CRS"
        t = self.transform
        return f"{self.width}x{self.height} px, {crs}, origin ({t.c:.6g}, {t.f:.6g}), pixel ({t.a:.6g}, {t.e:.6g})"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)

    def pixel_size_m(self) -> float | None:
        """Side of a pixel in metres, roughly (degrees converted at the grid's centre latitude);
        None without a CRS or with units that are not lengths."""
        t = self.transform
        sx, sy = math.hypot(t.a, t.d), math.hypot(t.b, t.e)
        if self.crs is None:
            return None
        if self.crs.is_geographic:
            lat = (t * (self.width / 2, self.height / 2))[1]
            return math.sqrt(sx * sy * math.cos(math.radians(lat))) * METRES_PER_DEGREE
        try:
            return math.sqrt(sx * sy) * self.crs.linear_units_factor[1]
        except CRSError:
            return None


def open_raster(path: str | os.PathLike, what: str = "raster"):
    """Open a raster with an error that names the file and says what to do."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{what} file not found: {path}", hint="check the path and that the file exists")
    try:
        ds = rasterio.open(path)
    except RasterioIOError as exc:
        if path.is_dir():  # GDAL opens some folders (e.g. ArcInfo grids): only a failure is an error
            raise EngineError(f"{what} {path} is a folder, not a raster file",
                              hint="give the raster file itself (e.g. a .tif inside that folder)") from None
        if not os.access(path, os.R_OK):
            raise EngineError(f"cannot read {what} {path}: permission denied",
                              hint="make the file readable for your user (its permissions), or copy it "
                                   "somewhere readable") from None
        raise EngineError(f"cannot read {what} {path}: {exc}",
                          hint="give a raster file GDAL can read (e.g. a GeoTIFF)") from None
    if ds.count == 0:
        ds.close()
        raise EngineError(f"{what} {path.name} has no bands ({path})",
                          hint="give a raster with at least one band (a VRT must list its bands)")
    return ds


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """Refuse, before any work, an output that could not be written: its first existing parent
    is a file, or a folder without write permission; or a file output that is an existing folder.
    (Missing folders are created when the output is written.)"""
    path = Path(path).absolute()
    if not folder and path.is_dir():
        raise EngineError(f"cannot write {what} {path}: {path.name} is an existing folder",
                          hint=f"give {what} a file name (e.g. {path / 'result.tif'})")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise EngineError(f"cannot write {what} {path}: {parent.name} ({parent}) is a file, not a folder",
                          hint=f"choose {what} in a folder (not under the file {parent.name})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EngineError(f"cannot write {what} {path}: the folder {parent} is not writable",
                          hint="choose a folder you can write to, or change the folder's permissions")


def parse_band_list(text: str | None) -> list[int] | None:
    """``"1,2,5-7"`` → [1, 2, 5, 6, 7] (1-based); None/empty → None (all bands)."""
    if text is None or str(text).strip() == "":
        return None
    bands: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                bands.extend(range(lo, hi + 1))
            else:
                bands.append(int(part))
        except ValueError:
            raise EngineError(f"bad band list {text!r}", hint="use 1-based band numbers like 1,2,3 or 2-7") from None
    return bands


class RasterStack:
    """One or more rasters on the same grid, seen as one multi-band image.

    ``bands`` are 1-based indices into the concatenation of all files' bands, in order.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], bands: Sequence[int] | None = None):
        if not paths:
            raise EngineError("no input image given", hint="pass at least one --image")
        self.paths = [Path(p) for p in paths]
        self._datasets = [open_raster(p, "image") for p in self.paths]
        first = self._datasets[0]
        self.grid = Grid.of(first)
        for path, ds in zip(self.paths[1:], self._datasets[1:]):
            other = Grid.of(ds)
            if not other.same_as(self.grid):
                self.close()
                raise EngineError(
                    f"image {path.name} is not on the grid of {self.paths[0].name}: "
                    f"{other.describe()} vs {self.grid.describe()}",
                    hint="stack only rasters with the same CRS, pixel size, extent and size "
                         "(resample them first, e.g. with gdalwarp or QGIS 'Align rasters')")
        # (dataset index, band number in that dataset) for every band of the stack
        all_bands = [(i, b) for i, ds in enumerate(self._datasets) for b in range(1, ds.count + 1)]
        self.band_indices = list(bands) if bands else list(range(1, len(all_bands) + 1))
        for b in self.band_indices:
            if not 1 <= b <= len(all_bands):
                self.close()
                raise EngineError(
                    f"band {b} is out of range: the image stack ({', '.join(p.name for p in self.paths)}) "
                    f"has {len(all_bands)} band(s)",
                    hint=f"choose bands between 1 and {len(all_bands)}")
        self._sources = [all_bands[b - 1] for b in self.band_indices]
        self.count = len(self._sources)
        self.band_names = []
        self.nodata = []
        for i, b in self._sources:
            ds = self._datasets[i]
            self.band_names.append((ds.descriptions[b - 1] or "").strip())
            self.nodata.append(ds.nodatavals[b - 1])
        self.dtype = np.result_type(*[self._datasets[i].dtypes[b - 1] for i, b in self._sources])
        # selected bands whose validity comes from a dataset mask (alpha band, internal/.msk
        # mask), not only from the nodata value: read_masks is read only for those
        self._masked = {(i, b) for i, b in self._sources
                        if _has_dataset_mask(self._datasets[i].mask_flag_enums[b - 1])}

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(data float32 [C, h, w], valid bool [h, w]) for a window; outside the raster is invalid.

        Only the part inside the raster is read (rasterio's boundless mode would go through a
        VRT on every call); the rest stays zero and invalid."""
        h, w = int(window.height), int(window.width)
        r, c = int(window.row_off), int(window.col_off)
        data = np.zeros((self.count, h, w), np.float32)
        valid = np.zeros((h, w), bool)
        r0, r1 = max(r, 0), min(r + h, self.grid.height)
        c0, c1 = max(c, 0), min(c + w, self.grid.width)
        if r1 <= r0 or c1 <= c0:
            return data, valid
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        rows, cols = slice(r0 - r, r1 - r), slice(c0 - c, c1 - c)
        ok = np.ones((r1 - r0, c1 - c0), bool)
        by_file: dict[int, list[tuple[int, int]]] = {}
        for k, (i, b) in enumerate(self._sources):
            by_file.setdefault(i, []).append((k, b))
        for i, items in by_file.items():
            ds = self._datasets[i]
            arr = ds.read([b for _, b in items], window=inner)
            per_dataset = False
            for k, b in items:
                if (i, b) in self._masked and not per_dataset:
                    ok &= ds.read_masks(b, window=inner) != 0
                    per_dataset = MaskFlags.per_dataset in ds.mask_flag_enums[b - 1]  # one read suffices
            for (k, b), band in zip(items, arr):
                nd = ds.nodatavals[b - 1]
                band = band.astype(np.float32, copy=False)
                if nd is not None and not np.isnan(nd):
                    ok &= band != nd
                ok &= np.isfinite(band)
                data[k, rows, cols] = band
        valid[rows, cols] = ok
        data[:, ~valid] = 0.0
        return data, valid

    @property
    def pixel_bytes(self) -> int:
        """Bytes of one pixel of the selected bands as stored in the files."""
        return sum(np.dtype(self._datasets[i].dtypes[b - 1]).itemsize for i, b in self._sources)

    @property
    def all_band_names(self) -> list[str]:
        """Descriptions of every band of the files, selected or not, in stack order."""
        return [(d or "").strip() for ds in self._datasets for d in ds.descriptions]

    def sample(self, size: int = 256, per_axis: int = 3) -> np.ndarray:
        """Valid pixel values [C, N] from up to ``per_axis``² windows spread over the raster:
        a cheap look at the values without reading it all."""
        def starts(n):
            return sorted({int(v) for v in np.linspace(0, max(n - size, 0), per_axis)})
        values = []
        for row in starts(self.grid.height):
            for col in starts(self.grid.width):
                data, valid = self.read(Window(col, row, size, size))
                values.append(data[:, valid])
        return np.concatenate(values, axis=1)

    def value_warnings(self, size: int = 256, per_axis: int = 3, saturated_share: float = 0.01) -> list[str]:
        """Warnings about the values of the windows ``sample`` looks at, one per file and kind:
        NaN or infinite values in floating-point bands (read as nodata everywhere: never trained
        on, never predicted) and uint16 bands where at least ``saturated_share`` of the pixels
        are 65535 (saturated, or a nodata value the file does not declare)."""
        nonfinite: dict[int, list[str]] = {}
        saturated: dict[int, dict[str, list[int]]] = {}
        H, W = self.grid.height, self.grid.width
        rows = sorted({int(v) for v in np.linspace(0, max(H - size, 0), per_axis)})
        cols = sorted({int(v) for v in np.linspace(0, max(W - size, 0), per_axis)})
        for k, (i, b) in enumerate(self._sources):
            ds, dtype = self._datasets[i], np.dtype(self._datasets[i].dtypes[b - 1])
            nd = ds.nodatavals[b - 1]
            floating = np.issubdtype(dtype, np.floating)
            if not floating and (dtype != np.uint16 or nd == 65535):
                continue
            name = f"band {b}" + (f" ({self.band_names[k]})" if self.band_names[k] else "")
            bad = top = total = 0
            for row in rows:
                for col in cols:
                    band = ds.read(b, window=Window(col, row, min(size, W - col), min(size, H - row)))
                    if floating:
                        bad += int((np.isinf(band) if nd is not None and np.isnan(nd) else ~np.isfinite(band)).sum())
                    else:
                        counted = band != nd if nd is not None else np.ones(band.shape, bool)
                        top += int((band[counted] == 65535).sum())
                        total += int(counted.sum())
            if bad:
                nonfinite.setdefault(i, []).append(name)
            if total and top >= saturated_share * total:
                saturated.setdefault(i, {})[name] = (top, total)
        out = []
        for i, names in nonfinite.items():
            out.append(f"image {self.paths[i].name}: {', '.join(names)} hold(s) NaN or infinite values: those "
                       "pixels are read as nodata (not trained on, not predicted)")
        for i, found in saturated.items():
            share = ", ".join(f"{name} {top / total:.0%}" for name, (top, total) in found.items())
            out.append(f"image {self.paths[i].name}: many pixels are 65535, the largest uint16 value ({share} of "
                       "the sampled pixels): saturated, or a nodata value the file does not declare. If it is "
                       "nodata, set the raster's nodata to 65535; saturated pixels carry no information")
        return out

    def windows(self, size: int = 1024) -> Iterator[Window]:
        """Blocks covering the whole raster (for statistics and checks)."""
        for row in range(0, self.grid.height, size):
            for col in range(0, self.grid.width, size):
                yield Window(col, row, min(size, self.grid.width - col), min(size, self.grid.height - row))

    def check_has_data(self) -> None:
        """Refuse an image where every pixel is nodata."""
        for window in self.windows():
            _, valid = self.read(window)
            if valid.any():
                return
        raise EngineError(
            f"image {', '.join(p.name for p in self.paths)} has no valid pixels: every pixel is nodata "
            f"in at least one selected band",
            hint="check the band selection and the rasters' nodata value")

    def close(self) -> None:
        for ds in self._datasets:
            ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _has_dataset_mask(flags) -> bool:
    """True when a band's validity is a mask to read (alpha or per-dataset mask), False when it is
    all valid or given by the nodata value alone (checked by value, much cheaper)."""
    return not (MaskFlags.all_valid in flags or MaskFlags.nodata in flags)


def block_cache(width: int, rows: int, bytes_per_pixel: int):
    """A ``rasterio.Env`` whose GDAL block cache holds ``rows`` full-width rows of a pass over a
    raster ``width`` pixels wide (32 MiB to 1 GiB): the blocks a strip shares with the next one,
    and the output blocks being filled (a block evicted half-written is written twice, and a
    compressed GeoTIFF grows with each rewrite). GDAL's default, 5 % of the machine's memory,
    keeps every block a scene-wide pass reads: memory would grow with the raster."""
    return rasterio.Env(GDAL_CACHEMAX=int(min(max(rows * width * bytes_per_pixel, 32 * 2**20), 2**30)))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing half-written is ever left where a valid output would be.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, not a created file: some drivers (GeoPackage) refuse an existing file. The
    # PID lets the next job on this output remove it if this one is killed (engine.reliability).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, Path(str(tmp) + ".aux.xml")):
            if leftover.exists():
                leftover.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def colormap(classes: Sequence[dict]) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table entries from classes with ``#rrggbb`` colours."""
    table = {}
    for c in classes:
        hexcol = c["colour"].lstrip("#")
        table[int(c["value"])] = (int(hexcol[0:2], 16), int(hexcol[2:4], 16), int(hexcol[4:6], 16), 255)
    return table
