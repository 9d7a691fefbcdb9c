"""Chips and tiles: the one tiling rule (training, validation and prediction all use it), the
blending weights of overlapping tiles, the spatially blocked train/validation split and the
normalisation statistics of the training pixels.
"""
from __future__ import annotations

import numpy as np
from rasterio.windows import Window

from engine.data.rasters import RasterStack
from engine.protocol import EngineError


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets of tiles of ``size`` every ``stride`` pixels covering ``length`` pixels.

    The last tile is shifted back to end at the edge, so every tile lies inside the raster
    (a raster smaller than one tile gets a single tile at 0, padded when read).
    """
    if stride < 1:
        raise ValueError("stride must be positive")
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def tile_windows(height: int, width: int, size: int, stride: int) -> list[Window]:
    return [Window(c, r, size, size) for r in tile_starts(height, size, stride)
            for c in tile_starts(width, size, stride)]


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """[size, size] weights that fall off linearly over ``overlap`` pixels towards the tile edges,
    so seams between overlapping tiles vanish (never zero, so an edge pixel seen by one tile
    still gets its prediction)."""
    if overlap <= 0:
        return np.ones((size, size), np.float32)
    i = np.arange(size, dtype=np.float32) + 0.5
    ramp = np.clip(np.minimum(i, size - i) / overlap, 1e-3, 1.0)
    return np.outer(ramp, ramp).astype(np.float32)


def integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table [H+1, W+1] of a boolean mask, for O(1) counts over any window."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=out[1:, 1:])
    return out


def box_count(table: np.ndarray, r0, c0, r1, c1):
    """Count of True pixels in rows [r0, r1) × cols [c0, c1) (arrays or ints; clipped)."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    r0, r1 = np.clip(r0, 0, h), np.clip(r1, 0, h)
    c0, c1 = np.clip(c0, 0, w), np.clip(c1, 0, w)
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated by a square of ``radius`` pixels (every pixel within ``radius`` of it)."""
    if radius <= 0:
        return mask.copy()
    rows, cols = np.indices(mask.shape, dtype=np.int32)
    return box_count(integral(mask), rows - radius, cols - radius, rows + radius + 1, cols + radius + 1) > 0


def spatial_split(index: np.ndarray, block: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean [H, W] map of validation pixels: whole square blocks, drawn at random (seeded)
    until they hold ``val_fraction`` of the labelled pixels. Neighbouring pixels are strongly
    correlated, so a random pixel split would overstate accuracy; blocks keep it honest
    (``training_split`` adds a buffer between them and the training labels)."""
    h, w = index.shape
    val = np.zeros((h, w), bool)
    if val_fraction <= 0:
        return val
    labelled = index >= 0
    total = labelled.sum()
    # Smaller blocks for small rasters, so both sides get several.
    while block > 16:
        nb = sum(1 for r in range(0, h, block) for c in range(0, w, block)
                 if labelled[r:r + block, c:c + block].any())
        if nb >= 8:
            break
        block //= 2
    blocks = [(r, c, int(labelled[r:r + block, c:c + block].sum()))
              for r in range(0, h, block) for c in range(0, w, block)]
    blocks = [b for b in blocks if b[2] > 0]
    if len(blocks) < 2:
        raise EngineError("too few labelled pixels for a validation split",
                          hint="label more of the image, or pass --val-fraction 0")
    order = np.random.default_rng(seed).permutation(len(blocks))
    taken = 0
    for n, k in enumerate(order):
        if taken >= val_fraction * total or n == len(blocks) - 1:
            break
        r, c, count = blocks[k]
        val[r:r + block, c:c + block] = True
        taken += count
    return val


def training_split(index: np.ndarray, chip_size: int, val_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(train target, validation target): class indices with -1 elsewhere.

    Validation takes whole blocks (``spatial_split``, blocks of two chips); training labels
    within half a chip of a validation block are dropped, so no label the model learns from
    lies next to one it is scored on (training chips never cover validation pixels either:
    see ``crop_positions``)."""
    val = spatial_split(index, 2 * chip_size, val_fraction, seed)
    train = index.copy()
    if val.any():
        train[grow(val, chip_size // 2)] = -1
    return train.astype(np.int16), np.where(val, index, -1).astype(np.int16)


def labelled_extent(index: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of the labelled pixels; (0, 0) when none."""
    rows, cols = np.nonzero((index >= 0).any(axis=1))[0], np.nonzero((index >= 0).any(axis=0))[0]
    if not len(rows):
        return 0, 0
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def choose_chip_size(index: np.ndarray, patch: int, largest: int = 224) -> tuple[int, str]:
    """A chip size for labels that cover ``index``'s labelled extent, and why.

    Large chips on a small labelled area give a handful of nearly identical samples, and the
    validation buffer (half a chip) eats the rest: aim for at least four chips across the
    shorter side of the labelled extent, between four patches and ``largest``."""
    h, w = labelled_extent(index)
    smallest = 4 * patch
    chip = max(smallest, min(largest, min(h, w) // 4 // patch * patch))
    return chip, (f"chip size {chip} px: the labels span {h} x {w} px, so about four chips fit across "
                  f"the shorter side (between {smallest} and {largest} px; set --chip-size to override)")


def crop_positions(train: np.ndarray, val: np.ndarray, size: int, step: int) -> np.ndarray:
    """[N, 2] top-left (row, col) of training crops: every ``step`` pixels, windows of ``size``
    that hold a training label and no validation pixel. A raster smaller than a crop has one
    position at 0 on that axis (the crop is padded when read)."""
    H, W = train.shape

    def starts(length):
        last = max(length - size, 0)
        return np.unique(np.append(np.arange(0, last + 1, step), last))

    rr, cc = np.meshgrid(starts(H), starts(W), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    labelled = box_count(integral(train >= 0), rr, cc, rr + size, cc + size)
    held_out = box_count(integral(val >= 0), rr, cc, rr + size, cc + size)
    keep = (labelled > 0) & (held_out == 0)
    return np.stack([rr[keep], cc[keep]], axis=1)


def band_statistics(stack: RasterStack, pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-band mean and std over the valid image pixels where ``pixels`` [H, W] is True."""
    n = 0
    s = np.zeros(stack.count, np.float64)
    s2 = np.zeros(stack.count, np.float64)
    for window in stack.windows():
        r, c = int(window.row_off), int(window.col_off)
        sel = pixels[r:r + int(window.height), c:c + int(window.width)]
        if not sel.any():
            continue
        data, valid = stack.read(window)
        sel = sel & valid
        values = data[:, sel].astype(np.float64)
        n += values.shape[1]
        s += values.sum(axis=1)
        s2 += (values ** 2).sum(axis=1)
    if n == 0:
        raise EngineError("no valid image pixels under the training labels",
                          hint="the labelled area is all nodata in the image; check bands and nodata")
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant band would divide by zero
    return mean.tolist(), std.tolist()


def normalise(data: np.ndarray, valid: np.ndarray, mean, std) -> np.ndarray:
    """(x − mean) / std per band, float32; invalid pixels become 0 (the training mean)."""
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    out = (data - mean) / std
    out[:, ~valid] = 0.0
    return out.astype(np.float32, copy=False)
