"""Issue 11, an analyst's first hour, on real QGIS with the Sen1Floods11 chip of tests/data
(13 Sentinel-2 bands named B1..B12; labels -1 = no label (no nodata tag), 0 = not water, 1 = water).

Label no-data honoured (2), defaults by kind (3), bands seen and named (4), classes named and
coloured (5), messages (6). Point 1 (the Processing dialogs' crash) is test_processing_dialogs.py.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from qgis.core import QgsProcessingFeedback, QgsProject, QgsRasterLayer, QgsRasterRange
from qgis.PyQt.QtCore import Qt
from test_dialogs import wait_for

from plugin_testdata import BANDS, CLASSES, REPO

CHIP = REPO / "tests" / "data"
BLUE, GREY = "#1f78b4", "#bdbdbd"


@pytest.fixture(scope="session")
def chip_files(tmp_path_factory) -> Path:
    """A copy: QGIS stores statistics in .aux.xml files beside the rasters it opens."""
    folder = tmp_path_factory.mktemp("chip")
    for name in ("Spain_7370579_LabelHand.tif", "Spain_7370579_S2Hand.tif"):
        shutil.copy(CHIP / name, folder / name)
    return folder


@pytest.fixture
def chip(qgis_new_project, chip_files):
    """The project as the issue found it: the label raster on top, the 13-band image below."""
    labels = QgsRasterLayer(str(chip_files / "Spain_7370579_LabelHand.tif"), "LabelHand")
    image = QgsRasterLayer(str(chip_files / "Spain_7370579_S2Hand.tif"), "S2Hand")
    assert labels.isValid() and image.isValid()
    qgis_new_project.addMapLayers([labels, image])
    return {"labels": labels, "image": image}


@pytest.fixture
def train(qgis_iface, chip, provider):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    dialog = TrainDialog(qgis_iface)
    wait_for(lambda: dialog.band_table.info is not None or dialog.band_table.info_error, 60)
    yield dialog
    if dialog.task is not None:
        dialog.task.cancel()
        wait_for(lambda: dialog.task is None, 60)
    dialog.close()


def arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def engine_argv(feedback: QgsProcessingFeedback) -> str:
    """The engine command line an algorithm logged."""
    return next(line for line in feedback.textLog().splitlines() if "-m engine" in line)


# -- 2. label no-data ------------------------------------------------------------------------
def test_negative_label_value_is_warned_about_then_ignored(train, chip, tmp_path):
    d = train
    assert d.labels.currentLayer() == chip["labels"]
    assert not d.use_ignore.isChecked()
    # -1 is neither nodata nor ignored: it would become a class, and the dialog says so
    assert [c["value"] for c in d.classes] == [-1, 0, 1]
    assert not d.labels_note.isHidden() and "-1" in d.labels_note.text()
    assert "Ignore value" in d.labels_note.text()
    d.use_ignore.setChecked(True)
    d.ignore_value.setValue(-1)
    assert [c["value"] for c in d.classes] == [0, 1]
    assert d.labels_note.isHidden()
    d.out.setFilePath(str(tmp_path / "model"))
    assert arg(d.command(), "--ignore-index") == "-1"


def test_nodata_set_in_qgis_becomes_the_ignore_index(qgis_iface, chip, provider, tmp_path):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    chip["labels"].dataProvider().setUserNoDataValue(1, [QgsRasterRange(-1, -1)])
    d = TrainDialog(qgis_iface)
    assert d.use_ignore.isChecked() and d.ignore_value.value() == -1
    assert [c["value"] for c in d.classes] == [0, 1] and d.labels_note.isHidden()
    d.out.setFilePath(str(tmp_path / "model"))
    assert arg(d.command(), "--ignore-index") == "-1"
    # a second, different value cannot be passed on: the analyst is told what to change
    d.use_ignore.setChecked(True)
    d.ignore_value.setValue(255)
    assert any("one value besides" in p for p in d.validate())
    d.close()


def test_processing_honours_qgis_nodata_and_the_ignore_value(chip, provider, data, tmp_path,
                                                            fake_python, monkeypatch):
    from qgis import processing
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_MODE", "echo")
    labels = chip["labels"]
    params = {"INPUT": [chip["image"].id()], "LABELS": labels.id(), "CHIP_SIZE": 64, "EPOCHS": 1,
              "OUTPUT": str(tmp_path / "m")}
    feedback = QgsProcessingFeedback()
    processing.run("geopeft:train", params, feedback=feedback)
    assert "--ignore-index" not in engine_argv(feedback)
    assert "would become a class" in feedback.textLog()  # the warning about -1
    labels.dataProvider().setUserNoDataValue(1, [QgsRasterRange(-1, -1)])
    feedback = QgsProcessingFeedback()
    processing.run("geopeft:train", params, feedback=feedback)
    assert "--ignore-index -1" in engine_argv(feedback)
    assert "would become a class" not in feedback.textLog()
    classes = json.loads(re.search(r"--classes (\[.*?\]) ", engine_argv(feedback)).group(1))
    assert [c["value"] for c in classes] == [0, 1]
    # evaluate: the ignore value given in Processing
    feedback = QgsProcessingFeedback()
    processing.run("geopeft:evaluate", {"INPUT": str(data["labels"]), "LABELS": str(data["labels"]),
                                        "IGNORE_VALUE": 3, "OUTPUT": str(tmp_path / "m.json")},
                   feedback=feedback)
    assert "--ignore-index 3" in engine_argv(feedback)


# -- 3. defaults -----------------------------------------------------------------------------
def test_inputs_chosen_by_kind_and_output_in_a_models_folder(train, chip, tmp_path):
    d = train
    # the 13-band image is the input, the single-band integer raster the labels, never both
    assert d.checked_raster_ids() == [chip["image"].id()]
    assert d.labels.currentLayer() == chip["labels"]
    labels_item = next(d.rasters.item(i) for i in range(d.rasters.count())
                       if d.rasters.item(i).data(Qt.ItemDataRole.UserRole) == chip["labels"].id())
    assert labels_item.text().endswith("(labels)")
    assert not labels_item.flags() & Qt.ItemFlag.ItemIsEnabled
    # an unsaved project: the user's GeoPEFT folder; a new folder named after the image (and the
    # tuning method once one is chosen; automatic adds nothing)
    assert Path(d.out.filePath()) == Path.home() / "GeoPEFT" / "models" / "S2Hand"
    # choosing the image as labels takes it out of the inputs
    d.labels.setLayer(chip["image"])
    assert chip["image"].id() not in d.checked_raster_ids()
    assert "Choose at least one input raster." in d.validate()


def test_output_folder_beside_a_saved_project(qgis_iface, chip, provider, tmp_path):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    QgsProject.instance().setFileName(str(tmp_path / "floods.qgz"))
    (tmp_path / "models" / "S2Hand").mkdir(parents=True)
    (tmp_path / "models" / "S2Hand" / "card.json").write_text("{}")  # taken
    try:
        d = TrainDialog(qgis_iface)
        assert Path(d.out.filePath()) == tmp_path / "models" / "S2Hand_2"  # tuning: automatic
        d.tuning.setCurrentIndex(d.tuning.findData("dora"))  # still automatic: follows the method
        assert Path(d.out.filePath()) == tmp_path / "models" / "S2Hand_dora"
        d.out.setFilePath(str(tmp_path / "mine"))  # the analyst's choice stays
        d.tuning.setCurrentIndex(d.tuning.findData("lora"))
        assert d.out.filePath() == str(tmp_path / "mine")
        d.close()
    finally:
        QgsProject.instance().setFileName("")


# -- 4. bands --------------------------------------------------------------------------------
def test_bands_match_the_models_pretrained_bands_by_name(train, chip, tmp_path):
    d = train
    assert d.band_table.info is not None, d.band_table.info_error  # asked the engine
    pretrained = d.band_table.info.bands[d.backbone.currentText()]
    assert "BLUE" in pretrained and "SWIR_2" in pretrained
    names = [d.band_table.name(b.number) for b in d.band_table.bands]
    assert names[:4] == ["B1", "B2", "B3", "B4"] and len(names) == 13
    shown = {d.band_table.name(b.number): d.band_table.table.item(row, 2).text()
             for row, b in enumerate(d.band_table.bands)}
    assert shown["B2"] == "✓ BLUE" and shown["B8A"] == "✓ NIR_NARROW" and shown["B12"] == "✓ SWIR_2"
    assert shown["B1"] == "new (fresh weights)" and shown["B8"] == "new (fresh weights)"
    assert "6 of the 13 ticked bands match" in d.band_table.summary.text()
    assert ", ".join(pretrained) in d.band_table.summary.text()
    d.band_table.only_matching.click()
    assert d.checked_bands() == [2, 3, 4, 9, 12, 13]
    d.out.setFilePath(str(tmp_path / "model"))
    assert arg(d.command(), "--bands") == "2,3,4,9,12,13"
    assert arg(d.command(), "--band-names") is None  # the files' own names
    # the analyst assigns band 8 (broad NIR) to the model's NIR_NARROW instead of B8A
    d.set_checked_bands([2, 3, 4, 8, 12, 13])
    assert "no band for NIR_NARROW" in d.band_table.summary.text()
    d.band_table.set_name(8, "NIR_NARROW")
    assert d.band_table.table.item(7, 2).text() == "✓ NIR_NARROW"
    assert "6 of the 6 ticked bands match" in d.band_table.summary.text()
    assert arg(d.command(), "--band-names") == "B2,B3,B4,NIR_NARROW,B11,B12"


def test_band_aliases_come_from_the_engine_and_match_its_rule(train):
    from engine.models.registry import BAND_ALIASES, canonical_band
    info = train.band_table.info
    assert info.aliases == BAND_ALIASES
    for name in list(BAND_ALIASES) + ["b8a", "swir-1", " Nir08 ", "B8", "coastal"]:
        assert info.canonical(name) == canonical_band(name), name


def write_card(folder: Path, band_names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps({
        "backbone": {"name": "prithvi_eo_v2_tiny"}, "tuning": {"method": "lora"},
        "classes": [{"value": 0, "name": "not water", "colour": GREY},
                    {"value": 1, "name": "water", "colour": BLUE}],
        "input": {"bands": list(range(1, len(band_names) + 1)), "band_names": band_names}}))
    return folder


def test_predict_takes_the_cards_bands_by_name_or_asks(qgis_iface, chip, project_rasters, tmp_path):
    from qgis_plugin import settings
    from qgis_plugin.core.bands import cached_models_info
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    d = PredictDialog(qgis_iface)
    wait_for(lambda: cached_models_info(settings.engine_python()) is not None, 60)
    assert d.raster.currentLayer() != chip["labels"]  # a multi-band raster, not the labels
    d.raster.setLayer(chip["image"])
    d.model.setFilePath(str(write_card(tmp_path / "m", BANDS)))  # trained on HLS band names
    d.out.setFilePath(str(tmp_path / "pred.tif"))
    assert d.chosen_bands() == [2, 3, 4, 9, 12, 13]  # B02→BLUE … B12→SWIR_2, by the engine's aliases
    assert "All 6 bands of the model found by name" in d.band_info.text()
    assert d.validate() == []
    assert arg(d.command(), "--bands") == "2,3,4,9,12,13"
    # a raster with two unrelated bands: the chooser asks for the rest, naming the control
    d.raster.setLayer(project_rasters["scene_b"])
    assert d.chosen_bands() == [1, 2, None, None, None, None]
    assert "Not found by name in 'scene_b': BLUE, GREEN, RED" in d.band_info.text()
    problems = " ".join(d.validate())
    assert "Under Bands, choose the band of 'scene_b' that holds RED, NIR_NARROW, SWIR_1, SWIR_2" in problems
    for model_band in range(3, 7):
        d.set_band(model_band, 1)
    assert not any("Under Bands" in p for p in d.validate())
    assert arg(d.command(), "--bands") == "1,2,1,1,1,1"
    d.close()


@pytest.fixture
def project_rasters(chip, data):
    layer = QgsRasterLayer(str(data["scene_b"]), "scene_b")
    QgsProject.instance().addMapLayer(layer)
    return {"scene_b": layer}


def test_processing_predict_finds_the_cards_bands_by_name(chip, provider, tmp_path, fake_python,
                                                          monkeypatch):
    from qgis import processing
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("FAKE_ENGINE_MODE", "echo")
    model = write_card(tmp_path / "m", ["B2", "B3", "B4", "B8A", "B11", "B12"])
    feedback = QgsProcessingFeedback()
    processing.run("geopeft:predict", {"INPUT": chip["image"].id(), "MODEL": str(model / "card.json"),
                                       "OUTPUT": str(tmp_path / "p.tif")}, feedback=feedback)
    assert "--bands 2,3,4,9,12,13" in engine_argv(feedback)
    feedback = QgsProcessingFeedback()
    processing.run("geopeft:predict", {"INPUT": chip["image"].id(), "MODEL": str(model / "card.json"),
                                       "BANDS": "1,2,3,4,5,6", "OUTPUT": str(tmp_path / "p.tif")},
                   feedback=feedback)
    assert "--bands 1,2,3,4,5,6" in engine_argv(feedback)


# -- 5. classes ------------------------------------------------------------------------------
def test_classes_named_and_coloured_in_the_dialog(train, tmp_path):
    d = train
    d.use_ignore.setChecked(True)
    d.ignore_value.setValue(-1)
    table = d.class_table
    # no palette in the file: "class <value>", distinct colours, no red for the first classes
    first = d.classes
    assert [c["name"] for c in first] == ["class 0", "class 1"]
    assert len({c["colour"] for c in first}) == 2 and "#e31a1c" not in {c["colour"] for c in first}
    table.set_name(1, "water")
    table.set_name(0, "not water")
    assert [(c["name"], c["colour"]) for c in d.classes] == [("not water", GREY), ("water", BLUE)]
    # a colour the analyst picked stays when the class is renamed
    table.set_colour(0, "#a0522d")
    table.set_name(0, "land")
    assert d.classes[0] == {"value": 0, "name": "land", "colour": "#a0522d"}
    # names survive a change of the ignore value
    d.ignore_value.setValue(-2)
    assert [c["name"] for c in d.classes] == ["class -1", "land", "water"]
    d.ignore_value.setValue(-1)
    d.out.setFilePath(str(tmp_path / "model"))
    assert json.loads(arg(d.command(), "--classes")) == [
        {"value": 0, "name": "land", "colour": "#a0522d"}, {"value": 1, "name": "water", "colour": BLUE}]


def test_classes_from_the_rasters_palette(qgis_iface, project_with_palette):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    d = TrainDialog(qgis_iface)
    assert d.labels.currentLayer() == project_with_palette
    assert d.classes == CLASSES  # names and colours of the file's colour table and categories
    assert d.class_table.item(0, 1).flags() & Qt.ItemFlag.ItemIsEditable
    d.close()


@pytest.fixture
def project_with_palette(qgis_new_project, data):
    layers = [QgsRasterLayer(str(data["scene"]), "scene"), QgsRasterLayer(str(data["labels"]), "labels")]
    qgis_new_project.addMapLayers(layers)
    return layers[1]


def test_colours_follow_class_names():
    from qgis_plugin.styling import PALETTE, colour_for_name
    assert colour_for_name("Water", 2) == BLUE and colour_for_name("flooded area", 0) == BLUE
    assert colour_for_name("not water", 1) == GREY and colour_for_name("non-water", 1) == GREY
    assert colour_for_name("wetland", 0) != BLUE
    assert colour_for_name("class 7", 0) == PALETTE[0] != "#e31a1c"
    assert len(set(PALETTE)) == len(PALETTE) and "#e31a1c" not in PALETTE[:10]


# -- 6. messages -----------------------------------------------------------------------------
def test_a_new_run_clears_the_previous_metrics(train, fake_python, monkeypatch, tmp_path):
    d = train
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    d.use_ignore.setChecked(True)
    d.chip_size.setValue(64)
    d.out.setFilePath(str(tmp_path / "model"))
    d.metrics.setText("Validation mIoU 0.912 (epoch 20)")
    d.messages.show_text("an old error")
    assert d.start() is not None
    assert d.metrics.text() == "" and d.messages.text.isHidden()
    wait_for(lambda: d.metrics.text().startswith("Validation mIoU 0.500"), 30)  # this run's
    d.cancel_button.click()
    wait_for(lambda: d.task is None, 30)
    assert d.messages.log_lines[0].startswith("$ <engine python> -m engine train")
    assert "some human log line" in d.messages.log_lines  # the engine's stderr, for "Engine log…"
