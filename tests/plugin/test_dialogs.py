"""The Train and Predict dialogs in a real QGIS: populate from the project, build the engine
command, refuse invalid choices, run the engine in a QgsTask, add styled results."""
from __future__ import annotations

import json

import pytest
from qgis.core import (
    Qgis,
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import QPlainTextEdit

from plugin_testdata import BANDS, CLASSES, model_folder, needs_engine, bar_text, wait_for




@pytest.fixture
def project(qgis_new_project, data):
    layers = {
        "scene": QgsRasterLayer(str(data["scene"]), "scene"),
        "scene_b": QgsRasterLayer(str(data["scene_b"]), "scene_b"),
        "other_grid": QgsRasterLayer(str(data["other_grid"]), "other_grid"),
        "labels": QgsRasterLayer(str(data["labels"]), "labels"),
        "polygons": QgsVectorLayer(str(data["labels_gpkg"]), "label polygons", "ogr"),
    }
    assert all(layer.isValid() for layer in layers.values())
    qgis_new_project.addMapLayers(list(layers.values()))
    return layers


@pytest.fixture
def train_dialog(qgis_iface, project, provider):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    dialog = TrainDialog(qgis_iface)
    yield dialog
    if dialog.task is not None:
        dialog.task.cancel()
        wait_for(lambda: dialog.task is None, 60)
    dialog.close()
    dialog.deleteLater()


def band_names(d) -> list[str]:
    return [d.band_table.name(b.number) for b in d.band_table.bands]


def test_train_dialog_populates_from_the_project(train_dialog, project):
    d = train_dialog
    names = [d.rasters.item(i).text() for i in range(d.rasters.count())]
    # the class raster is the labels (paletted, one integer band), so it is not an input
    assert names == ["scene", "scene_b", "other_grid", "labels  (labels)"]
    assert d.checked_raster_ids() == [project["scene"].id()]  # the topmost multi-band raster
    assert d.labels.currentLayer() == project["labels"]
    assert not d.label_field.isEnabled()
    assert band_names(d) == BANDS  # bands are shown by name
    assert [(c["value"], c["name"]) for c in d.classes] == [(c["value"], c["name"]) for c in CLASSES]
    # polygons: their class field is found and names the classes
    d.labels.setLayer(project["polygons"])
    assert d.label_field.currentField() == "class_id"
    assert [(c["value"], c["name"]) for c in d.classes] == [(c["value"], c["name"]) for c in CLASSES]
    # two rasters: bands of both, stacked
    d.set_checked_rasters([project["scene"], project["scene_b"]])
    assert len(d.band_table.bands) == 8 and d.band_table.name(8) == "EXTRA_2"


def test_train_dialog_builds_the_engine_command(train_dialog, project, data, tmp_path):
    d = train_dialog
    d.labels.setLayer(project["polygons"])
    d.set_checked_bands([1, 2, 3, 4])
    d.weights.setCurrentIndex(d.weights.findData("none"))
    d.tuning.setCurrentIndex(d.tuning.findData("dora"))
    d.chip_size.setValue(64)
    d.epochs.setValue(3)
    d.max_time.setText("5m")
    d.batch_size.setValue(4)
    d.lr.setValue(0.0005)
    d.device.setCurrentIndex(d.device.findData("cpu"))
    d.out.setFilePath(str(tmp_path / "model"))
    assert d.validate() == []
    args = d.command()
    classes = args[args.index("--classes") + 1]
    assert json.loads(classes)[0] == {"value": 1, "name": "water", "colour": d.classes[0]["colour"]}
    args[args.index("--classes") + 1] = "CLASSES"
    assert args == [
        "train", "--image", str(data["scene"]), "--bands", "1,2,3,4",
        "--labels", str(data["labels_gpkg"]), "--label-field", "class_id", "--classes", "CLASSES",
        "--backbone", "prithvi_eo_v2_tiny", "--weights", "none", "--tuning", "dora",
        "--chip-size", "64", "--epochs", "3", "--max-time", "5m",
        "--batch-size", "4", "--lr", "0.0005", "--device", "cpu",
        "--out", str(tmp_path / "model")]


def test_train_dialog_leaves_the_automatic_choices_to_the_engine(train_dialog, tmp_path):
    """Tuning, decoder, chip size, epochs and learning rate start automatic: the command passes
    --tuning auto and nothing for the rest, so the engine's own defaults apply."""
    d = train_dialog
    d.out.setFilePath(str(tmp_path / "model"))
    assert d.tuning.currentData() == "auto" and d.tuning.currentText().startswith("Automatic")
    assert d.decoder.currentData() == "auto" and d.decoder.currentText().startswith("Automatic")
    assert d.chip_size.text() == "Automatic (from the labelled area)"
    assert d.epochs.text() == "Automatic epochs" and d.lr.text().startswith("Automatic")
    assert d.validate() == []
    args = d.command()
    assert args[args.index("--tuning") + 1] == "auto"
    for flag in ("--chip-size", "--decoder", "--epochs", "--lr", "--stride", "--val-fraction"):
        assert flag not in args, flag
    # set by the analyst: passed as set
    d.chip_size.setValue(96)
    d.decoder.setCurrentIndex(d.decoder.findData("linear"))
    d.tuning.setCurrentIndex(d.tuning.findData("linear-probe"))
    assert d.validate() == []
    args = d.command()
    assert args[args.index("--chip-size") + 1] == "96"
    assert args[args.index("--decoder") + 1] == "linear"
    assert args[args.index("--tuning") + 1] == "linear-probe"
    assert "--stride" not in args
    # the arrows step through multiples of the model's patch size
    assert d.chip_size.singleStep() == 16
    d.backbone.setCurrentText("prithvi_eo_v2_600")
    assert d.chip_size.singleStep() == 14
    assert any("multiple of 14" in p for p in d.validate())  # 96 is not


def test_train_dialog_offers_the_engines_tuning_methods_and_decoders(train_dialog, tmp_path):
    """The lists come from `engine models`; a method a newer engine adds is offered and passed."""
    from qgis_plugin.core.bands import ModelsInfo
    from qgis_plugin.dialogs.train_dialog import choices
    d = train_dialog
    d.out.setFilePath(str(tmp_path / "model"))
    d.decoder.setCurrentIndex(d.decoder.findData("linear"))
    d._models_info_arrived(ModelsInfo(tuning_methods=("auto", "lora", "vera"),
                                      decoders=("auto", "unet", "linear", "upernet")), "")
    assert choices(d.tuning) == ["auto", "lora", "vera"]
    assert choices(d.decoder) == ["auto", "unet", "linear", "upernet"]
    assert d.decoder.currentData() == "linear"  # the analyst's choice survives the refill
    assert d.tuning.itemText(d.tuning.findData("vera")) == "vera"  # unknown: its own name
    d.tuning.setCurrentIndex(d.tuning.findData("vera"))
    d.decoder.setCurrentIndex(d.decoder.findData("upernet"))
    assert d.validate() == []
    args = d.command()
    assert args[args.index("--tuning") + 1] == "vera" and args[args.index("--decoder") + 1] == "upernet"
    # an engine that does not report them leaves the plugin's own lists
    d._models_info_arrived(ModelsInfo(), "")
    assert choices(d.tuning) == ["auto", "lora", "vera"]


def test_train_dialog_offers_the_engines_models_and_each_ones_methods(train_dialog, tmp_path):
    """The model list is the engine's; a CNN offers only the methods it supports; timm:NAME can be
    typed; dates, frames and metadata reach the command."""
    from qgis_plugin.core.bands import ModelsInfo
    from qgis_plugin.dialogs.train_dialog import choices
    d = train_dialog
    d.out.setFilePath(str(tmp_path / "model"))
    info = ModelsInfo(bands={"prithvi_eo_v2_tiny": ["BLUE"], "decur_rn50_s2": ["COASTAL"]},
                      tuning_methods=("auto", "lora", "dora", "vpt", "vit-adapter", "full", "linear-probe"),
                      decoders=("auto", "unet"), patches={"prithvi_eo_v2_tiny": 16, "decur_rn50_s2": 32},
                      methods={"decur_rn50_s2": ("lora", "dora", "full", "linear-probe")})
    d._models_info_arrived(info, "")
    assert [d.backbone.itemText(i) for i in range(d.backbone.count())] == ["prithvi_eo_v2_tiny", "decur_rn50_s2"]
    assert "vit-adapter" in choices(d.tuning)
    d.backbone.setCurrentText("decur_rn50_s2")
    assert choices(d.tuning) == ["auto", "lora", "dora", "full", "linear-probe"]
    assert d.chip_size.singleStep() == 32
    d.backbone.setCurrentText("timm:vit_small_patch16_224")
    d.frames.setValue(2)
    d.metadata.setChecked(True)
    args = d.command()
    assert args[args.index("--backbone") + 1] == "timm:vit_small_patch16_224"
    assert args[args.index("--frames") + 1] == "2" and "--metadata" in args


def test_train_dialog_raster_labels_and_categorized_colours(train_dialog, project):
    d = train_dialog
    d.labels.setLayer(project["labels"])
    assert not d.label_field.isEnabled()
    assert [c["name"] for c in d.classes] == [c["name"] for c in CLASSES]  # colour table names
    # a categorized style on a text field gives the names and colours
    polygons = project["polygons"]
    categories = [QgsRendererCategory(name, QgsFillSymbol.createSimple({"color": colour}), name.title())
                  for name, colour in (("water", "#0000ff"), ("forest", "#00ff00"),
                                       ("urban", "#ff0000"), ("crop", "#ffff00"))]
    polygons.setRenderer(QgsCategorizedSymbolRenderer("class_name", categories))
    d.labels.setLayer(polygons)
    d.label_field.setField("class_name")
    assert [(c["value"], c["name"], c["colour"]) for c in d.classes] == [
        (1, "Crop", "#ffff00"), (2, "Forest", "#00ff00"), (3, "Urban", "#ff0000"), (4, "Water", "#0000ff")]


def test_train_dialog_refuses_invalid_choices(train_dialog, project, tmp_path):
    d = train_dialog
    d.set_checked_rasters([])
    d.out.setFilePath("")
    problems = d.validate()
    assert "Choose at least one input raster." in problems
    assert "Choose an output folder for the trained model." in problems
    assert "Cannot start training" in [item.title() for item in d.bar.items()][0]
    assert d.start() is None  # nothing is launched
    # different grids, a labels layer that is also an input, a non-empty output folder, chip size
    d.set_checked_rasters([project["scene"], project["other_grid"]])
    d.labels.setLayer(project["polygons"])
    d.label_field.setField(None)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("x")
    d.out.setFilePath(str(tmp_path / "used"))
    d.chip_size.setValue(200)
    problems = d.validate()
    text = " ".join(problems)
    assert "not on the same grid" in text
    assert "Class field" in text
    assert "not empty" in text
    assert "multiple of 16" in text
    assert "larger than the raster" in text
    # the bar shows the first problem; every problem is readable in full below it
    assert problems[0] in bar_text(d) and "more below" in bar_text(d)
    assert all(p in d.messages.text.toPlainText() for p in problems) and not d.messages.text.isHidden()


def test_predict_dialog_populates_and_builds_the_command(qgis_iface, project, data, tmp_path):
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    d = PredictDialog(qgis_iface)
    names = [d.raster.itemText(i) for i in range(d.raster.count())]
    assert sorted(names) == ["labels", "other_grid", "scene", "scene_b"]
    assert d.raster.currentLayer() == project["scene"]  # the topmost multi-band raster
    assert d.out.filePath().endswith("scene_classes.tif")  # suggested beside the input
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps({
        "backbone": {"name": "prithvi_eo_v2_tiny"}, "tuning": {"method": "lora"},
        "classes": CLASSES, "input": {"band_names": BANDS}}))
    d.model.setFilePath(str(model))
    assert "water, forest, urban, crop" in d.model_info.text()
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    d.want_probabilities.setChecked(True)
    d.probabilities.setFilePath(str(tmp_path / "probs.tif"))
    d.device.setCurrentIndex(d.device.findData("cpu"))
    assert d.validate() == []
    assert d.command() == ["predict", "--model", str(model), "--image", str(data["scene"]),
                           "--bands", "1,2,3,4,5,6", "--out", str(tmp_path / "pred.tif"), "--probabilities",
                           str(tmp_path / "probs.tif"), "--device", "cpu"]
    # the new outputs are suggested beside the input, and passed only when ticked
    assert d.uncertainty.filePath().endswith("scene_uncertainty.tif")
    assert d.polygons.filePath().endswith("scene_classes.gpkg")
    assert not d.min_area.isEnabled() and d.min_area.suffix() == " m²"
    d.min_area.setValue(500)  # not passed while polygons are off
    assert "--min-area" not in d.command() and "--uncertainty" not in d.command()
    d.want_uncertainty.setChecked(True)
    d.uncertainty.setFilePath(str(tmp_path / "unc.tif"))
    d.want_polygons.setChecked(True)
    d.polygons.setFilePath(str(tmp_path / "pred.gpkg"))
    assert d.min_area.isEnabled()
    assert d.validate() == []
    assert d.command()[-10:] == ["--probabilities", str(tmp_path / "probs.tif"),
                                 "--uncertainty", str(tmp_path / "unc.tif"),
                                 "--polygons", str(tmp_path / "pred.gpkg"), "--min-area", "500",
                                 "--device", "cpu"]
    d.min_area.setValue(0)  # "keep all": no --min-area
    assert "--min-area" not in d.command() and "--polygons" in d.command()
    d.polygons.setFilePath(str(tmp_path / "pred.shp"))
    assert any("GeoPackage" in p for p in d.validate())
    d.uncertainty.setFilePath(str(tmp_path / "pred.tif"))
    assert any("its own file name" in p for p in d.validate())
    d.want_uncertainty.setChecked(False)
    # invalid: not a model, not a GeoTIFF, polygons without a path
    d.model.setFilePath(str(tmp_path))
    d.out.setFilePath(str(tmp_path / "pred.png"))
    d.want_polygons.setChecked(True)
    d.polygons.setFilePath("")
    text = " ".join(d.validate())
    assert "no card.json" in text and "GeoTIFF" in text and "polygons" in text
    assert d.start() is None
    d.close()


def test_crashed_engine_shows_its_error_output(qgis_iface, project, tmp_path, fake_python, monkeypatch):
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_MODE", "crash")
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text("{}")
    d = PredictDialog(qgis_iface)
    d.model.setFilePath(str(model))
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    qgis_iface.messageBar().clear_messages()
    assert d.start() is not None
    wait_for(lambda: d.task is None, 30)
    # the whole message, with the tail of the engine's stderr, is in the dialog, not cut short
    shown = d.messages.text.toPlainText()
    assert "exit status 3" in shown and "Traceback" in shown and "CUDA out of memory" in shown
    assert "exit status 3" in bar_text(d)
    assert d.status.text() == "Prediction failed."
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert critical and "exit status 3" in critical[-1]
    # the engine log is one click away: everything it printed in this run
    d.messages.log_button.click()
    log_text = d.messages.log_view.findChild(QPlainTextEdit).toPlainText()
    assert d.messages.log_view.isVisible()
    assert log_text.startswith("$ <engine python> -m engine predict") and "CUDA out of memory" in log_text
    assert not (tmp_path / "pred.tif").exists()
    d.close()


def test_predict_dialog_adds_uncertainty_and_polygons_styled(qgis_iface, project, tmp_path,
                                                             fake_python, monkeypatch):
    """The engine's artifacts (fake engine: real files) land on the map, each styled."""
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    d = PredictDialog(qgis_iface)
    d.raster.setLayer(project["scene"])
    d.model.setFilePath(str(model_folder(tmp_path)))
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    d.want_uncertainty.setChecked(True)
    d.uncertainty.setFilePath(str(tmp_path / "unc.tif"))
    d.want_polygons.setChecked(True)
    d.polygons.setFilePath(str(tmp_path / "pred.gpkg"))
    d.min_area.setValue(1.0)
    assert d.start() is not None
    wait_for(lambda: d.task is None, 60)
    assert d.progress.value() == 100, bar_text(d) + d.messages.text.toPlainText()
    uncertainty, raster, polygons = d.added_layers
    assert all(QgsProject.instance().mapLayer(x.id()) is x for x in d.added_layers)
    assert [x.name() for x in d.added_layers] == ["unc", "pred", "pred polygons"]
    # uncertainty: pseudocolour 0-100 on a sequential ramp, legend low -> high, nodata clear
    renderer = uncertainty.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer) and renderer.band() == 1
    assert (renderer.classificationMin(), renderer.classificationMax()) == (0, 100)
    items = renderer.shader().rasterShaderFunction().colorRampItemList()
    assert [i.value for i in items] == [0, 25, 50, 75, 100]
    assert "low uncertainty" in items[0].label and "high uncertainty" in items[-1].label
    lightness = [i.color.lightness() for i in items]
    assert lightness == sorted(lightness, reverse=True)  # sequential: darker = less sure
    legend = [label for label, _colour in renderer.legendSymbologyItems()]
    assert "low uncertainty" in legend[0] and "high uncertainty" in legend[-1]
    provider = uncertainty.dataProvider()
    assert provider.sourceHasNoDataValue(1) and provider.sourceNoDataValue(1) == 255
    assert provider.useSourceNoDataValue(1)
    block = renderer.block(1, uncertainty.extent(), uncertainty.width(), uncertainty.height())
    assert QColor.fromRgba(block.color(0, 5)).alpha() == 0  # the nodata row is transparent
    assert QColor.fromRgba(block.color(5, 0)).alpha() == 255
    assert QColor.fromRgba(block.color(5, 0)).name() == "#ffffb2"  # 0 at the left edge
    # class raster: paletted by class as before
    assert isinstance(raster.renderer(), QgsPalettedRasterRenderer)
    assert [c.label for c in raster.renderer().classes()] == [c["name"] for c in CLASSES]
    # polygons: one category per class, by class_value, in the class colours and names
    assert isinstance(polygons.renderer(), QgsCategorizedSymbolRenderer)
    assert polygons.renderer().classAttribute() == "class_value"
    assert [(c.value(), c.label(), c.symbol().color().name()) for c in polygons.renderer().categories()] \
        == [(c["value"], c["name"], c["colour"]) for c in CLASSES]
    assert sorted(polygons.uniqueValues(polygons.fields().indexOf("class_value"))) == [1, 2, 3, 4]
    # the GeoPackage opens styled by class anywhere (default style stored inside it)
    reopened = QgsVectorLayer(str(tmp_path / "pred.gpkg"), "again", "ogr")
    assert reopened.renderer().type() == "categorizedSymbol"
    assert reopened.renderer().classAttribute() == "class_value"
    assert d.command()[d.command().index("--polygons"):][:4] == [
        "--polygons", str(tmp_path / "pred.gpkg"), "--min-area", "1"]
    d.close()


@needs_engine
def test_predict_dialog_runs_and_adds_styled_layers(qgis_iface, project, trained_model, tmp_path):
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    d = PredictDialog(qgis_iface)
    d.raster.setLayer(project["scene"])
    d.model.setFilePath(str(trained_model))
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    d.want_uncertainty.setChecked(True)
    d.uncertainty.setFilePath(str(tmp_path / "unc.tif"))
    d.want_polygons.setChecked(True)
    d.polygons.setFilePath(str(tmp_path / "pred.gpkg"))
    d.device.setCurrentIndex(d.device.findData("cpu"))
    qgis_iface.messageBar().clear_messages()
    assert d.start() is not None
    wait_for(lambda: d.task is None, 180)
    assert d.progress.value() == 100, bar_text(d)
    # success in QGIS's message bar, with a link that opens the output's folder
    success = qgis_iface.messageBar().get_messages(Qgis.Success)
    assert success and f'<a href="file://{tmp_path}">{tmp_path / "pred.tif"}</a>' in success[-1]
    uncertainty, raster, polygons = d.added_layers
    assert QgsProject.instance().mapLayer(raster.id()) is raster
    assert isinstance(uncertainty.renderer(), QgsSingleBandPseudoColorRenderer)
    assert uncertainty.dataProvider().sourceNoDataValue(1) == 255
    assert isinstance(raster.renderer(), QgsPalettedRasterRenderer)
    assert [c.label for c in raster.renderer().classes()] == [c["name"] for c in CLASSES]
    assert (raster.width(), raster.height()) == (project["scene"].width(), project["scene"].height())
    assert isinstance(polygons.renderer(), QgsCategorizedSymbolRenderer)
    assert polygons.renderer().classAttribute() == "class_value"
    assert [c.label() for c in polygons.renderer().categories()] == [c["name"] for c in CLASSES]
    d.close()


@needs_engine
def test_train_dialog_shows_progress_and_cancels(train_dialog, project, tmp_path):
    d = train_dialog
    d.labels.setLayer(project["labels"])
    d.weights.setCurrentIndex(d.weights.findData("none"))
    d.chip_size.setValue(64)
    d.epochs.setValue(50)
    d.batch_size.setValue(4)
    d.device.setCurrentIndex(d.device.findData("cpu"))
    out = tmp_path / "model"
    d.out.setFilePath(str(out))
    assert d.start() is not None
    assert not d.train_button.isEnabled() and d.cancel_button.isEnabled()
    wait_for(lambda: d.status.text().startswith("Epoch 1 · step"), 120)
    assert "loss" in d.status.text() and d.progress.value() > 0
    d.cancel_button.click()
    wait_for(lambda: d.task is None, 60)  # a hang guard; 50 epochs would take far longer
    assert "cancelled" in d.status.text().lower()
    assert d.train_button.isEnabled()
    leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert leftovers in ([], ["adapter.safetensors", "card.json"],  # a resume checkpoint from epoch 2 on
                         ["adapter.safetensors", "card.json", "resume.ckpt", "resume.json"]), leftovers
    if leftovers:  # the best weights so far, from a run that really stopped early
        assert json.loads((out / "card.json").read_text())["training"]["cancelled"] is True


def test_plugin_gui_adds_actions_and_unloads(qgis_iface, provider):
    from qgis.core import QgsApplication

    from qgis_plugin import classFactory
    plugin = classFactory(qgis_iface)
    registry = QgsApplication.processingRegistry()
    registry.removeProvider(provider)  # the plugin registers its own
    try:
        plugin.initGui()
        assert registry.providerById("geopeft") is not None
        assert [a.text() for a in plugin.actions] == [
            "Train segmentation model…", "Predict classes…", "Set up engine…"]
        assert all(not a.icon().isNull() for a in plugin.actions)
        dialog = plugin.show_train()
        assert dialog.isVisible()
        plugin.unload()
        assert registry.providerById("geopeft") is None
    finally:
        if registry.providerById("geopeft") is None:  # put one back for the other tests
            from qgis_plugin.processing.provider import GeoPEFTProvider
            _KEEP_ALIVE.append(GeoPEFTProvider())  # Python providers die with their wrapper
            registry.addProvider(_KEEP_ALIVE[-1])


_KEEP_ALIVE: list = []


def test_setup_dialog_checks_and_saves_the_engine_python(qgis_iface, tmp_path, _engine_python_env):
    from qgis_plugin import settings
    from qgis_plugin.dialogs.setup_dialog import SetupDialog
    previous = settings.stored_engine_python()
    d = SetupDialog(qgis_iface)
    try:
        assert d.python.filePath() == _engine_python_env
        d.python.setFilePath(str(tmp_path / "missing" / "python"))
        d.check()  # in a task: the dialog stays responsive while the Python starts
        wait_for(lambda: d.check_task is None, 60)
        assert d.engine_ok is False
        assert "not found" in d.state.text() and "not found" in bar_text(d)
        d.python.setFilePath(_engine_python_env)
        d.check()
        wait_for(lambda: d.check_task is None, 120)
        assert d.engine_ok
        assert d.state.text().startswith("GeoPEFT engine ") and "installed" in d.state.text()
        assert settings.stored_engine_python() == _engine_python_env
        assert d.venv.filePath().endswith("geopeft-engine-venv")
    finally:
        settings.set_engine_python(previous)
        d.close()


def test_screenshots_render(tmp_path):
    """`make screenshots` renders every dialog (in its own QGIS process), and the analyst's loop
    from a real training run (shortened here: 4 epochs on a 128 px scene)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).with_name("screenshots.py")
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--loop-epochs", "4",
                           "--loop-size", "128"], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("train-dialog.png", "train-dialog-running.png", "predict-dialog.png",
                 "setup-dialog.png", "train-dialog-loop.png", "training-preview.png", "evaluation-report.png"):
        image = QgsRasterLayer(str(tmp_path / name), name)
        assert image.isValid() and image.width() > 500 and image.height() > 300, name
