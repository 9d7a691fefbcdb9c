"""Training and evaluation at scene scale (issue 10): labels are read, rasterised and split only in
the windows where they are, image pixels are read only under them, and evaluation accumulates
its confusion matrix block by block. Rasters here are large but sparse (only the tiles near the
labels are written), so a full-grid array would show as reads and arrays far larger than the
labels."""
from __future__ import annotations

import fiona
import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.windows import Window

from engine.data.chips import choose_chip_size, crop_positions, training_split
from engine.data.labels import LABEL_BLOCK, LabelMask, load_labels
from engine.data.rasters import Grid, RasterStack
from engine.evaluate import evaluate
from engine.metrics import confusion
from engine.models.registry import get_backbone_spec
from engine.protocol import EngineError, Reporter
from engine.training.data import labelled_windows
from engine.training.train import TrainConfig, prepare_data

SIDE = 6000  # 36 Mpx: a full-grid label array, split and integral images would be hundreds of MB
TRANSFORM = from_origin(600000, 5000000, 10, 10)
CRS = "EPSG:32631"
TILE = 256


def _sparse_raster(path, shape, count, dtype, boxes, values, nodata=None):
    """A tiled, compressed GeoTIFF of which only the tiles meeting ``boxes`` (row0, col0, row1,
    col1) are written, with ``values(window) -> [count, h, w]``; the others stay sparse."""
    height, width = shape
    tiles = {(r, c) for r0, c0, r1, c1 in boxes
             for r in range(r0 // TILE * TILE, r1, TILE) for c in range(c0 // TILE * TILE, c1, TILE)}
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype,
               "crs": CRS, "transform": TRANSFORM, "tiled": True, "blockxsize": TILE, "blockysize": TILE,
               "compress": "deflate", "sparse_ok": True, "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        for r, c in sorted(tiles):
            window = Window(c, r, min(TILE, width - c), min(TILE, height - r))
            dst.write(values(window).astype(dtype), window=window)
    return path


def _noise(count):
    def values(window):
        rng = np.random.default_rng(int(window.row_off) * 7919 + int(window.col_off))
        return rng.integers(500, 3000, (count, int(window.height), int(window.width)))
    return values


# three squares (row0, col0, side) far apart, the middle one across a LABEL_BLOCK boundary
SQUARES = [(300, 400, 180, 1), (2950, 3000, 200, 2), (5200, 900, 160, 1)]


def _polygon(row, col, side):
    """A square of ``side`` pixels with its top-left corner at pixel (row, col), as GeoJSON."""
    x0, y0 = TRANSFORM @ (col, row)
    x1, y1 = TRANSFORM @ (col + side, row + side)
    return {"type": "Polygon", "coordinates": [[(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]]}


def _polygons(path, squares=SQUARES):
    schema = {"geometry": "Polygon", "properties": {"class_id": "int"}}
    with fiona.open(path, "w", driver="GPKG", schema=schema, crs=CRS) as dst:
        for row, col, side, value in squares:
            dst.write({"geometry": _polygon(row, col, side), "properties": {"class_id": value}})
    return path


def _boxes(squares=SQUARES, margin=TILE):
    return [(max(r - margin, 0), max(c - margin, 0), min(r + s + margin, SIDE), min(c + s + margin, SIDE))
            for r, c, s, _ in squares]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene_scale")
    image = _sparse_raster(folder / "image.tif", (SIDE, SIDE), 4, "uint16", _boxes(), _noise(4))
    return image, _polygons(folder / "labels.gpkg")


@pytest.fixture
def reads(monkeypatch):
    """Every window the image stack reads."""
    seen = []
    real = RasterStack.read

    def read(self, window):
        seen.append(window)
        return real(self, window)

    monkeypatch.setattr(RasterStack, "read", read)
    return seen


def _prepare(image, labels, **kw):
    cfg = TrainConfig(images=[str(image)], labels=str(labels), out="unused", **kw)
    return prepare_data(cfg, get_backbone_spec("prithvi_eo_v2_tiny"), Reporter("quiet"))


def _area(window) -> int:
    return int(window.width) * int(window.height)


def _check_split(data):
    """Training and validation both hold pixels; no training crop covers a validation pixel."""
    train, val, chip = data.train_target, data.val_target, data.chip_size
    assert train.labelled > 0 and val.labelled > 0 and data.val_set is not None
    for r, c in data.train_set.positions:
        window = Window(int(c), int(r), chip, chip)
        assert (train.crop(window) >= 0).any() and not (val.crop(window) >= 0).any()
    for window in data.val_set.windows:
        assert (val.crop(window) >= 0).any()
    x, y = data.train_set[0]
    assert x.shape == (4, chip, chip) and (y >= 0).any()


def test_polygons_on_a_large_raster_are_rasterised_and_read_only_in_their_windows(scene, reads):
    image, labels = scene
    data = _prepare(image, labels, label_field="class_id")
    # class counts equal a direct rasterisation of the polygons on the whole grid
    whole = rasterize([(_polygon(r, c, s), v) for r, c, s, v in SQUARES], out_shape=(SIDE, SIDE),
                      transform=TRANSFORM, fill=0, dtype="uint8")
    expected = np.bincount(whole.ravel(), minlength=3)[1:]
    assert expected.sum() == sum(s * s for _, _, s, _ in SQUARES)
    assert [c["value"] for c in data.classes] == [1, 2]
    kept = load_labels(labels, data.grid, "class_id")
    assert kept.class_counts().tolist() == expected.tolist()
    # the label arrays hold the squares' windows, not the grid
    label_area = sum(w.index.size for w in data.train_target.windows)
    assert label_area == expected.sum()  # the squares fill their windows exactly
    assert len(data.train_target.windows) == 8  # squares cut by the LABEL_BLOCK edges: 2 + 4 + 2 pieces
    # the image is read only under the labels (and one block to check it holds data at all)
    squares = [(r, c, r + s, c + s) for r, c, s, _ in SQUARES]
    under = [w for w in reads if any(r0 <= w.row_off and w.row_off + w.height <= r1 and
                                     c0 <= w.col_off and w.col_off + w.width <= c1 for r0, c0, r1, c1 in squares)]
    others = [w for w in reads if w not in under]
    assert under and sum(_area(w) for w in under) <= label_area
    assert len(others) == 1 and _area(others[0]) <= 1024 * 1024  # check_has_data: the first block
    _check_split(data)


def test_a_sparse_label_raster_is_scanned_by_strips_and_kept_in_windows(scene, tmp_path, reads, monkeypatch):
    image, _ = scene
    patches = [(800, 4500, 150, 3), (3100, 200, 220, 5), (4000, 4090, 300, 3)]  # the last across blocks

    def values(window):
        out = np.zeros((1, int(window.height), int(window.width)), np.uint8)
        for row, col, side, value in patches:
            r0, c0 = max(row - int(window.row_off), 0), max(col - int(window.col_off), 0)
            r1, c1 = row + side - int(window.row_off), col + side - int(window.col_off)
            if r1 > 0 and c1 > 0:
                out[0, r0:max(r1, 0), c0:max(c1, 0)] = value
        return out

    labels = _sparse_raster(tmp_path / "labels.tif", (SIDE, SIDE), 1, "uint8", _boxes(patches, 0), values, nodata=0)
    import engine.data.labels as labels_module
    label_reads = []
    real_open = labels_module.open_raster

    def open_raster(path, what="raster"):
        ds = real_open(path, what)
        real_read = ds.read

        def read(*args, window=None, **kw):
            label_reads.append(window)
            return real_read(*args, window=window, **kw)

        monkeypatch.setattr(ds, "read", read, raising=False)
        return ds

    monkeypatch.setattr(labels_module, "open_raster", open_raster)
    data = _prepare(image, labels, chip_size=64)
    # read in strips of at most one label block, every strip once
    assert label_reads and all(w is not None and w.height <= LABEL_BLOCK and w.width == SIDE for w in label_reads)
    assert sum(int(w.height) for w in label_reads) == SIDE
    assert [c["value"] for c in data.classes] == [3, 5]
    kept = load_labels(labels, data.grid)
    assert kept.class_counts().tolist() == [150 ** 2 + 300 ** 2, 220 ** 2]
    assert sum(w.index.size for w in kept.windows) == 150 ** 2 + 300 ** 2 + 220 ** 2
    assert sum(_area(w) for w in reads) <= kept.labelled + 1024 * 1024  # + check_has_data's block
    _check_split(data)


def test_windows_give_the_same_split_crops_and_chip_size_as_one_array(tmp_path):
    """The labels cut into LABEL_BLOCK windows give exactly what one array of the grid gives."""
    shape = (1300, 1100)
    rng = np.random.default_rng(4)
    full = np.full(shape, -1, np.int16)
    for row, col, h, w in [(100, 80, 300, 250), (450, 430, 200, 160), (900, 700, 380, 300), (1000, 50, 90, 500)]:
        full[row:row + h, col:col + w] = rng.integers(0, 3, (h, w))
    profile = {"driver": "GTiff", "width": shape[1], "height": shape[0], "count": 1, "dtype": "int16",
               "crs": CRS, "transform": TRANSFORM, "nodata": -1}
    with rasterio.open(tmp_path / "labels.tif", "w", **profile) as dst:
        dst.write(full, 1)
    with rasterio.open(tmp_path / "labels.tif") as src:
        windows = load_labels(tmp_path / "labels.tif", Grid.of(src))
    assert len(windows.windows) > 4 and np.array_equal(windows.index, full)
    one = LabelMask.of_array(full, windows.classes)
    assert choose_chip_size(windows, 16) == choose_chip_size(full, 16)
    for chip, fraction, seed in [(32, 0.2, 0), (64, 0.3, 5), (96, 0.2, 1)]:
        train, val = training_split(windows, chip, fraction, seed)
        train_one, val_one = training_split(one, chip, fraction, seed)
        assert np.array_equal(train.index, train_one.index) and np.array_equal(val.index, val_one.index)
        assert (val.index >= 0).any() and (train.index >= 0).any()
        assert np.array_equal(crop_positions(train, val, chip, 4), crop_positions(train_one, val_one, chip, 4))
        assert labelled_windows(val, chip, chip) == labelled_windows(val_one, chip, chip)
        assert train.class_counts().tolist() == np.bincount(train_one.index[train_one.index >= 0], minlength=3).tolist()


def test_evaluate_by_blocks_equals_the_full_array_confusion_matrix(tmp_path, monkeypatch):
    shape = (300, 420)
    rng = np.random.default_rng(2)
    predicted = rng.integers(1, 4, shape).astype(np.uint8)
    predicted[:20] = 255  # nodata
    profile = {"driver": "GTiff", "width": shape[1], "height": shape[0], "count": 1, "dtype": "uint8",
               "crs": CRS, "transform": TRANSFORM, "nodata": 255, "tiled": True, "blockxsize": 64,
               "blockysize": 64}
    with rasterio.open(tmp_path / "pred.tif", "w", **profile) as dst:
        dst.write(predicted, 1)
    squares = [(10, 10, 70, 1), (100, 150, 90, 2), (230, 330, 60, 3), (150, 20, 40, 2)]
    labels = _polygons(tmp_path / "labels.gpkg", squares)
    reference = rasterize([(_polygon(r, c, s), v) for r, c, s, v in squares], out_shape=shape,
                          transform=TRANSFORM, fill=0, dtype="uint8")
    keep = (reference > 0) & (predicted != 255)
    expected = confusion(reference[keep].astype(int) - 1, predicted[keep].astype(int) - 1, 3)
    result = evaluate(tmp_path / "pred.tif", labels, label_field="class_id")
    assert result["confusion_matrix"] == expected.tolist() and expected.sum() > 10000
    # the same, reading only the blocks under the labels once the classes are known
    with rasterio.open(tmp_path / "pred.tif", "r+") as dst:
        dst.update_tags(GEOPEFT_CLASSES='[{"value": 1}, {"value": 2}, {"value": 3}]')
    seen = []
    real_read = rasterio.io.DatasetReader.read

    def read(self, *args, window=None, **kw):
        seen.append(window)
        return real_read(self, *args, window=window, **kw)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    again = evaluate(tmp_path / "pred.tif", labels, label_field="class_id")
    assert again["confusion_matrix"] == expected.tolist()
    assert seen and all(w.width <= 64 and w.height <= 64 for w in seen)
    under_labels = {(r, c) for r in range(0, shape[0], 64) for c in range(0, shape[1], 64)
                     if (reference[r:r + 64, c:c + 64] > 0).any()}
    assert {(int(w.row_off), int(w.col_off)) for w in seen} == under_labels and len(seen) == len(under_labels) < 35


def test_labels_off_the_image_are_still_refused_clearly(scene, tmp_path):
    image, _ = scene
    with rasterio.open(image) as src:
        grid = Grid.of(src)
    far = _polygons(tmp_path / "far.gpkg", [(-5000, 200, 100, 1), (200, SIDE + 3000, 100, 2)])
    with pytest.raises(EngineError, match="do not overlap"):
        load_labels(far, grid, "class_id")
    empty = _sparse_raster(tmp_path / "empty.tif", (SIDE, SIDE), 1, "uint8", [], None, nodata=0)
    with pytest.raises(EngineError, match="do not overlap the image: no labelled pixel"):
        load_labels(empty, grid)
