"""A deterministic synthetic multispectral scene for the demo and the tests.

``make_demo_scene(out_dir)`` writes three files on one 30 m grid in UTM 33N (EPSG:32633):

* ``scene.tif``: 6 bands in HLS order (BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2),
  uint16 reflectance x 10000, nodata 0 (a small triangular swath-edge corner);
* ``labels.tif``: uint8 classes 1..4 (water, vegetation, built-up, bare soil), 0 = no label,
  with a colour table;
* ``labels.gpkg``: the same labels as polygons (layer ``labels``, fields ``class_id`` and
  ``class_name``) that rasterize back onto the grid exactly.

The landscape is built from smooth random fields (numpy only): a meandering river and a lake
or two, one or two towns of street blocks, forest blobs and irregular agricultural parcels.
Each pixel gets a material (clear or turbid water, forest, brown to grey soil, roof, street)
under a share of green cover (crops, grass, garden trees), per-object and smooth brightness
variation, a light point-spread blur that mixes pixels along boundaries, and sensor noise.
Classes overlap a little spectrally, so a per-pixel rule is not enough (nearest class mean
gets about 88 % of pixels right), but a good classifier reaches high accuracy.

The same ``seed`` and ``size`` give byte-identical arrays; every file is written under a
temporary name in ``out_dir`` and then renamed, so a half-written file is never left behind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import fiona
import numpy as np
import rasterio
from rasterio import features
from rasterio.transform import Affine

from engine.data.rasters import atomic_output, colormap

CLASSES = [  # value, name, colour
    {"value": 1, "name": "water", "colour": "#1f78b4"},
    {"value": 2, "name": "vegetation", "colour": "#33a02c"},
    {"value": 3, "name": "built-up", "colour": "#e31a1c"},
    {"value": 4, "name": "bare soil", "colour": "#b15928"},
]
BAND_NAMES = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]

NO_LABEL, WATER, VEGETATION, BUILT_UP, BARE_SOIL = 0, 1, 2, 3, 4
CRS = "EPSG:32633"
PIXEL_SIZE = 30.0
ORIGIN = (500000.0, 5000020.0)  # upper-left corner (x, y), north-up
POLYGON_LAYER = "labels"

# Materials: what a pixel is made of, which decides its spectrum.
LAKE, RIVER, FOREST, SOIL, ROOF, STREET = range(6)

# Endmember spectra, reflectance x 10000 in BAND_NAMES order. A pixel's spectrum is
# (1 - cover) * material + cover * GREEN: crops and grass on soil, trees in a town block.
# SOIL itself blends from brown (tone 0) to grey, gravelly soil (tone 1).
ENDMEMBERS = np.array([
    [585, 530, 325, 150, 65, 35],          # LAKE: clear, dark water
    [640, 630, 430, 210, 85, 45],          # RIVER: a little turbid
    [310, 570, 300, 3100, 1540, 690],      # FOREST
    [1680, 2150, 2840, 2500, 3700, 3420],  # SOIL: brown
    [1420, 1500, 1640, 1750, 2480, 2380],  # ROOF
    [1080, 1160, 1260, 1700, 2150, 2020],  # STREET: asphalt
], dtype=np.float32)
GREY_SOIL = np.array([1500, 1750, 2000, 2400, 3000, 2750], dtype=np.float32)
GREEN = np.array([310, 670, 300, 3800, 1780, 780], dtype=np.float32)

# Target share of the scene for the layout (the remaining land is split forest / fields).
WATER_FRACTION = 0.12
TOWN_FRACTION = 0.22       # of the land left after water
FOREST_FRACTION = 0.42     # of the land left after water and towns
BARE_PARCEL_SHARE = 0.55   # of the agricultural parcels


@dataclass(frozen=True)
class DemoScene:
    """The files ``make_demo_scene`` wrote and the classes of its labels."""

    image: Path      # scene.tif
    labels: Path     # labels.tif
    polygons: Path   # labels.gpkg
    classes: list[dict]


@dataclass
class _Layout:
    """Per-pixel description of the landscape, before it is turned into spectra."""

    labels: np.ndarray    # uint8 class values (0 only in the nodata corner)
    material: np.ndarray  # uint8 material (LAKE ... STREET)
    cover: np.ndarray     # float32 share of green vegetation over the material, 0..1
    tone: np.ndarray      # float32 soil tone, 0 brown .. 1 grey (SOIL pixels only)
    gain: np.ndarray      # float32 brightness factor (per object, or a smooth field)
    tilt: np.ndarray      # float32 spectral slope: > 0 brightens SWIR and darkens blue
    nodata: np.ndarray    # bool swath-edge corner

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "_Layout":
        return cls(labels=np.zeros(shape, np.uint8), material=np.zeros(shape, np.uint8),
                   cover=np.zeros(shape, np.float32), tone=np.zeros(shape, np.float32),
                   gain=np.ones(shape, np.float32), tilt=np.zeros(shape, np.float32),
                   nodata=np.zeros(shape, bool))

    def paint(self, where: np.ndarray, **values) -> None:
        """Set fields at the pixels ``where``; a value is a scalar or a full-size array."""
        for name, value in values.items():
            target = getattr(self, name)
            target[where] = value[where] if np.ndim(value) else value


def make_demo_scene(out_dir, size: int | tuple[int, int] = 512, seed: int = 0) -> DemoScene:
    """Write ``scene.tif``, ``labels.tif`` and ``labels.gpkg`` into ``out_dir`` and describe them.

    ``size`` is the side in pixels, or ``(height, width)`` for a non-square scene (at least 32).
    """
    shape = _shape_of(size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    layout = _make_layout(rng, shape)
    image = _render_spectra(rng, layout)
    transform = Affine(PIXEL_SIZE, 0.0, ORIGIN[0], 0.0, -PIXEL_SIZE, ORIGIN[1])

    scene = DemoScene(image=out_dir / "scene.tif", labels=out_dir / "labels.tif",
                      polygons=out_dir / "labels.gpkg", classes=[dict(c) for c in CLASSES])
    _write_image(scene.image, image, transform, seed)
    _write_labels(scene.labels, layout.labels, transform)
    _write_polygons(scene.polygons, layout.labels, transform)
    return scene


def _shape_of(size) -> tuple[int, int]:
    height, width = (size, size) if np.isscalar(size) else tuple(size)
    height, width = int(height), int(width)
    if min(height, width) < 32:
        raise ValueError(f"demo scene size must be at least 32 pixels, got {size!r}")
    return height, width


# --- smooth random fields ------------------------------------------------------------------

def _box_blur(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Moving average of odd ``width`` along ``axis`` (edges repeated), via cumulative sums."""
    r = width // 2
    if r < 1:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(n), axis=axis)
    return ((hi - lo) / (2 * r + 1)).astype(a.dtype)


def _upsample_bilinear(coarse: np.ndarray, shape: tuple[int, int], step: float) -> np.ndarray:
    """Sample ``coarse`` (nodes ``step`` pixels apart, one node of margin) at every pixel."""
    out = coarse
    for axis, n in enumerate(shape):
        pos = np.arange(n) / step + 1.0
        i0 = np.floor(pos).astype(np.intp)
        t = (pos - i0).astype(np.float32)
        a, b = np.take(out, i0, axis=axis), np.take(out, i0 + 1, axis=axis)
        t = t[:, None] if axis == 0 else t[None, :]
        out = a * (1 - t) + b * t
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A smooth random field (mean 0, std 1) whose blobs are about ``scale`` pixels across.

    White noise on a coarse grid, interpolated bilinearly and box-blurred twice: close to
    Gaussian-filtered noise, so thresholds of it give natural, rounded shapes.
    """
    step = max(2.0, scale / 2.0)
    coarse_shape = tuple(int((n - 1) / step) + 3 for n in shape)
    field = _upsample_bilinear(rng.standard_normal(coarse_shape).astype(np.float32), shape, step)
    width = int(step) | 1
    for _ in range(2):
        field = _box_blur(_box_blur(field, width, 0), width, 1)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _pixel_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of pixel centres, broadcastable to ``shape``."""
    return (np.arange(shape[0], dtype=np.float32)[:, None],
            np.arange(shape[1], dtype=np.float32)[None, :])


# --- the layout ----------------------------------------------------------------------------

def _make_layout(rng: np.random.Generator, shape: tuple[int, int]) -> _Layout:
    """Countryside first, towns over it, water over both, then the nodata corner."""
    layout = _Layout.empty(shape)
    river = _river_mask(rng, shape)
    lakes = _lake_mask(rng, shape, target_area=max(0.0, WATER_FRACTION * river.size - river.sum()))
    water = river | lakes

    _lay_out_countryside(rng, layout, land=~water)
    _lay_out_towns(rng, layout, water)

    ripples = 1.0 + 0.06 * _smooth_field(rng, shape, 40)
    layout.paint(water, labels=WATER, cover=0.0, gain=ripples, tilt=0.0)
    layout.paint(river, material=RIVER)
    layout.paint(lakes, material=LAKE)

    layout.nodata = _nodata_corner(rng, shape)
    layout.paint(layout.nodata, labels=NO_LABEL)
    return layout


def _river_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A meandering river, 4 to 15 pixels wide (narrower in small scenes), crossing the scene."""
    h, w = shape
    length = float(max(h, w))
    rows, cols = _pixel_grid(shape)
    angle = rng.uniform(0, np.pi)
    # u runs along the river's general direction, v across it, both from the scene centre.
    dy, dx = rows - (h - 1) / 2, cols - (w - 1) / 2
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)

    offset = rng.uniform(-0.15, 0.15) * min(h, w)
    meanders = [  # (wavelength, amplitude) from long bends down to small wiggles
        (rng.uniform(0.8, 1.5) * length, rng.uniform(0.06, 0.12) * length),
        (rng.uniform(0.25, 0.4) * length, rng.uniform(0.02, 0.04) * length),
        (rng.uniform(60, 100), rng.uniform(3, 8)),
    ]
    centre = np.full_like(u, offset)
    slope = np.zeros_like(u)
    for wavelength, amplitude in meanders:
        k, phase = 2 * np.pi / wavelength, rng.uniform(0, 2 * np.pi)
        centre += amplitude * np.sin(k * u + phase)
        slope += amplitude * k * np.cos(k * u + phase)
    distance = np.abs(v - centre) / np.sqrt(1 + slope ** 2)  # to the centre line, near enough
    width = 4 + 11 * (0.5 + 0.5 * np.sin(2 * np.pi * u / (0.7 * length) + rng.uniform(0, 2 * np.pi)))
    width *= min(1.0, min(h, w) / 256)
    return distance < width / 2


def _lake_mask(rng: np.random.Generator, shape: tuple[int, int], target_area: float) -> np.ndarray:
    """One or two lakes with irregular shores, about ``target_area`` pixels in all."""
    n_lakes = int(rng.integers(1, 3))
    rows, cols = _pixel_grid(shape)
    shore = _smooth_field(rng, shape, 0.1 * min(shape) + 8)
    lakes = np.zeros(shape, bool)
    if target_area < 1:
        return lakes
    for share in rng.dirichlet([4.0] * n_lakes):
        aspect, angle = rng.uniform(0.55, 1.0), rng.uniform(0, np.pi)
        radius = np.sqrt(share * target_area / (np.pi * aspect))
        cy, cx = (rng.uniform(0.2, 0.8) * n for n in shape)
        dy, dx = rows - cy, cols - cx
        a = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
        b = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius * aspect)
        lakes |= np.sqrt(a ** 2 + b ** 2) + 0.18 * shore < 1.0
    return lakes


def _lay_out_countryside(rng: np.random.Generator, layout: _Layout, land: np.ndarray) -> None:
    """Forest blobs, and irregular crop / bare-soil parcels everywhere else."""
    shape = land.shape
    forest_field = _smooth_field(rng, shape, float(np.clip(0.2 * min(shape), 24, 160)))
    forest = forest_field > np.quantile(forest_field[land], 1 - FOREST_FRACTION)
    canopy = 1.0 + 0.07 * _smooth_field(rng, shape, 12)
    layout.paint(forest, labels=VEGETATION, material=FOREST, gain=canopy)

    parcels = _voronoi_parcels(rng, shape, spacing=26.0)
    n_parcels = int(parcels.max()) + 1
    bare = rng.random(n_parcels) < BARE_PARCEL_SHARE
    # Bare parcels keep some stubble or weeds, crops some gaps: the two overlap a little.
    cover = np.where(bare, rng.uniform(0.0, 0.4, n_parcels), rng.uniform(0.55, 1.0, n_parcels))
    tone = rng.uniform(0.0, 0.6, n_parcels)
    gain = np.where(bare, rng.uniform(0.8, 1.2, n_parcels), rng.uniform(0.9, 1.1, n_parcels))
    tilt = rng.uniform(-0.06, 0.06, n_parcels)
    uneven_growth = 0.06 * _smooth_field(rng, shape, 10)
    layout.paint(~forest, labels=np.where(bare, BARE_SOIL, VEGETATION).astype(np.uint8)[parcels],
                 material=SOIL, cover=np.clip(cover[parcels] + uneven_growth, 0.0, 1.0),
                 tone=tone.astype(np.float32)[parcels],
                 gain=gain.astype(np.float32)[parcels], tilt=tilt.astype(np.float32)[parcels])


def _voronoi_parcels(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Parcel ids: the nearest of seeds jittered on a grid ``spacing`` apart (Voronoi cells)."""
    h, w = shape
    ny, nx = int(np.ceil(h / spacing)) + 2, int(np.ceil(w / spacing)) + 2
    # Seed (i, j) lies in grid cell (i - 1, j - 1); the outer ring covers the edges.
    seed_y = (np.arange(ny)[:, None] - 1 + rng.uniform(0.1, 0.9, (ny, nx))) * spacing
    seed_x = (np.arange(nx)[None, :] - 1 + rng.uniform(0.1, 0.9, (ny, nx))) * spacing
    rows, cols = _pixel_grid(shape)
    cell_i = (rows // spacing).astype(np.intp) + 1
    cell_j = (cols // spacing).astype(np.intp) + 1
    best = np.full(shape, np.inf, np.float32)
    ids = np.zeros(shape, np.intp)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i, j = np.broadcast_arrays(cell_i + di, cell_j + dj)
            d2 = (seed_y[i, j] - rows) ** 2 + (seed_x[i, j] - cols) ** 2
            closer = d2 < best
            best[closer] = d2[closer]
            ids[closer] = (i * nx + j)[closer]
    return ids


def _lay_out_towns(rng: np.random.Generator, layout: _Layout, water: np.ndarray) -> None:
    """One or two towns around centres on dry land, each a rotated grid of streets and blocks."""
    shape = water.shape
    rows, cols = _pixel_grid(shape)
    n_towns = int(rng.integers(1, 3))
    centres = _town_centres(rng, water, n_towns)
    radius = np.sqrt(TOWN_FRACTION * water.size / (np.pi * len(centres)))
    cones = np.stack([1 - np.hypot(rows - cy, cols - cx) / radius for cy, cx in centres])
    town_field = cones.max(axis=0) + 0.25 * _smooth_field(rng, shape, 0.5 * radius + 4)
    zone = town_field > np.quantile(town_field[~water], 1 - TOWN_FRACTION)
    nearest = cones.argmax(axis=0)
    for t, centre in enumerate(centres):
        _lay_out_blocks(rng, layout, centre, zone & (nearest == t))


def _town_centres(rng: np.random.Generator, water: np.ndarray, n_towns: int) -> list[tuple[float, float]]:
    """Town centres on dry land, kept apart from each other where possible."""
    h, w = water.shape
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        near_water = water[max(0, int(cy) - 6):int(cy) + 7, max(0, int(cx) - 6):int(cx) + 7].any()
        far_apart = all(np.hypot(cy - y, cx - x) > 0.35 * min(h, w) for y, x in centres)
        if not near_water and far_apart:
            centres.append((cy, cx))
            if len(centres) == n_towns:
                break
    return centres or [(h / 2, w / 2)]


def _lay_out_blocks(rng: np.random.Generator, layout: _Layout, centre: tuple[float, float],
                    zone: np.ndarray) -> None:
    """A town's streets and rectangular blocks, for the blocks whose centre lies in ``zone``.

    Most blocks hold one or two buildings (each with its own roof), some with a narrow garden
    strip; the others are parks or bare lots. Every fourth street is a wider main road.
    """
    shape = zone.shape
    rows, cols = _pixel_grid(shape)
    cy, cx = centre
    angle = rng.uniform(0, np.pi / 2)
    cos, sin = np.cos(angle), np.sin(angle)
    step_u, step_v = rng.uniform(9, 15, 2)
    offset_u, offset_v = rng.uniform(0, step_u), rng.uniform(0, step_v)
    u = (cols - cx) * cos + (rows - cy) * sin + offset_u
    v = -(cols - cx) * sin + (rows - cy) * cos + offset_v
    iu, iv = np.floor(u / step_u).astype(np.intp), np.floor(v / step_v).astype(np.intp)
    fu, fv = u - iu * step_u, v - iv * step_v  # position inside the block

    # A block belongs to the town when its centre lies in the zone.
    cu, cv = (iu + 0.5) * step_u - offset_u, (iv + 0.5) * step_v - offset_v
    centre_row = np.clip(np.rint(cy + cu * sin + cv * cos), 0, shape[0] - 1).astype(np.intp)
    centre_col = np.clip(np.rint(cx + cu * cos - cv * sin), 0, shape[1] - 1).astype(np.intp)
    in_town = zone[centre_row, centre_col]
    if not in_town.any():
        return

    # Per-block random draws, looked up by the block's grid cell.
    bu, bv = iu - iu.min(), iv - iv.min()
    blocks = (int(bu.max()) + 1, int(bv.max()) + 1)
    kind = rng.choice(3, size=blocks, p=[0.8, 0.12, 0.08])[bu, bv]  # buildings, park, lot
    margin = rng.choice([0, 0, 0, 0, 0, 1, 2], size=blocks + (4,))[bu, bv]
    split_at = np.where(rng.random(blocks) < 0.6, rng.uniform(0.3, 0.7, blocks), 2.0)[bu, bv]
    gains = rng.uniform(0.7, 1.35, blocks + (2,)).astype(np.float32)[bu, bv]
    tilts = rng.uniform(-0.15, 0.15, blocks + (2,)).astype(np.float32)[bu, bv]
    second = (fu > split_at * step_u).astype(np.intp)[..., None]  # which of the two buildings
    roof_gain = np.take_along_axis(gains, second, axis=-1)[..., 0]
    roof_tilt = np.take_along_axis(tilts, second, axis=-1)[..., 0]
    trees = rng.uniform(0.0, 0.35, blocks).astype(np.float32)[bu, bv]  # yards and street trees

    street = (fu < 1) | (fv < 1) | ((iu % 4 == 0) & (fu < 2)) | ((iv % 4 == 0) & (fv < 2))
    inside = ((fu >= 1 + margin[..., 0]) & (fu < step_u - margin[..., 1])
              & (fv >= 1 + margin[..., 2]) & (fv < step_v - margin[..., 3]))
    building = inside & (kind == 0)

    lot = kind == 2
    layout.paint(in_town, labels=np.where(lot, BARE_SOIL, VEGETATION).astype(np.uint8), material=SOIL,
                 cover=np.where(lot, 0.1, 0.85).astype(np.float32), tone=0.6, gain=1.0, tilt=0.0)
    layout.paint(in_town & building, labels=BUILT_UP, material=ROOF, cover=trees,
                 gain=roof_gain, tilt=roof_tilt)
    layout.paint(in_town & street, labels=BUILT_UP, material=STREET, cover=0.0)


def _nodata_corner(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A triangle in one corner, 1 to 2 % of the scene, like the edge of a satellite swath."""
    h, w = shape
    fraction, aspect = rng.uniform(0.01, 0.02), rng.uniform(0.7, 1.4)
    leg_y = np.sqrt(2 * fraction) * h * aspect
    leg_x = np.sqrt(2 * fraction) * w / aspect
    rows, cols = _pixel_grid(shape)
    corner = int(rng.integers(4))
    dy = rows + 0.5 if corner < 2 else h - (rows + 0.5)
    dx = cols + 0.5 if corner % 2 == 0 else w - (cols + 0.5)
    return dy / leg_y + dx / leg_x < 1.0


# --- spectra -------------------------------------------------------------------------------

def _render_spectra(rng: np.random.Generator, layout: _Layout) -> np.ndarray:
    """Reflectance x 10000 as uint16, shape (6, height, width); 0 in the nodata corner."""
    shape = layout.labels.shape
    spectra = ENDMEMBERS.T[:, layout.material]
    soil = layout.material == SOIL
    spectra[:, soil] += (GREY_SOIL - ENDMEMBERS[SOIL])[:, None] * layout.tone[soil]
    spectra += layout.cover[None] * (GREEN[:, None, None] - spectra)

    # Haze / illumination over the whole scene, then the per-object gain and slope.
    haze = 1.0 + 0.03 * _smooth_field(rng, shape, 0.5 * min(shape))
    ramp = np.linspace(-1, 1, len(BAND_NAMES), dtype=np.float32)[:, None, None]
    spectra *= (haze * layout.gain)[None] * (1 + layout.tilt[None] * ramp)

    spectra = _point_spread(spectra)  # mixed pixels along every boundary
    shared = rng.standard_normal(shape, dtype=np.float32)
    per_band = rng.standard_normal(spectra.shape, dtype=np.float32)
    spectra *= 1 + 0.04 * shared[None] + 0.035 * per_band
    spectra += 8 * rng.standard_normal(spectra.shape, dtype=np.float32)

    image = np.clip(np.rint(spectra), 1, 10000).astype(np.uint16)
    image[:, layout.nodata] = 0
    return image


def _point_spread(stack: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur per band: a quarter of each pixel's signal comes from its neighbours."""
    p = np.pad(stack, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4


# --- writing -------------------------------------------------------------------------------

def _block_size(n: int) -> int:
    return max(16, min(256, n // 16 * 16))


def _geotiff_profile(shape: tuple[int, int], transform, count: int, dtype: str) -> dict:
    height, width = shape
    return {
        "driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype,
        "crs": CRS, "transform": transform, "nodata": 0, "compress": "deflate",
        "tiled": True, "blockysize": _block_size(height), "blockxsize": _block_size(width),
    }


def _write_image(path: Path, image: np.ndarray, transform, seed: int) -> None:
    profile = _geotiff_profile(image.shape[1:], transform, image.shape[0], "uint16")
    with atomic_output(path) as tmp:
        with rasterio.open(tmp, "w", predictor=2, **profile) as dst:
            dst.write(image)
            for band, name in enumerate(BAND_NAMES, start=1):
                dst.set_band_description(band, name)
            dst.update_tags(source="GeoPEFT synthetic demo scene", seed=str(seed),
                            units="surface reflectance x 10000")


def _write_labels(path: Path, labels: np.ndarray, transform) -> None:
    profile = _geotiff_profile(labels.shape, transform, 1, "uint8")
    with atomic_output(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(labels, 1)
            dst.write_colormap(1, {0: (0, 0, 0, 0), **colormap(CLASSES)})
            dst.set_band_description(1, "class")
            dst.update_tags(GEOPEFT_CLASSES=json.dumps(CLASSES))  # names for the label loader


def _write_polygons(path: Path, labels: np.ndarray, transform) -> None:
    names = {c["value"]: c["name"] for c in CLASSES}
    schema = {"geometry": "Polygon", "properties": {"class_id": "int", "class_name": "str"}}
    records = [
        {"geometry": geometry, "properties": {"class_id": int(value), "class_name": names[int(value)]}}
        for geometry, value in features.shapes(labels, mask=labels > 0, transform=transform)
    ]
    with atomic_output(path) as tmp:
        with fiona.open(tmp, "w", driver="GPKG", layer=POLYGON_LAYER, crs=CRS, schema=schema) as dst:
            dst.writerecords(records)
