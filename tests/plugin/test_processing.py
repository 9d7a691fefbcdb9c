"""The GeoPEFT Processing provider in a real QGIS, driving the real engine subprocess."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from qgis.core import (
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProcessingUtils,
    QgsProject,
    QgsRasterLayer,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)

from plugin_testdata import BANDS, CLASSES, needs_engine, tiny_train_parameters

ALGORITHMS = ("train", "predict", "export_onnx", "evaluate")


def run(alg: str, params: dict, feedback=None) -> dict:
    from qgis import processing
    return processing.run(f"geopeft:{alg}", params, feedback=feedback)


def assert_on_grid(path, reference) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), "out")
    ref = QgsRasterLayer(str(reference), "ref")
    assert layer.isValid(), path
    assert (layer.width(), layer.height()) == (ref.width(), ref.height())
    assert layer.extent() == ref.extent()
    assert layer.crs() == ref.crs()
    return layer


def test_provider_registers_four_algorithms(provider):
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("geopeft").name() == "GeoPEFT"
    for name in ALGORITHMS:
        alg = registry.algorithmById(f"geopeft:{name}")
        assert alg is not None, name
        assert alg.shortHelpString() and alg.displayName()
        assert alg.parameterDefinition("OUTPUT") is not None
    assert registry.algorithmById("geopeft:predict").parameterDefinition("INPUT") is not None
    assert registry.algorithmById("geopeft:predict").parameterDefinition("MODEL") is not None
    assert registry.algorithmById("geopeft:train").parameterDefinition("INPUT") is not None


@needs_engine
def test_train_writes_a_model(trained_model):
    card = json.loads((trained_model / "card.json").read_text())
    assert (trained_model / "adapter.safetensors").is_file()
    # class names/colours came from the label raster's colour table + category names
    assert [c["name"] for c in card["classes"]] == [c["name"] for c in CLASSES]


@needs_engine
def test_predict_returns_styled_layers_on_the_input_grid(trained_model, data, tmp_path):
    result = run("predict", {"INPUT": str(data["scene"]), "MODEL": str(trained_model / "card.json"),
                             "OUTPUT": str(tmp_path / "pred.tif"),
                             "PROBABILITIES": str(tmp_path / "probs.tif"),
                             "UNCERTAINTY": str(tmp_path / "unc.tif"),
                             "POLYGONS": str(tmp_path / "pred.gpkg"), "DEVICE": 1})
    layer = assert_on_grid(result["OUTPUT"], data["scene"])
    assert_on_grid(result["PROBABILITIES"], data["scene"])
    uncertainty = assert_on_grid(result["UNCERTAINTY"], data["scene"])
    assert uncertainty.dataProvider().sourceNoDataValue(1) == 255
    # the class raster opens styled by class (sidecar .qml written next to it)
    assert isinstance(layer.renderer(), QgsPalettedRasterRenderer)
    labels = {c.label for c in layer.renderer().classes()}
    assert labels == {c["name"] for c in CLASSES}
    assert {c["name"] for c in json.loads(result["CLASSES"])} == labels
    polygons = QgsVectorLayer(result["POLYGONS"], "polygons", "ogr")
    assert polygons.isValid() and polygons.featureCount() > 0
    assert {"class_value", "class_name", "area"} <= set(polygons.fields().names())
    assert set(polygons.uniqueValues(polygons.fields().indexOf("class_name"))) <= labels
    assert polygons.renderer().type() == "categorizedSymbol"  # style stored in the GeoPackage
    assert polygons.renderer().classAttribute() == "class_value"


def run_and_load(params: dict, loaded: tuple[str, ...]) -> tuple[dict, dict]:
    """Run geopeft:predict as the toolbox does with 'open output file after running': outputs
    to load into the project, then load them as QGIS does, post-processors (styles) included."""
    from qgis import processing
    project = QgsProject.instance()
    context = QgsProcessingContext()
    context.setProject(project)
    feedback = QgsProcessingFeedback()
    params = {k: QgsProcessingOutputLayerDefinition(v, project) if k in loaded else v
              for k, v in params.items()}
    result = processing.run("geopeft:predict", params, context=context, feedback=feedback)
    layers = {}
    for source, details in context.layersToLoadOnCompletion().items():
        layer = QgsProcessingUtils.mapLayerFromString(source, context)
        assert layer is not None and layer.isValid(), source
        layer.setName(details.name)
        if details.postProcessor():
            details.postProcessor().postProcessLayer(layer, context, feedback)
        project.addMapLayer(layer)
        layers[source] = layer
    return result, layers


def test_predict_returns_and_loads_uncertainty_and_polygons_styled(
        provider, data, tmp_path, fake_python, monkeypatch, qgis_new_project):
    """The fake engine writes real files and reports them; Processing returns and loads each,
    styled: class raster paletted, uncertainty pseudocolour 0-100, polygons by class_value."""
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps({"classes": CLASSES, "input": {"band_names": BANDS}}))
    out, unc, gpkg = (str(tmp_path / name) for name in ("pred.tif", "unc.tif", "pred.gpkg"))
    result, layers = run_and_load(
        {"INPUT": str(data["scene"]), "MODEL": str(model / "card.json"), "BANDS": "1,2,3,4,5,6",
         "OUTPUT": out, "UNCERTAINTY": unc, "POLYGONS": gpkg, "MIN_AREA": 2.5},
        loaded=("OUTPUT", "UNCERTAINTY", "POLYGONS"))
    assert (result["OUTPUT"], result["UNCERTAINTY"], result["POLYGONS"]) == (out, unc, gpkg)
    assert result["PROBABILITIES"] is None
    assert set(layers) == {out, unc, gpkg}
    assert isinstance(layers[out].renderer(), QgsPalettedRasterRenderer)
    renderer = layers[unc].renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    assert (renderer.classificationMin(), renderer.classificationMax()) == (0, 100)
    legend = [label for label, _colour in renderer.legendSymbologyItems()]
    assert "low uncertainty" in legend[0] and "high uncertainty" in legend[-1]
    polygons = layers[gpkg].renderer()
    assert isinstance(polygons, QgsCategorizedSymbolRenderer)
    assert polygons.classAttribute() == "class_value"
    assert [(c.value(), c.label(), c.symbol().color().name()) for c in polygons.categories()] \
        == [(c["value"], c["name"], c["colour"]) for c in CLASSES]


def test_predict_passes_new_output_flags_only_when_set(provider, data, tmp_path, fake_python,
                                                       monkeypatch):
    from qgis_plugin.core.commands import predict_args
    from qgis_plugin.processing.predict import PredictAlgorithm
    alg = PredictAlgorithm()
    alg.initAlgorithm()
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps({"classes": CLASSES}))
    base = {"INPUT": str(data["scene"]), "MODEL": str(model), "BANDS": "1,2",
            "OUTPUT": str(tmp_path / "pred.tif")}
    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    plain = predict_args(alg.config(base, context, feedback))
    assert not {"--uncertainty", "--polygons", "--min-area"} & set(plain)
    # MIN_AREA alone is meaningless: not passed without polygons
    assert "--min-area" not in predict_args(alg.config({**base, "MIN_AREA": 10}, context, feedback))
    args = predict_args(alg.config({**base, "UNCERTAINTY": str(tmp_path / "u.tif"),
                                    "POLYGONS": str(tmp_path / "p.gpkg"), "MIN_AREA": 10},
                                   context, feedback))
    assert args[args.index("--uncertainty"):][:6] == [
        "--uncertainty", str(tmp_path / "u.tif"), "--polygons", str(tmp_path / "p.gpkg"),
        "--min-area", "10"]
    with pytest.raises(QgsProcessingException, match="GeoPackage"):
        alg.config({**base, "POLYGONS": str(tmp_path / "p.shp")}, context, feedback)


@needs_engine
def test_export_onnx_then_predict_with_it(trained_model, data, tmp_path):
    result = run("export_onnx", {"MODEL": str(trained_model), "OUTPUT": str(tmp_path / "m.onnx")})
    assert Path(result["OUTPUT"]).is_file()
    assert result["MAX_ABS_DIFF"] is not None and result["MAX_ABS_DIFF"] < 1e-2
    pred = run("predict", {"INPUT": str(data["scene"]), "MODEL": result["OUTPUT"],
                           "OUTPUT": str(tmp_path / "onnx_pred.tif")})
    assert_on_grid(pred["OUTPUT"], data["scene"])


@pytest.fixture(scope="module")
def prediction(trained_model, data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("prediction") / "pred.tif"
    return run("predict", {"INPUT": str(data["scene"]), "MODEL": str(trained_model),
                           "OUTPUT": str(out)})["OUTPUT"]


@needs_engine
@pytest.mark.parametrize("labels", ["raster", "polygons"])
def test_evaluate(prediction, data, tmp_path, labels):
    params = {"INPUT": prediction, "OUTPUT": str(tmp_path / "metrics.json")}
    if labels == "raster":
        params["LABELS"] = str(data["labels"])
    else:
        params.update(LABEL_POLYGONS=str(data["labels_gpkg"]), LABEL_FIELD="class_id")
    result = run("evaluate", params)
    assert 0.0 <= result["MIOU"] <= 1.0 and 0.0 <= result["PIXEL_ACCURACY"] <= 1.0
    assert Path(result["OUTPUT"]).is_file()
    assert json.loads(result["PER_CLASS"])


@needs_engine
def test_cancel_during_training_stops_early_and_leaves_no_partial_output(data, provider, tmp_path):
    out = tmp_path / "cancelled"
    feedback = QgsProcessingFeedback()
    cancelled_at = []

    def on_progress(percent):
        if percent > 5 and not cancelled_at:  # training has started (past "prepare")
            cancelled_at.append(percent)
            feedback.cancel()
    feedback.progressChanged.connect(on_progress)
    result = run("train", tiny_train_parameters(data, out, EPOCHS=50), feedback=feedback)
    assert cancelled_at, "training never reported progress"
    # cancelled before the first validation: nothing (not even a half-written folder) is left
    leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert leftovers in ([], ["adapter.safetensors", "card.json"]), leftovers
    assert result["OUTPUT"] is None or (Path(result["OUTPUT"]) / "card.json").is_file()
    if leftovers:  # the best weights so far, from a run that really stopped early (not 50 epochs)
        assert json.loads((out / "card.json").read_text())["training"]["cancelled"] is True


def test_train_passes_only_what_is_set(data, provider, tmp_path, fake_python, monkeypatch):
    """Processing Train: tuning auto by default; chip size, decoder, epochs and learning rate are
    left to the engine unless set; never --stride."""
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_MODE", "echo")
    from qgis_plugin.core.commands import DECODERS
    minimal = {"INPUT": [str(data["scene"])], "LABELS": str(data["labels"]),
               "OUTPUT": str(tmp_path / "m")}

    def argv(params) -> list[str]:
        feedback = QgsProcessingFeedback()
        run("train", params, feedback=feedback)
        line = next(line for line in feedback.textLog().splitlines() if "-m engine train" in line)
        return line.split()

    args = argv(minimal)
    assert args[args.index("--tuning") + 1] == "auto"
    for flag in ("--chip-size", "--decoder", "--epochs", "--lr", "--stride", "--val-fraction"):
        assert flag not in args, flag
    args = argv({**minimal, "CHIP_SIZE": 96, "DECODER": DECODERS.index("linear"), "EPOCHS": 3,
                 "LEARNING_RATE": 0.0005})
    assert args[args.index("--chip-size") + 1] == "96" and args[args.index("--decoder") + 1] == "linear"
    assert args[args.index("--epochs") + 1] == "3" and args[args.index("--lr") + 1] == "0.0005"
    assert "--stride" not in args
    with pytest.raises(QgsProcessingException, match="multiple of 16"):
        run("train", {**minimal, "CHIP_SIZE": 100})


def test_invalid_model_is_refused_with_a_message(provider, data, tmp_path):
    with pytest.raises(QgsProcessingException, match="not a GeoPEFT model folder"):
        run("predict", {"INPUT": str(data["scene"]), "MODEL": str(tmp_path),
                        "OUTPUT": str(tmp_path / "p.tif")})


def test_polygon_labels_need_a_field(provider, data, tmp_path):
    with pytest.raises(QgsProcessingException, match="class field"):
        run("train", tiny_train_parameters(data, tmp_path / "m", LABELS=None,
                                           LABEL_POLYGONS=str(data["labels_gpkg"])))


def test_labels_are_one_raster_or_one_polygon_layer(provider, data, tmp_path):
    with pytest.raises(QgsProcessingException, match="not both"):
        run("train", tiny_train_parameters(data, tmp_path / "m", LABEL_POLYGONS=str(data["labels_gpkg"]),
                                           LABEL_FIELD="class_id"))
    with pytest.raises(QgsProcessingException, match="Choose the labels"):
        run("evaluate", {"INPUT": str(data["labels"]), "OUTPUT": str(tmp_path / "m.json")})


def test_rasters_on_different_grids_are_refused(provider, data, tmp_path):
    with pytest.raises(QgsProcessingException, match="same grid"):
        run("train", tiny_train_parameters(
            data, tmp_path / "m", INPUT=[str(data["scene"]), str(data["other_grid"])]))


def test_missing_engine_gives_one_message_with_the_fix(provider, data, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text("{}")
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(QgsProcessingException) as info:
        run("predict", {"INPUT": str(data["scene"]), "MODEL": str(model),
                        "OUTPUT": str(tmp_path / "p.tif")})
    message = str(info.value)
    assert "not found" in message and "Set up engine" in message
    assert "Traceback" not in message


def test_crashed_engine_reports_the_tail_of_its_output(provider, tmp_path, fake_python, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text("{}")
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_MODE", "crash")
    with pytest.raises(QgsProcessingException) as info:
        run("export_onnx", {"MODEL": str(model), "OUTPUT": str(tmp_path / "m.onnx")})
    assert "exit status 3" in str(info.value) and "CUDA out of memory" in str(info.value)
