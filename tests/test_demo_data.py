"""The synthetic demo scene: grid, classes, nodata, determinism, polygons and spectra."""
from __future__ import annotations


import fiona
import numpy as np
import pytest
import rasterio
from rasterio import features
from rasterio.crs import CRS
from rasterio.transform import Affine

from engine.data.demo import BAND_NAMES, CLASSES, DemoScene, make_demo_scene

TRANSFORM = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 5000020.0)
NIR, RED, SWIR_1 = BAND_NAMES.index("NIR_NARROW"), BAND_NAMES.index("RED"), BAND_NAMES.index("SWIR_1")
# Intended mean spectra (BLUE, GREEN, RED, NIR, SWIR1, SWIR2), reflectance x 10000.
TARGET_SPECTRA = {
    "water": (600, 550, 350, 200, 100, 60),
    "vegetation": (400, 700, 450, 3300, 1800, 900),
    "built-up": (1200, 1300, 1400, 2000, 2300, 2100),
    "bare soil": (1400, 1800, 2200, 2700, 3200, 2800),
}


def read(scene: DemoScene) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(scene.image) as src:
        image = src.read()
    with rasterio.open(scene.labels) as src:
        labels = src.read(1)
    return image, labels


def class_means(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {c["name"]: image[:, labels == c["value"]].astype(float).mean(axis=1) for c in CLASSES}


def test_georeferencing_and_format(tmp_path):
    out = tmp_path / "not" / "there" / "yet"
    scene = make_demo_scene(out, size=300, seed=0)
    assert scene.image == out / "scene.tif"
    assert scene.labels == out / "labels.tif"
    assert scene.polygons == out / "labels.gpkg"
    assert scene.classes == CLASSES
    assert sorted(p.name for p in out.iterdir()) == ["labels.gpkg", "labels.tif", "scene.tif"]

    with rasterio.open(scene.image) as src:
        assert src.crs == CRS.from_epsg(32633)
        assert src.transform == TRANSFORM
        assert (src.height, src.width, src.count) == (300, 300, 6)
        assert src.dtypes == ("uint16",) * 6
        assert src.nodata == 0
        assert src.descriptions == tuple(BAND_NAMES)
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.profile["compress"].lower() == "deflate"
        image_grid = (src.crs, src.transform, src.shape)

    with rasterio.open(scene.labels) as src:
        assert (src.crs, src.transform, src.shape) == image_grid
        assert src.count == 1 and src.dtypes == ("uint8",)
        assert src.nodata == 0
        colormap = src.colormap(1)
    for c in CLASSES:
        rgb = tuple(int(c["colour"][i:i + 2], 16) for i in (1, 3, 5))
        assert colormap[c["value"]][:3] == rgb


def test_non_square_scene(tmp_path):
    scene = make_demo_scene(tmp_path, size=(200, 330), seed=3)
    image, labels = read(scene)
    assert image.shape == (6, 200, 330)
    assert labels.shape == (200, 330)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_too_small_scene_is_refused(tmp_path):
    with pytest.raises(ValueError):
        make_demo_scene(tmp_path, size=16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classes_are_roughly_balanced(tmp_path, seed):
    _, labels = read(make_demo_scene(tmp_path, size=512, seed=seed))
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    for c in CLASSES:
        fraction = (labels == c["value"]).mean()
        assert 0.08 <= fraction <= 0.6, (c["name"], fraction)


def test_nodata_corner(tmp_path):
    image, labels = read(make_demo_scene(tmp_path, size=512, seed=0))
    nodata = (image == 0).all(axis=0)
    assert 0.005 <= nodata.mean() <= 0.03
    # A swath edge: all bands are 0 together, labels are 0 there and only there.
    assert np.array_equal(nodata, (image == 0).any(axis=0))
    assert np.array_equal(nodata, labels == 0)
    corners = [nodata[0, 0], nodata[0, -1], nodata[-1, 0], nodata[-1, -1]]
    assert sum(corners) == 1
    assert not nodata[256, 256]


def test_same_seed_same_scene_other_seed_other_scene(tmp_path):
    image_a, labels_a = read(make_demo_scene(tmp_path / "a", size=256, seed=7))
    image_b, labels_b = read(make_demo_scene(tmp_path / "b", size=256, seed=7))
    image_c, labels_c = read(make_demo_scene(tmp_path / "c", size=256, seed=8))
    assert np.array_equal(image_a, image_b)
    assert np.array_equal(labels_a, labels_b)
    assert not np.array_equal(image_a, image_c)
    assert not np.array_equal(labels_a, labels_c)


def test_rewriting_replaces_files_and_leaves_no_temporaries(tmp_path):
    make_demo_scene(tmp_path, size=128, seed=1)
    scene = make_demo_scene(tmp_path, size=128, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.gpkg", "labels.tif", "scene.tif"]
    expected_image, expected_labels = read(make_demo_scene(tmp_path / "fresh", size=128, seed=2))
    image, labels = read(scene)
    assert np.array_equal(image, expected_image)
    assert np.array_equal(labels, expected_labels)


def test_polygons_rasterize_back_to_labels(tmp_path):
    scene = make_demo_scene(tmp_path, size=512, seed=0)
    with rasterio.open(scene.labels) as src:
        labels, transform, crs = src.read(1), src.transform, src.crs
    assert fiona.listlayers(scene.polygons) == ["labels"]
    names = {c["value"]: c["name"] for c in CLASSES}
    with fiona.open(scene.polygons, layer="labels") as src:
        assert CRS.from_user_input(src.crs) == crs
        assert dict(src.schema["properties"]) == {"class_id": "int", "class_name": "str"}
        shapes = []
        for feature in src:
            class_id = feature.properties["class_id"]
            assert feature.properties["class_name"] == names[class_id]
            shapes.append((feature.geometry, class_id))
    assert {value for _, value in shapes} == set(names)
    back = features.rasterize(shapes, out_shape=labels.shape, transform=transform, fill=0, dtype="uint8")
    assert np.array_equal(back, labels)


def test_class_spectra_are_plausible_and_ordered(tmp_path):
    image, labels = read(make_demo_scene(tmp_path, size=512, seed=0))
    means = class_means(image, labels)
    for name, target in TARGET_SPECTRA.items():
        np.testing.assert_allclose(means[name], target, rtol=0.25, atol=60, err_msg=name)

    nir = {name: m[NIR] for name, m in means.items()}
    swir = {name: m[SWIR_1] for name, m in means.items()}
    red = {name: m[RED] for name, m in means.items()}
    nir_red = {name: m[NIR] / m[RED] for name, m in means.items()}
    assert min(nir, key=nir.get) == "water"
    assert min(swir, key=swir.get) == "water"
    assert max(nir_red, key=nir_red.get) == "vegetation"
    assert max(nir, key=nir.get) == "vegetation"
    assert max(red, key=red.get) == "bare soil"
    assert max(swir, key=swir.get) == "bare soil"


def test_classes_overlap_a_little_per_pixel(tmp_path):
    """Nearest class mean per pixel gets most pixels right, but far from all of them."""
    image, labels = read(make_demo_scene(tmp_path, size=512, seed=0))
    valid = labels > 0
    x, y = image[:, valid].T.astype(float), labels[valid]
    means = np.stack([x[y == c["value"]].mean(axis=0) for c in CLASSES])
    scaled = (x[:, None, :] - means[None]) / x.std(axis=0)
    predicted = np.array([c["value"] for c in CLASSES])[(scaled ** 2).sum(axis=-1).argmin(axis=1)]
    accuracy = (predicted == y).mean()
    assert 0.75 <= accuracy <= 0.97
