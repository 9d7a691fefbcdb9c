"""Small raster facts from GDAL (QGIS's own bindings): band names, grids."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    width: int
    height: int
    transform: tuple
    crs_wkt: str

    def same_as(self, other: "Grid", tolerance: float = 1e-6) -> bool:
        from osgeo import osr
        if (self.width, self.height) != (other.width, other.height):
            return False
        if any(abs(a - b) > tolerance * max(1.0, abs(a)) for a, b in zip(self.transform, other.transform)):
            return False
        if self.crs_wkt == other.crs_wkt:
            return True
        a, b = osr.SpatialReference(), osr.SpatialReference()
        if a.ImportFromWkt(self.crs_wkt) or b.ImportFromWkt(other.crs_wkt):
            return False
        return bool(a.IsSame(b))


def _open(path: str):
    from osgeo import gdal  # leave GDAL's global exception mode as QGIS set it
    try:
        return gdal.Open(str(path))
    except RuntimeError:
        return None


def band_descriptions(path: str) -> list[str]:
    """One entry per band: its description (e.g. 'BLUE'), or '' when unnamed."""
    ds = _open(path)
    if ds is None:
        return []
    return [(ds.GetRasterBand(i).GetDescription() or "").strip() for i in range(1, ds.RasterCount + 1)]


def grid(path: str) -> Grid | None:
    ds = _open(path)
    if ds is None:
        return None
    return Grid(ds.RasterXSize, ds.RasterYSize, tuple(ds.GetGeoTransform()), ds.GetProjection() or "")


def grid_problems(paths: list[str]) -> list[str]:
    """Messages for rasters not on the first raster's grid."""
    grids = [(p, grid(p)) for p in paths]
    problems = [f"Cannot read raster {p}" for p, g in grids if g is None]
    valid = [(p, g) for p, g in grids if g is not None]
    if valid:
        first_path, first = valid[0]
        for p, g in valid[1:]:
            if not g.same_as(first):
                problems.append(f"{p} is not on the same grid as {first_path} (size, pixel size, "
                                "origin and CRS must match); warp it first (Raster ▸ Projections ▸ Warp).")
    return problems
