"""``export --profile deepness`` (issue 10): an ONNX model the Deepness QGIS plugin
(PUTvision/qgis-plugin-deepness) loads and runs unchanged. The facts asserted here were read in
Deepness's source (commit f450c63); each test names the file and function it follows. Deepness
itself is not imported (it needs QGIS): its loading and preprocessing are reproduced minimally."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import rasterio
from affine import Affine

from engine.protocol import EngineError, Reporter, decode_event
from tests.conftest import TINY, run_engine

PIXEL_M = 0.5  # an aerial image: Deepness's resolution is 50 cm/px


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The demo scene as an 8-bit raster on a 0.5 m grid, no nodata (Deepness has none)."""
    from engine.data.demo import make_demo_scene

    folder = tmp_path_factory.mktemp("deepness_scene")
    demo = make_demo_scene(folder / "demo", size=96, seed=1)
    with rasterio.open(demo.image) as src:
        profile, names = src.profile, src.descriptions
        data = np.clip(src.read() // 16, 1, 255).astype(np.uint8)
        transform = Affine(PIXEL_M, 0, src.transform.c, 0, -PIXEL_M, src.transform.f)
    image = folder / "scene_u8.tif"
    with rasterio.open(image, "w", **{**profile, "dtype": "uint8", "nodata": None, "transform": transform}) as dst:
        dst.write(data)
        for i, name in enumerate(names):
            dst.set_band_description(i + 1, name)
    with rasterio.open(demo.labels) as src:
        labels_profile, labels_data = src.profile, src.read()
    labels = folder / "labels.tif"
    with rasterio.open(labels, "w", **{**labels_profile, "transform": transform}) as dst:
        dst.write(labels_data)
    return image, labels, data


@pytest.fixture(scope="module")
def model(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepness_model") / "model"
    run_engine("train", "--image", scene[0], "--labels", scene[1], *TINY, "--out", out)
    return out


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepness_onnx") / "model.onnx"
    done = run_engine("export", "--model", model, "--out", out, "--profile", "deepness")
    return out, done


def _card(model) -> dict:
    return json.loads((model / "card.json").read_text())


def _warnings(done) -> list[str]:
    return [e["message"] for e in done["_events"] if e["event"] == "warning"]


class DeepnessLike:
    """What Deepness does with an ONNX file, reproduced from its source (no code copied):
    processing/models/model_base.py ``ModelBase.__init__``, ``get_metadata_*``,
    ``get_outputs_channel_names``, ``preprocessing`` (with preprocessing_utils.py) and
    processing/map_processor/map_processor_segmentation.py ``_process_tile``."""

    def __init__(self, path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        assert len(inputs) == 1  # ModelBase.__init__ refuses more than one input
        self.input = inputs[0]
        self.meta = self.session.get_modelmeta().custom_metadata_map
        mean = json.loads(self.meta.get("standardization_mean", "null"))
        std = json.loads(self.meta.get("standardization_std", "null"))
        channels = self.input.shape[-3]
        # StandardizationParameters: float32 arrays, identity when the metadata is absent
        self.mean = np.array([float(v) for v in mean] if mean else [0.0] * channels, np.float32)
        self.std = np.array([float(v) for v in std] if std else [1.0] * channels, np.float32)

    def value(self, key):
        return json.loads(self.meta[key])  # every get_metadata_* json-decodes its value

    def class_names(self) -> list[str]:
        names = self.value("class_names")
        ordered = sorted(names.items(), key=lambda kv: int(kv[0]))
        assert [int(k) for k, _ in ordered] == list(range(len(ordered)))  # consecutive, else Deepness raises
        return [v for _, v in ordered]

    def probabilities(self, tiles_nhwc: np.ndarray) -> np.ndarray:
        """tiles: (N, H, W, bands) in the raster's type, as get_tile_image returns them."""
        x = tiles_nhwc[:, :, :, :self.input.shape[-3]]
        x = np.float32(x * 1. / 255.)
        x = (x - self.mean) / self.std
        x = np.transpose(x, (0, 3, 1, 2))
        return self.session.run(None, {self.input.name: x})[0]

    def classes(self, tiles_nhwc: np.ndarray) -> np.ndarray:
        """Deepness's class map (0-based here): threshold from seg_thresh, then argmax."""
        p = self.probabilities(tiles_nhwc)
        p[p < float(self.value("seg_thresh"))] = 0.0
        return p.argmax(axis=1)


def test_metadata_is_what_deepness_reads(model, exported):
    path, done = exported
    card, deepness = _card(model), DeepnessLike(path)
    # model_base.py get_metadata_model_type: json.loads, then str(value).capitalize() names the
    # class in model_types.py ModelType ("Segmentor" for segmentation)
    assert str(deepness.value("model_type")).capitalize() == "Segmentor"
    # get_outputs_channel_names: a JSON dict of consecutive integer keys
    assert deepness.class_names() == [c["name"] for c in card["classes"]]
    # get_metadata_resolution: float, cm per pixel (map_processing_parameters.py divides by 100 for metres)
    assert isinstance(deepness.value("resolution"), float) and deepness.value("resolution") == PIXEL_M * 100
    # get_metadata_tiles_overlap: int, percent (processing_overlap.py get_overlap_px); GeoPEFT's
    # predict overlaps by a quarter tile
    assert deepness.value("tiles_overlap") == 25
    # get_metadata_tile_size reads tile_size; the docs' table and tools/add_model_metadata.py say tiles_size
    assert deepness.value("tile_size") == deepness.value("tiles_size") == card["chip_size"] == 32
    # get_metadata_standarization_parameters: lists of floats, one per input channel; identity,
    # because the scaling is inside the graph
    channels = len(card["input"]["bands"])
    assert deepness.value("standardization_mean") == [0.0] * channels
    assert deepness.value("standardization_std") == [1.0] * channels
    # deepness_dockwidget.py _load_default_model_parameters: 0 unticks the probability threshold
    # (ticked at 0.5 by default, which would turn pixels with no class ≥ 0.5 into class 0) and
    # the small-segment filter (ticked at 9 px by default)
    assert deepness.value("seg_thresh") == 0 and deepness.value("seg_small_segment") == 0
    # GeoPEFT's own card travels under another key: GeoPEFT's predict must not take this model
    assert "geopeft_card" not in deepness.meta
    inner = json.loads(deepness.meta["geopeft_deepness_card"])
    assert inner["export"]["profile"] == "deepness" and inner["classes"] == card["classes"]
    assert any("8-bit imagery only" in w for w in _warnings(done))
    assert done["profile"] == "deepness" and done["max_abs_diff"] <= 1e-4


def test_input_is_fixed_but_for_the_batch_and_versions_fit_deepness(model, exported):
    path, _ = exported
    card, deepness = _card(model), DeepnessLike(path)
    channels, classes = len(card["input"]["bands"]), len(card["classes"])
    batch, c, h, w = deepness.input.shape
    # model_base.py get_model_batch_size: a str batch dimension is a dynamic batch
    assert isinstance(batch, str) and (c, h, w) == (channels, 32, 32)
    assert deepness.input.type == "tensor(float)"
    # segmentor.py get_number_of_output_channels reads shape[-3] of a 4-D output: a fixed class count
    outputs = deepness.session.get_outputs()
    assert len(outputs) == 1
    out_batch, k, oh, ow = outputs[0].shape
    assert isinstance(out_batch, str) and (k, oh, ow) == (classes, 32, 32)
    # python_requirements/requirements.txt: onnxruntime ≤ 1.17.0, i.e. IR ≤ 9 and opset ≤ 20
    proto = onnx.load(str(path))
    assert proto.ir_version <= 9
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] <= 20
    onnx.checker.check_model(proto)


def test_deepness_input_gives_geopeft_probabilities(model, exported, scene):
    from engine.data.chips import normalise
    from engine.inference.runners import TorchRunner

    path, _ = exported
    _, _, data = scene
    card = _card(model)
    chips = np.stack([data[:, 0:32, 0:32], data[:, 40:72, 50:82]])  # (N, bands, 32, 32) uint8
    # GeoPEFT's predict path on the raw chips: (x − mean) / std, then the PyTorch model in fp32
    runner = TorchRunner(model, "cpu", precision="32")
    geopeft = runner(np.stack([normalise(c.astype(np.float32), np.ones(c.shape[1:], bool),
                                         card["input"]["mean"], card["input"]["std"]) for c in chips]))
    deepness = DeepnessLike(path)
    theirs = deepness.probabilities(np.transpose(chips, (0, 2, 3, 1)))  # Deepness tiles are NHWC
    assert theirs.shape == geopeft.shape == (2, len(card["classes"]), 32, 32)
    assert np.abs(theirs - geopeft).max() <= 1e-4
    np.testing.assert_allclose(theirs.sum(axis=1), 1.0, atol=1e-5)  # probabilities, not logits
    assert (deepness.classes(np.transpose(chips, (0, 2, 3, 1))) == geopeft.argmax(axis=1)).all()
    # one tile at a time too (Deepness's batch size is the user's choice with a dynamic batch)
    single = deepness.probabilities(np.transpose(chips[1:], (0, 2, 3, 1)))
    assert np.abs(single - geopeft[1:]).max() <= 1e-4


def test_geopeft_predict_refuses_the_deepness_model(exported):
    from engine.inference.runners import OnnxRunner

    with pytest.raises(EngineError, match="no GeoPEFT model card"):
        OnnxRunner(exported[0], "cpu")


def test_a_model_not_trained_on_uint8_is_refused_unless_forced(model, tmp_path):
    other = tmp_path / "uint16_model"
    shutil.copytree(model, other)
    card = _card(other)
    card["input"]["source_dtype"] = "uint16"
    (other / "card.json").write_text(json.dumps(card))
    out = tmp_path / "m.onnx"
    refused = run_engine("export", "--model", other, "--out", out, "--profile", "deepness", expect_ok=False)
    assert refused["_rc"] == 2 and not out.exists()
    error = next(e for e in refused["_events"] if e["event"] == "error")
    assert "uint16" in error["message"] and "--force" in error["hint"]
    forced = run_engine("export", "--model", other, "--out", out, "--profile", "deepness", "--force")
    assert out.exists() and forced["out"] == str(out)
    assert any("uint16" in w and "--force" in w for w in _warnings(forced))
    # the default profile does not care about the pixel type
    run_engine("export", "--model", other, "--out", tmp_path / "plain.onnx")


def test_resolution_is_left_out_without_a_projected_crs(model):
    from rasterio.crs import CRS

    from engine.export import deepness

    card = _card(model)
    stream = io.StringIO()
    meta = deepness.metadata(card, Reporter("jsonl", stream))
    assert json.loads(meta["resolution"]) == PIXEL_M * 100 and not stream.getvalue()
    card["grid"]["crs"] = CRS.from_epsg(4326).to_wkt()
    card["grid"]["transform"] = [0.0001, 0, 20.0, 0, -0.0001, 50.0]
    meta = deepness.metadata(card, Reporter("jsonl", stream))
    assert "resolution" not in meta
    warnings = [decode_event(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in warnings] == ["warning"] and "not projected" in warnings[0]["message"]
    # a projected CRS in feet: the pixel size is converted to centimetres
    card["grid"]["crs"] = CRS.from_epsg(2229).to_wkt()  # NAD83 / California zone 5 (ftUS)
    card["grid"]["transform"] = [2.0, 0, 0, 0, -2.0, 0]
    assert json.loads(deepness.metadata(card, Reporter("quiet"))["resolution"]) == pytest.approx(60.96, abs=1e-3)


def test_the_export_check_covers_the_input_conversion(model, tmp_path, monkeypatch):
    from engine.export import deepness, export_onnx

    right = deepness.wrap_input
    # a conversion that forgets Deepness's ÷255 (std and mean as if the input were raw pixels)
    monkeypatch.setattr(deepness, "wrap_input", lambda m, mean, std: right(m, [v / 255 for v in mean],
                                                                          [v * 255 for v in std]))
    out = tmp_path / "wrong.onnx"
    with pytest.raises(EngineError, match="differs from PyTorch"):
        export_onnx(model, out, profile="deepness")
    assert not out.exists() and not list(tmp_path.iterdir())
