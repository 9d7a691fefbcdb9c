"""``export --quantize int8`` (issue 10, Speed): an int8 ONNX model that predicts with onnxruntime
alone, checked against the fp32 model at export (refused below 98 % argmax agreement unless
--force), the quantisation and its agreement recorded in the card."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import rasterio

from engine.protocol import EngineError, Reporter, decode_event
from tests.conftest import ENGINE_ENV, REPO, run_engine

INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
            "QLinearConv", "ConvInteger"}


@pytest.fixture(scope="module")
def int8(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize_int8") / "model.int8.onnx"
    done = run_engine("export", "--model", tiny_model, "--out", out, "--quantize", "int8")
    return out, done


def _card_in(path) -> dict:
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(meta["geopeft_card"])


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_export_records_the_quantisation_and_its_agreement(int8, tiny_onnx):
    path, done = int8
    card = _card_in(path)
    assert card["export"]["quantize"] == done["quantize"] == "int8-dynamic"
    # the training images are still there: the agreement is measured on training chips
    agreement = card["export"]["agreement"]
    assert agreement["chips"] == done["agreement_chips"] == "training" and agreement["num_chips"] == 16
    assert agreement["argmax_agreement"] == done["argmax_agreement"] >= 0.98
    assert 0 <= agreement["max_prob_diff"] == done["max_prob_diff"] < 0.5
    infos = done["_stderr"].splitlines()  # info lines go to stderr, as text
    assert any("int8-dynamic vs fp32 ONNX on 16 training chips" in m and "of pixels with the same class" in m
               and "max probability difference" in m for m in infos)
    # really int8 inside, smaller than fp32, the fp32 card otherwise unchanged
    assert "MatMulInteger" in _ops(path) and not _ops(tiny_onnx) & INT8_OPS
    assert "ConvInteger" not in _ops(path)  # convolutions, the patch embedding among them, stay fp32
    assert path.stat().st_size < 0.6 * tiny_onnx.stat().st_size
    assert "quantize" not in _card_in(tiny_onnx)["export"]
    assert card["classes"] == _card_in(tiny_onnx)["classes"]
    assert not list(path.parent.glob(".*partial*")) and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_int8_predictions_agree_with_fp32_on_the_scene(int8, tiny_onnx, small_scene, tmp_path):
    from engine.inference.predict import predict
    from engine.inference.runners import OnnxRunner, cpu_count

    runner = OnnxRunner(int8[0], "cpu")
    assert runner.quantize == "int8-dynamic" and OnnxRunner(tiny_onnx, "cpu").quantize is None
    assert runner.session.get_session_options().intra_op_num_threads == cpu_count() >= 1
    classes = {}
    for name, path in (("fp32", tiny_onnx), ("int8", int8[0])):
        summary = predict(path, [small_scene.image], tmp_path / f"{name}.tif")
        assert summary["precision"] == {"fp32": "fp32", "int8": "int8-dynamic"}[name]
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            classes[name] = src.read(1)
    with rasterio.open(small_scene.image) as src:
        assert classes["int8"].shape == (src.height, src.width)
    assert len(np.unique(classes["fp32"])) >= 2  # a real map, not one class everywhere
    assert (classes["int8"] == classes["fp32"]).mean() >= 0.98


def test_int8_prediction_runs_without_torch(int8, small_scene, tmp_path):
    out = tmp_path / "x.tif"
    code = ("import sys; from engine.inference.predict import predict; "
            f"s = predict({str(int8[0])!r}, [{str(small_scene.image)!r}], {str(out)!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok', s['runner'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENGINE_ENV)
    assert proc.returncode == 0 and proc.stdout.split()[0] == "ok", proc.stderr[-2000:]
    assert out.is_file()


def test_low_agreement_is_refused_and_leaves_nothing_unless_forced(tiny_model, tmp_path, monkeypatch):
    from engine.export import agreement, export_onnx

    monkeypatch.setattr(agreement, "MIN_ARGMAX_AGREEMENT", 1.01)  # no model can reach it
    out = tmp_path / "m.int8.onnx"
    stream = io.StringIO()
    with pytest.raises(EngineError, match="below 101%; nothing written") as refused:
        export_onnx(tiny_model, out, Reporter("jsonl", stream), quantize="int8")
    assert "--force" in refused.value.hint
    assert not out.exists() and not list(tmp_path.iterdir())
    errors_or_warnings = [e for e in map(decode_event, stream.getvalue().splitlines())
                          if e["event"] in ("warning", "artifact")]
    assert not errors_or_warnings  # refused before writing: no artifact reported
    stream = io.StringIO()
    forced = export_onnx(tiny_model, out, Reporter("jsonl", stream), quantize="int8", force=True)
    assert out.is_file() and forced["quantize"] == "int8-dynamic"
    warnings = [e["message"] for e in map(decode_event, stream.getvalue().splitlines()) if e["event"] == "warning"]
    assert any("written anyway (--force)" in w for w in warnings)
    assert _card_in(out)["export"]["agreement"]["argmax_agreement"] == forced["argmax_agreement"] < 1.01


def test_static_int8_is_calibrated_on_training_chips_and_keeps_the_patch_embedding_fp32(tiny_model, tiny_onnx, small_scene,
                                                                                        tmp_path):
    from engine.inference.runners import OnnxRunner

    out = tmp_path / "m.static.onnx"
    done = run_engine("export", "--model", tiny_model, "--out", out, "--quantize", "int8-static")
    card = _card_in(out)
    assert card["export"]["quantize"] == done["quantize"] == "int8-static"
    assert card["export"]["agreement"]["chips"] == "training" and done["argmax_agreement"] >= 0.98
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert out.stat().st_size < 0.6 * tiny_onnx.stat().st_size
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    convs = {n.name: n for n in proto.graph.node if n.op_type == "Conv"}
    first = [n for name, n in convs.items() if "patch_embed" in name or n.input[0] == "input"]
    assert len(first) == 2  # the patch embedding and the UNet stem see the input bands: tiny_onnx weights
    assert all(producers.get(n.input[1]) != "DequantizeLinear" for n in first)
    assert sum(producers.get(n.input[1]) == "DequantizeLinear" for n in convs.values()) == len(convs) - 2
    assert OnnxRunner(out, "cpu").quantize == "int8-static"


def test_static_needs_the_training_images_and_dynamic_falls_back_to_random_chips(tiny_model, tmp_path):
    other = tmp_path / "moved_model"
    shutil.copytree(tiny_model, other)
    card = json.loads((other / "card.json").read_text())
    card["training"]["images"] = [str(tmp_path / "gone.tif")]
    (other / "card.json").write_text(json.dumps(card))
    out = tmp_path / "m.int8.onnx"
    refused = run_engine("export", "--model", other, "--out", out, "--quantize", "int8-static", expect_ok=False)
    error = next(e for e in refused["_events"] if e["event"] == "error")
    assert refused["_rc"] == 2 and "not readable" in error["message"] and "--quantize int8" in error["hint"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["moved_model"]
    done = run_engine("export", "--model", other, "--out", out, "--quantize", "int8")
    assert done["quantize"] == "int8-dynamic" and done["agreement_chips"] == "random"
    assert _card_in(out)["export"]["quantize"] == "int8-dynamic" and done["argmax_agreement"] >= 0.98
    assert "MatMulInteger" in _ops(out) or "DynamicQuantizeLinear" in _ops(out)
    assert "not readable" in done["_stderr"] and "random chips" in done["_stderr"]


def test_quantize_is_refused_for_deepness_and_unknown_modes(tiny_model, tmp_path):
    from engine.export import export_onnx

    refused = run_engine("export", "--model", tiny_model, "--out", tmp_path / "d.onnx", "--profile", "deepness",
                         "--quantize", "int8", expect_ok=False)
    error = next(e for e in refused["_events"] if e["event"] == "error")
    assert refused["_rc"] == 2 and "geopeft profile" in error["message"] and not (tmp_path / "d.onnx").exists()
    with pytest.raises(EngineError, match="unknown quantisation"):
        export_onnx(tiny_model, tmp_path / "x.onnx", quantize="int4")
    assert not list(tmp_path.iterdir())
