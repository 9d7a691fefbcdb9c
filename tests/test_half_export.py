"""``export --fp16`` (issue 10, Speed): a float16 ONNX model for GPUs with float32 input/output,
the convolutions that see the input bands kept float32, checked against the fp32 model at export
like int8 (refused below 98 % argmax agreement unless --force), predicting with onnxruntime alone.
``--bf16`` is refused (onnxruntime cannot run such a model here, so it could not be checked).
OnnxRunner picks TensorRT, CUDA, CPU among the providers usable here, without noise when none is."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import rasterio
from onnx import TensorProto

from engine.protocol import EngineError, Reporter, decode_event
from tests.conftest import ENGINE_ENV, REPO, run_engine


@pytest.fixture(scope="module")
def fp16(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "model.fp16.onnx"
    done = run_engine("export", "--model", tiny_model, "--out", out, "--fp16")
    return out, done


def _card_in(path) -> dict:
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(meta["geopeft_card"])


def test_fp16_export_is_smaller_and_records_its_precision_and_agreement(fp16, tiny_onnx):
    path, done = fp16
    onnx.checker.check_model(str(path))
    card = _card_in(path)
    assert card["export"]["precision"] == done["precision"] == "fp16" and done["quantize"] is None
    assert "quantize" not in card["export"]
    agreement = card["export"]["agreement"]
    assert agreement["chips"] == done["agreement_chips"] == "training" and agreement["num_chips"] == 16
    assert agreement["argmax_agreement"] == done["argmax_agreement"] >= 0.99
    assert 0 <= agreement["max_prob_diff"] == done["max_prob_diff"] < 0.01
    assert any("fp16 vs fp32 ONNX on 16 training chips" in m and "of pixels with the same class" in m
               and "max probability difference" in m for m in done["_stderr"].splitlines())
    # float16 inside, float32 at the edges: callers feed and read float32 as with the fp32 model
    proto = onnx.load(str(path))
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [TensorProto.FLOAT]
    dtypes = [i.data_type for i in proto.graph.initializer]
    assert dtypes.count(TensorProto.FLOAT16) > 0.9 * len(dtypes)
    assert path.stat().st_size < 0.6 * tiny_onnx.stat().st_size
    assert "precision" not in _card_in(tiny_onnx)["export"] and card["classes"] == _card_in(tiny_onnx)["classes"]
    assert not list(path.parent.glob(".*partial*")) and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_fp16_keeps_the_convolutions_that_see_the_input_bands_fp32(fp16):
    proto = onnx.load(str(fp16[0]))
    dtype = {i.name: i.data_type for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    first = [n for n in convs if "patch_embed" in n.name or "stem1" in n.name]
    assert len(first) == 2  # the patch embedding and the UNet stem
    assert {n.name for n in first} <= set(_card_in(fp16[0])["export"]["float32_nodes"])
    for conv in first:
        assert all(dtype[w] == TensorProto.FLOAT for w in conv.input[1:])  # weights and bias
        # fed the float32 input itself, never the input rounded to float16 and cast back
        tensor, path = conv.input[0], []
        while tensor in producers:
            node = producers[tensor]
            path.append(node)
            tensor = node.input[0]
        assert tensor == "input"
        assert not [n for n in path if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    others = [n for n in convs if n not in first]
    assert others and all(dtype[n.input[1]] == TensorProto.FLOAT16 for n in others)


def test_fp16_predictions_agree_with_fp32_on_the_scene(fp16, tiny_onnx, small_scene, tmp_path):
    from engine.inference.predict import predict
    from engine.inference.runners import OnnxRunner

    runner = OnnxRunner(fp16[0], "auto")
    assert runner.precision == runner.quantize == "fp16"
    assert runner.provider == "CPUExecutionProvider" and runner.device == "cpu"  # no GPU here
    fp32 = OnnxRunner(tiny_onnx, "cpu")
    assert fp32.precision == "fp32" and fp32.quantize is None
    classes = {}
    for name, path in (("fp32", tiny_onnx), ("fp16", fp16[0])):
        summary = predict(path, [small_scene.image], tmp_path / f"{name}.tif")
        assert summary["precision"] == name
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            classes[name] = src.read(1)
    assert len(np.unique(classes["fp32"])) >= 2  # a real map, not one class everywhere
    assert classes["fp16"].shape == classes["fp32"].shape
    assert (classes["fp16"] == classes["fp32"]).mean() >= 0.99


def test_fp16_prediction_runs_without_torch(fp16, small_scene, tmp_path):
    out = tmp_path / "x.tif"
    code = ("import sys; from engine.inference.predict import predict; "
            f"s = predict({str(fp16[0])!r}, [{str(small_scene.image)!r}], {str(out)!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok', s['precision'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENGINE_ENV)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "fp16"], proc.stderr[-2000:]
    assert out.is_file()


def test_low_fp16_agreement_is_refused_and_leaves_nothing_unless_forced(tiny_model, tmp_path, monkeypatch):
    from engine.export import agreement, export_onnx

    monkeypatch.setattr(agreement, "MIN_ARGMAX_AGREEMENT", 1.01)  # no model can reach it
    out = tmp_path / "m.fp16.onnx"
    stream = io.StringIO()
    with pytest.raises(EngineError, match="fp16 vs fp32 ONNX .* below 101%; nothing written") as refused:
        export_onnx(tiny_model, out, Reporter("jsonl", stream), precision="fp16")
    assert "--force" in refused.value.hint and "--fp16" in refused.value.hint
    assert not out.exists() and not list(tmp_path.iterdir())
    assert not [e for e in map(decode_event, stream.getvalue().splitlines()) if e["event"] in ("warning", "artifact")]
    stream = io.StringIO()
    forced = export_onnx(tiny_model, out, Reporter("jsonl", stream), precision="fp16", force=True)
    assert out.is_file() and forced["precision"] == "fp16"
    warnings = [e["message"] for e in map(decode_event, stream.getvalue().splitlines()) if e["event"] == "warning"]
    assert any("written anyway (--force)" in w for w in warnings)
    assert _card_in(out)["export"]["agreement"]["argmax_agreement"] == forced["argmax_agreement"] < 1.01


def test_fp16_with_quantize_bf16_and_fp16_for_deepness_are_refused(tiny_model, tmp_path):
    from engine.export import export_onnx

    out = tmp_path / "m.onnx"
    for args, message, hint in (
            (["--fp16", "--quantize", "int8"], "--fp16 and --quantize exclude each other", "only one"),
            (["--bf16"], "--bf16 is not supported", "--fp16"),
            (["--fp16", "--profile", "deepness"], "--fp16 is for the geopeft profile", "without --fp16")):
        refused = run_engine("export", "--model", tiny_model, "--out", out, *args, expect_ok=False)
        error = next(e for e in refused["_events"] if e["event"] == "error")
        assert refused["_rc"] == 2 and message in error["message"] and hint in error["hint"], error
        assert "nothing written" in error["message"] or "deepness" in args
        assert not list(tmp_path.iterdir())
    both = run_engine("export", "--model", tiny_model, "--out", out, "--fp16", "--bf16", expect_ok=False)
    assert both["_rc"] == 2 and "not allowed with" in both["_stderr"] and not out.exists()
    with pytest.raises(EngineError, match="bfloat16"):
        export_onnx(tiny_model, out, precision="bf16")
    with pytest.raises(EngineError, match="unknown export precision"):
        export_onnx(tiny_model, out, precision="fp8")
    assert not list(tmp_path.iterdir())


def test_onnx_providers_prefer_tensorrt_then_cuda_and_stay_quiet_without_a_gpu(tiny_onnx, capfd, monkeypatch):
    import onnxruntime as ort

    from engine.inference import runners

    # this machine: onnxruntime-gpu lists its GPU providers, but there is no GPU (or no driver)
    capfd.readouterr()
    runner = runners.OnnxRunner(tiny_onnx, "auto")
    out, err = capfd.readouterr()
    assert runner.provider == "CPUExecutionProvider" and out == ""  # nothing on the event stream
    assert "EP Error" not in err and "Failed to create" not in err
    if runners.cuda_device_count() == 0:
        assert runners.onnx_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(EngineError, match="no usable GPU provider"):
            runners.OnnxRunner(tiny_onnx, "gpu")
    assert runners.onnx_providers("cpu") == ["CPUExecutionProvider"]
    # with a GPU: TensorRT, CUDA, CPU among those whose libraries load
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runners, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(runners, "_provider_library_loads", lambda ort, provider: True)
    assert runners.onnx_providers("auto") == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                              "CPUExecutionProvider"]
    assert runners.onnx_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(runners, "_provider_library_loads", lambda ort, provider: provider == "CUDAExecutionProvider")
    assert runners.onnx_providers("gpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_fp16_of_a_model_with_its_weights_in_a_data_file(tiny_model, tiny_onnx, tmp_path):
    """As for models past protobuf's 2 GB: the fp16 weights alone in NAME.onnx.data (the fp32 ones,
    staged in a data file of the same name, are not appended to)."""
    from engine.export import export_onnx
    from engine.inference.runners import OnnxRunner

    out = tmp_path / "m.fp16.onnx"
    done = export_onnx(tiny_model, out, precision="fp16", single_file_max_bytes=2**20)
    data = tmp_path / "m.fp16.onnx.data"
    assert done["data_file"] == str(data) and data.is_file() and done["argmax_agreement"] >= 0.99
    assert data.stat().st_size < 0.6 * tiny_onnx.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.onnx", "m.fp16.onnx.data"]
    runner = OnnxRunner(out, "cpu")
    assert runner.precision == "fp16"
    assert runner(np.zeros((1, 6, 32, 32), np.float32)).shape[0] == 1
