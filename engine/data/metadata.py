"""Acquisition dates and scene location: the inputs of the Prithvi -TL temporal and location
encoders (``train --metadata``).

- The date of each frame comes from ``--date`` (one per frame) or else from its raster's tags
  (GDAL's ``TIFFTAG_DATETIME`` and the common acquisition-time keys of Sentinel-2, Landsat and
  HLS products and STAC-made GeoTIFFs).
- The location is the scene centre in WGS 84 (latitude, longitude).
- Encoded as TerraTorch feeds the -TL models: ``temporal`` [[year, day of year], …] per frame
  (day of year 1-based, as Python's ``timetuple().tm_yday``) and ``location`` [lat, lon].
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from engine.protocol import EngineError

# tag keys holding an acquisition time, in order of preference (upper-cased; any namespace)
DATE_TAGS = ("ACQUISITIONDATETIME", "SENSING_TIME", "DATATAKE_SENSING_START", "DATE_ACQUIRED", "ACQUISITION_DATE",
             "DATETIME", "TIFFTAG_DATETIME")
_DATE = re.compile(r"(\d{4})[-:/]?(\d{2})[-:/]?(\d{2})")


def parse_date(text: str) -> dt.date | None:
    m = _DATE.search(str(text))
    if not m:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def acquisition_date(path: str | Path) -> dt.date | None:
    """The acquisition date a raster's tags carry, or None."""
    import rasterio

    with rasterio.open(path) as ds:
        tags = {k.upper(): v for k, v in ds.tags().items()}
        for ns in ds.tag_namespaces() or ():
            if ns.upper() in ("IMAGE_STRUCTURE", "DERIVED_SUBDATASETS"):
                continue
            tags.update({k.upper(): v for k, v in ds.tags(ns=ns).items() if k.upper() not in tags})
    for key in DATE_TAGS:
        if key in tags and (date := parse_date(tags[key])) is not None:
            return date
    return None


def scene_centre(path: str | Path) -> tuple[float, float]:
    """(latitude, longitude) of the raster's centre."""
    import rasterio
    from rasterio.warp import transform

    with rasterio.open(path) as ds:
        if ds.crs is None:
            raise EngineError(f"image {Path(path).name} has no coordinate reference system, so its location is "
                              "unknown", hint="assign the raster a CRS (Raster ▸ Projections ▸ Assign Projection), "
                                              "or train without --metadata")
        b = ds.bounds
        xs, ys = transform(ds.crs, "EPSG:4326", [(b.left + b.right) / 2], [(b.bottom + b.top) / 2])
    return float(ys[0]), float(xs[0])


def scene_metadata(images: list[str], frames: int, dates: list[str] | None = None) -> dict:
    """What the card stores and the -TL encoders get: ``{"dates": [ISO date per frame],
    "temporal": [[year, day of year] per frame], "location": [lat, lon]}``.

    ``dates``: one per frame (``--date``), else read from the rasters: with one raster per frame,
    each raster's own date; with one raster holding every frame, ``--date`` is required."""
    if dates:
        parsed = [parse_date(d) for d in dates]
        bad = [d for d, p in zip(dates, parsed) if p is None]
        if bad:
            raise EngineError(f"--date {', '.join(bad)} is not a date", hint="write dates as YYYY-MM-DD")
        if len(parsed) != frames:
            raise EngineError(f"--date gives {len(parsed)} date(s) for {frames} frame(s)",
                              hint="give one date per frame, comma-separated, in the order of the --image rasters")
    else:
        sources = images if len(images) == frames else images[:1] if frames == 1 else []
        if not sources:
            raise EngineError(f"{frames} frames in {len(images)} raster(s): the frames' dates cannot be read from "
                              "the rasters", hint="give one date per frame with --date YYYY-MM-DD,YYYY-MM-DD,…")
        parsed = []
        for path in sources:
            date = acquisition_date(path)
            if date is None:
                raise EngineError(f"image {Path(path).name} carries no acquisition date in its tags "
                                  f"(looked for {', '.join(DATE_TAGS)})",
                                  hint="give the date with --date YYYY-MM-DD (one per frame), or train without "
                                       "--metadata")
            parsed.append(date)
    lat, lon = scene_centre(images[0])
    return {"dates": [d.isoformat() for d in parsed],
            "temporal": [[d.year, d.timetuple().tm_yday] for d in parsed],
            "location": [round(lat, 6), round(lon, 6)]}
