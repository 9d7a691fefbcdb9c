"""Chips and tiles: the one tiling rule (training, validation and prediction all use it), the
blending weights of overlapping tiles, the spatially blocked train/validation split and the
normalisation statistics of the training pixels.

The split, the crop positions and the statistics work on the label windows (``LabelMask``):
validation blocks and crop positions lie on the whole grid and their pixels are counted window
by window, so they are exactly what one array of the whole grid would give, without it.
"""
from __future__ import annotations

import numpy as np
from rasterio.windows import Window

from engine.data.labels import LabelMask, LabelWindow, as_labels, labelled_box
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


def block_counts(labels: LabelMask, block: int) -> dict[tuple[int, int], int]:
    """Labelled pixels per square block of the grid (top-left (row, col) multiples of ``block``),
    for the blocks holding any."""
    counts: dict[tuple[int, int], int] = {}
    for w in labels.windows:
        labelled = w.index >= 0
        # local offsets where a new block starts, along each axis
        row_ids = (w.row + np.arange(labelled.shape[0])) // block
        col_ids = (w.col + np.arange(labelled.shape[1])) // block
        row_cuts = np.flatnonzero(np.diff(row_ids, prepend=-1))
        col_cuts = np.flatnonzero(np.diff(col_ids, prepend=-1))
        sums = np.add.reduceat(np.add.reduceat(labelled, row_cuts, axis=0, dtype=np.int64), col_cuts, axis=1)
        for i, j in zip(*np.nonzero(sums)):
            key = (int(row_ids[row_cuts[i]]) * block, int(col_ids[col_cuts[j]]) * block)
            counts[key] = counts.get(key, 0) + int(sums[i, j])
    return counts


def validation_blocks(labels: LabelMask, block: int, val_fraction: float, seed: int) -> list[tuple[int, int, int]]:
    """Validation blocks (row, col, side): whole square blocks of the grid, drawn at random
    (seeded) until they hold ``val_fraction`` of the labelled pixels. Neighbouring pixels are
    strongly correlated, so a random pixel split would overstate accuracy; blocks keep it honest
    (``training_split`` adds a buffer between them and the training labels)."""
    if val_fraction <= 0:
        return []
    total = labels.labelled
    # Smaller blocks for small labelled areas, so both sides get several.
    counts = block_counts(labels, block)
    while block > 16 and len(counts) < 8:
        block //= 2
        counts = block_counts(labels, block)
    blocks = sorted(counts.items())  # row-major
    if len(blocks) < 2:
        raise EngineError("too few labelled pixels for a validation split",
                          hint="label more of the image, or pass --val-fraction 0")
    order = np.random.default_rng(seed).permutation(len(blocks))
    taken, chosen = 0, []
    for n, k in enumerate(order):
        if taken >= val_fraction * total or n == len(blocks) - 1:
            break
        (r, c), count = blocks[k]
        chosen.append((r, c, block))
        taken += count
    return chosen


def _paint(window: LabelWindow, boxes, grow_by: int = 0) -> np.ndarray:
    """Boolean mask of ``window``'s pixels inside any of the (row, col, side) boxes grown by
    ``grow_by`` pixels on every side."""
    h, w = window.index.shape
    mask = np.zeros((h, w), bool)
    for r, c, side in boxes:
        r0, r1 = max(r - grow_by - window.row, 0), min(r + side + grow_by - window.row, h)
        c0, c1 = max(c - grow_by - window.col, 0), min(c + side + grow_by - window.col, w)
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] = True
    return mask


def spatial_split(index: np.ndarray, block: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean [H, W] map of the validation pixels of one label array (``validation_blocks``)."""
    whole = LabelMask.of_array(index)
    return _paint(whole.windows[0], validation_blocks(whole, block, val_fraction, seed))


def training_split(index, chip_size: int, val_fraction: float, seed: int):
    """(train target, validation target): class indices with -1 elsewhere, window by window of
    a ``LabelMask`` (or as arrays for a label array).

    Validation takes whole blocks (``validation_blocks``, blocks of two chips); training labels
    within half a chip of a validation block are dropped, so no label the model learns from
    lies next to one it is scored on (training chips never cover validation pixels either:
    see ``crop_positions``)."""
    labels = as_labels(index)
    blocks = validation_blocks(labels, 2 * chip_size, val_fraction, seed)
    train, val = [], []
    for w in labels.windows:
        train.append(np.where(_paint(w, blocks, chip_size // 2), -1, w.index).astype(np.int16))
        val.append(np.where(_paint(w, blocks), w.index, -1).astype(np.int16))
    if isinstance(index, LabelMask):
        return labels.with_indices(train), labels.with_indices(val)
    return train[0], val[0]


def labelled_extent(index) -> tuple[int, int]:
    """(height, width) of the bounding box of the labelled pixels; (0, 0) when none."""
    boxes = []
    for w in as_labels(index).windows:
        box = labelled_box(w.index >= 0)
        if box is not None:
            rows, cols = box
            boxes.append((w.row + rows.start, w.col + cols.start, w.row + rows.stop, w.col + cols.stop))
    if not boxes:
        return 0, 0
    r0, c0, r1, c1 = np.array(boxes).T
    return int(r1.max() - r0.min()), int(c1.max() - c0.min())


def choose_chip_size(index, patch: int, largest: int = 224) -> tuple[int, str]:
    """A chip size for labels (a ``LabelMask`` or a label array) over their labelled extent, and why.

    Large chips on a small labelled area give a handful of nearly identical samples, and the
    validation buffer (half a chip) eats the rest: aim for at least four chips across the
    shorter side of the labelled extent, between four patches and ``largest``."""
    h, w = labelled_extent(index)
    smallest = 4 * patch
    chip = max(smallest, min(largest, min(h, w) // 4 // patch * patch))
    return chip, (f"chip size {chip} px: the labels span {h} x {w} px, so about four chips fit across "
                  f"the shorter side (between {smallest} and {largest} px; set --chip-size to override)")


def window_counts(targets: list[LabelMask], row_starts, col_starts, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square windows of ``size`` at every (row, col) of ``row_starts`` x ``col_starts`` that
    meet a window of the targets: their [N, 2] top-left (row, col), row-major, and [N, T] count
    of each target's labelled pixels inside (the targets' windows are disjoint, so they add up)."""
    row_starts, col_starts = np.asarray(row_starts, np.int64), np.asarray(col_starts, np.int64)
    stride = int(col_starts.max()) + 1 if len(col_starts) else 1
    keys, counts, which = [], [], []
    for t, target in enumerate(targets):
        for w in target.windows:
            h, wd = w.index.shape
            rs = row_starts[(row_starts > w.row - size) & (row_starts < w.row + h)] - w.row
            cs = col_starts[(col_starts > w.col - size) & (col_starts < w.col + wd)] - w.col
            if not len(rs) or not len(cs):
                continue
            rr, cc = (a.ravel() for a in np.meshgrid(rs, cs, indexing="ij"))
            keys.append((rr + w.row) * stride + cc + w.col)
            counts.append(box_count(integral(w.index >= 0), rr, cc, rr + size, cc + size))
            which.append(np.full(len(rr), t))
    if not keys:
        return np.zeros((0, 2), np.int64), np.zeros((0, len(targets)), np.int64)
    unique, slot = np.unique(np.concatenate(keys), return_inverse=True)
    counts, which = np.concatenate(counts), np.concatenate(which)
    total = np.stack([np.bincount(slot[which == t], counts[which == t], len(unique))
                      for t in range(len(targets))], axis=1).astype(np.int64)
    return np.stack([unique // stride, unique % stride], axis=1), total


def crop_positions(train, val, size: int, step: int) -> np.ndarray:
    """[N, 2] top-left (row, col) of training crops: every ``step`` pixels, windows of ``size``
    that hold a training label and no validation pixel (targets as ``LabelMask``s or arrays).
    A raster smaller than a crop has one position at 0 on that axis (the crop is padded when read)."""
    train, val = as_labels(train), as_labels(val)

    def starts(length):
        last = max(length - size, 0)
        return np.unique(np.append(np.arange(0, last + 1, step), last))

    positions, counts = window_counts([train, val], starts(train.height), starts(train.width), size)
    keep = (counts[:, 0] > 0) & (counts[:, 1] == 0)
    return positions[keep]


def band_statistics(stack: RasterStack, pixels) -> tuple[list[float], list[float]]:
    """Per-band mean and std over the valid image pixels selected by ``pixels``: the labelled
    pixels of a ``LabelMask`` (only its windows are read), or a boolean [H, W] array."""
    if isinstance(pixels, LabelMask):
        selections = [(w.window, w.index >= 0) for w in pixels.windows]
    else:
        selections = [(Window(0, 0, stack.grid.width, stack.grid.height), pixels)]
    n = 0
    s = np.zeros(stack.count, np.float64)
    s2 = np.zeros(stack.count, np.float64)
    for window, selected in selections:
        for block in _blocks_of(window):
            r, c = int(block.row_off - window.row_off), int(block.col_off - window.col_off)
            sel = selected[r:r + int(block.height), c:c + int(block.width)]
            if not sel.any():
                continue
            data, valid = stack.read(block)
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


def _blocks_of(window: Window, size: int = 1024) -> list[Window]:
    """``window`` cut into blocks of at most ``size`` (bounded memory per read)."""
    r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    return [Window(c + j, r + i, min(size, w - j), min(size, h - i))
            for i in range(0, h, size) for j in range(0, w, size)]


def normalise(data: np.ndarray, valid: np.ndarray, mean, std, out: np.ndarray | None = None) -> np.ndarray:
    """(x − mean) / std per band, float32; invalid pixels become 0 (the training mean). ``out``
    (e.g. ``data`` itself, float32) receives the result instead of a new array."""
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    out = np.subtract(data, mean, out=out, dtype=np.float32)  # divided in place: no temporaries
    out /= std
    out[:, ~valid] = 0.0
    return out
