"""What the engine is given is checked, and what it writes is whole: label rasters on another grid
keep class 0, ONNX exports too large for one protobuf go to a data file beside the model, and
predict checks a raster against the model card before running (issue 6, defects 3, 4 and 5)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx
import pytest
import rasterio
from affine import Affine

from engine.data.labels import load_labels
from engine.data.rasters import Grid
from engine.protocol import EngineError, Reporter, decode_event
from tests.conftest import run_engine

TINY = ["--weights", "none", "--epochs", "1", "--chip-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from engine.data.demo import make_demo_scene

    return make_demo_scene(tmp_path_factory.mktemp("small_scene"), size=96, seed=1)


@pytest.fixture(scope="module")
def model(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "model"
    run_engine("train", "--image", scene.image, "--labels", scene.labels, *TINY, "--out", out)
    return out


@pytest.fixture(scope="module")
def onnx_model(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust_onnx") / "model.onnx"
    run_engine("export", "--model", model, "--out", out)
    return out


def _events(stream: io.StringIO) -> list[dict]:
    return [decode_event(line) for line in stream.getvalue().splitlines() if line.strip()]


def _rewrite(src_path, dst_path, data=None, **profile_changes):
    """Copy a raster with other pixels and/or profile entries (band descriptions kept)."""
    with rasterio.open(src_path) as src:
        profile, descriptions = src.profile, src.descriptions
        data = src.read() if data is None else data
    with rasterio.open(dst_path, "w", **{**profile, **profile_changes}) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions):
            if d:
                dst.set_band_description(i + 1, d)
    return dst_path


# -- defect 3: warped label rasters keep class 0 ------------------------------------------------

def _binary_labels_on_shifted_grid(scene, path):
    """0/1 labels (vegetation or not), no nodata value, 5 px right and 3 px up of the image grid."""
    with rasterio.open(scene.labels) as src:
        profile, labels = src.profile, src.read(1)
    binary = (labels == 2).astype("uint8")
    profile.update(nodata=None, transform=profile["transform"] @ Affine.translation(5, -3))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(binary, 1)
    return path, binary


def test_labels_on_a_shifted_grid_keep_class_0(scene, tmp_path):
    path, binary = _binary_labels_on_shifted_grid(scene, tmp_path / "binary.tif")
    with rasterio.open(scene.image) as src:
        grid = Grid.of(src)
    mask = load_labels(path, grid)
    assert [c["value"] for c in mask.classes] == [0, 1]
    # image pixel (r, c) is label pixel (r + 3, c - 5); what the labels do not cover is unlabelled
    assert np.array_equal(mask.index[:93, 5:], binary[3:, :91])
    assert (mask.index[:, :5] == -1).all() and (mask.index[93:] == -1).all()


def test_binary_labels_on_a_shifted_grid_train_and_score_both_classes(scene, tmp_path):
    labels, _ = _binary_labels_on_shifted_grid(scene, tmp_path / "binary.tif")
    run_engine("train", "--image", scene.image, "--labels", labels, *TINY, "--out", tmp_path / "m")
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert [c["value"] for c in card["classes"]] == [0, 1]
    run_engine("predict", "--model", tmp_path / "m", "--image", scene.image, "--out", tmp_path / "p.tif")
    result = run_engine("evaluate", "--prediction", tmp_path / "p.tif", "--labels", labels)
    assert set(result["per_class"]) == {"class 0", "class 1"}
    assert all(pc["pixels"] > 0 for pc in result["per_class"].values())


# -- defect 4: ONNX with external data when one file would pass protobuf's 2 GB ----------------

def test_export_past_the_single_file_limit_writes_a_data_file_that_travels_with_it(model, onnx_model, scene,
                                                                                   tmp_path):
    from engine.export import export_onnx
    from engine.inference.predict import predict

    out = tmp_path / "big" / "model.onnx"
    stream = io.StringIO()
    summary = export_onnx(model, out, Reporter("jsonl", stream), single_file_max_bytes=1024)
    data = out.with_name("model.onnx.data")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    artifact = [e for e in _events(stream) if e["event"] == "artifact"][0]
    assert artifact["path"] == str(out) and artifact["data_file"] == str(data)
    assert summary["data_file"] == str(data) and summary["max_abs_diff"] <= 1e-4
    assert data.stat().st_size > 10 * out.stat().st_size  # the weights are in the data file
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # the final name, not a temporary one
    # the pair moved elsewhere still predicts, like the single-file export
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in (out, data):
        shutil.move(p, moved / p.name)
    predict(moved / "model.onnx", [scene.image], tmp_path / "a.tif")
    predict(onnx_model, [scene.image], tmp_path / "b.tif")
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert np.array_equal(a.read(), b.read())
    assert not onnx_model.with_name("model.onnx.data").exists()  # small models stay one file


def test_failed_export_leaves_neither_file(model, tmp_path, monkeypatch):
    import engine.export
    from engine.export import export_onnx

    monkeypatch.setattr(engine.export, "PARITY_TOLERANCE", -1.0)  # every parity check fails
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(EngineError, match="differs from PyTorch"):
        export_onnx(model, out, single_file_max_bytes=1024)
    assert list(out.parent.iterdir()) == []
