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
from tests.conftest import TINY, run_engine


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

def _binary_labels_on_shifted_grid(small_scene, path):
    """0/1 labels (vegetation or not), no nodata value, 5 px right and 3 px up of the image grid."""
    with rasterio.open(small_scene.labels) as src:
        profile, labels = src.profile, src.read(1)
    binary = (labels == 2).astype("uint8")
    profile.update(nodata=None, transform=profile["transform"] @ Affine.translation(5, -3))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(binary, 1)
    return path, binary


def test_labels_on_a_shifted_grid_keep_class_0(small_scene, tmp_path):
    path, binary = _binary_labels_on_shifted_grid(small_scene, tmp_path / "binary.tif")
    with rasterio.open(small_scene.image) as src:
        grid = Grid.of(src)
    mask = load_labels(path, grid)
    assert [c["value"] for c in mask.classes] == [0, 1]
    # image pixel (r, c) is label pixel (r + 3, c - 5); what the labels do not cover is unlabelled
    assert np.array_equal(mask.index[:93, 5:], binary[3:, :91])
    assert (mask.index[:, :5] == -1).all() and (mask.index[93:] == -1).all()


def test_binary_labels_on_a_shifted_grid_train_and_score_both_classes(small_scene, tmp_path):
    labels, _ = _binary_labels_on_shifted_grid(small_scene, tmp_path / "binary.tif")
    run_engine("train", "--image", small_scene.image, "--labels", labels, *TINY, "--out", tmp_path / "m")
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert [c["value"] for c in card["classes"]] == [0, 1]
    run_engine("predict", "--model", tmp_path / "m", "--image", small_scene.image, "--out", tmp_path / "p.tif")
    result = run_engine("evaluate", "--prediction", tmp_path / "p.tif", "--labels", labels)
    assert set(result["per_class"]) == {"class 0", "class 1"}
    assert all(pc["pixels"] > 0 for pc in result["per_class"].values())


# -- defect 4: ONNX with external data when one file would pass protobuf's 2 GB ----------------

def test_export_past_the_single_file_limit_writes_a_data_file_that_travels_with_it(tiny_model, tiny_onnx, small_scene,
                                                                                   tmp_path):
    from engine.export import export_onnx
    from engine.inference.predict import predict

    out = tmp_path / "big" / "model.onnx"
    stream = io.StringIO()
    summary = export_onnx(tiny_model, out, Reporter("jsonl", stream), single_file_max_bytes=1024)
    data = out.with_name("model.onnx.data")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    artifact = [e for e in _events(stream) if e["event"] == "artifact"][0]
    assert artifact["path"] == str(out) and artifact["data_file"] == str(data)
    assert summary["data_file"] == str(data) and summary["max_abs_diff"] <= 1e-4
    assert data.stat().st_size > 10 * out.stat().st_size  # the weights are in the data file
    assert data.stat().st_mode == out.stat().st_mode  # shared alike
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # the final name, not a temporary one
    # the pair moved elsewhere still predicts, like the single-file export
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in (out, data):
        shutil.move(p, moved / p.name)
    predict(moved / "model.onnx", [small_scene.image], tmp_path / "a.tif")
    predict(tiny_onnx, [small_scene.image], tmp_path / "b.tif")
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert np.array_equal(a.read(), b.read())
    assert not tiny_onnx.with_name("model.onnx.data").exists()  # small models stay one file


def test_failed_export_leaves_neither_file(tiny_model, tmp_path, monkeypatch):
    import engine.export
    from engine.export import export_onnx

    monkeypatch.setattr(engine.export, "PARITY_TOLERANCE", -1.0)  # every parity check fails
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(EngineError, match="differs from PyTorch"):
        export_onnx(tiny_model, out, single_file_max_bytes=1024)
    assert list(out.parent.iterdir()) == []


# -- defect 5: predict checks the raster against the card --------------------------------------

def test_predict_refuses_to_write_over_an_input(tiny_model, small_scene, tmp_path):
    image = shutil.copy(small_scene.image, tmp_path / "scene.tif")
    before = (tmp_path / "scene.tif").read_bytes()
    done = run_engine("predict", "--model", tiny_model, "--image", image, "--out", image, expect_ok=False)
    errors = [e for e in done["_events"] if e["event"] == "error"]
    assert done["_rc"] == 2 and errors and "is an input image" in errors[0]["message"] and errors[0]["hint"]
    from engine.inference.predict import predict
    with pytest.raises(EngineError, match="is an input image"):
        predict(tiny_model, [image], tmp_path / "p.tif", probabilities=tmp_path / "sub" / ".." / "scene.tif")
    assert (tmp_path / "scene.tif").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


@pytest.mark.parametrize("kind", ["pytorch", "onnx"])
def test_predict_warns_about_a_raster_unlike_the_training_data(kind, tiny_model, tiny_onnx, small_scene, tmp_path):
    from engine.inference.predict import predict

    chosen = tiny_model if kind == "pytorch" else tiny_onnx
    same = Reporter("quiet")
    predict(chosen, [small_scene.image], tmp_path / "same.tif", reporter=same)
    assert same.warnings == []  # the training raster itself passes every check
    with rasterio.open(small_scene.image) as src:
        reflectance = src.read().astype("float32") / 10000  # 0-1 instead of 0-10000
        coarse = src.transform @ Affine.scale(10)  # 300 m pixels instead of 30 m
    other = _rewrite(small_scene.image, tmp_path / "other.tif", reflectance, dtype="float32", transform=coarse)
    warned = Reporter("quiet")
    predict(chosen, [other], tmp_path / "other_pred.tif", reporter=warned)
    text = "\n".join(warned.warnings)
    assert "float32" in text and "uint16" in text  # dtype family
    assert "BLUE" in text and "10000" in text  # value range: which band, and how far off
    assert "pixel size" in text and "300" in text and "30 " in text
    assert (tmp_path / "other_pred.tif").exists()  # warnings, not errors


def test_predict_refuses_bands_in_another_order(tiny_model, small_scene, tmp_path):
    from engine.inference.predict import predict

    order = [3, 2, 1, 4, 5, 6]
    with rasterio.open(small_scene.image) as src:
        data, names = src.read(order), [src.descriptions[b - 1] for b in order]
    swapped = _rewrite(small_scene.image, tmp_path / "swapped.tif", data)
    with rasterio.open(swapped, "r+") as dst:
        for i, name in enumerate(names):
            dst.set_band_description(i + 1, name)
    with pytest.raises(EngineError, match="band 1 is RED, the model was trained on BLUE") as err:
        predict(tiny_model, [swapped], tmp_path / "p.tif")
    assert "--bands 3,2,1,4,5,6" in err.value.hint
    assert not (tmp_path / "p.tif").exists()
    reporter = Reporter("quiet")
    predict(tiny_model, [swapped], tmp_path / "p.tif", bands=order, reporter=reporter)
    assert reporter.warnings == []


def test_cards_from_before_source_dtype_still_predict(tiny_model, small_scene, tmp_path):
    from engine.inference.predict import predict

    old = shutil.copytree(tiny_model, tmp_path / "old")
    card = json.loads((old / "card.json").read_text())
    del card["input"]["source_dtype"], card["grid"]
    (old / "card.json").write_text(json.dumps(card))
    reporter = Reporter("quiet")
    summary = predict(old, [small_scene.image], tmp_path / "p.tif", reporter=reporter)
    assert summary["out"] and reporter.warnings == []


def test_a_band_far_from_its_training_mean_is_named(tiny_model, small_scene, tmp_path):
    from engine.data.rasters import RasterStack
    from engine.inference.checks import check_image

    card = json.loads((tiny_model / "card.json").read_text())
    with rasterio.open(small_scene.image) as src:
        data = src.read()
    data[3] = np.minimum(data[3].astype(np.int64) * 4, 65535)  # NIR four times brighter, the rest as trained
    brighter = _rewrite(small_scene.image, tmp_path / "nir.tif", data.astype("uint16"))
    reporter = Reporter("quiet")
    with RasterStack([brighter]) as stack:
        check_image(stack, card, reporter)
    assert len(reporter.warnings) == 1 and "NIR_NARROW mean" in reporter.warnings[0]
    assert not any(f"{name} mean" in reporter.warnings[0] for name in ("BLUE", "GREEN", "RED", "SWIR_1"))
