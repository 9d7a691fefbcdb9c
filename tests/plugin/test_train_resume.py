"""The Train dialog offers Resume for a cancelled run (issue 9): after a cancel that left a resume
checkpoint in the Output folder, and whenever the chosen folder holds one; Resume runs
``train --resume DIR`` (with the stand-in engine of fake_engine.py)."""
from __future__ import annotations

import json

import pytest
from qgis.core import QgsRasterLayer
from plugin_testdata import wait_for



def cancelled_run_files(folder) -> None:
    """What the engine leaves in a cancelled run's model folder (contents do not matter here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text("{}")
    (folder / "adapter.safetensors").write_bytes(b"")
    (folder / "resume.ckpt").write_bytes(b"")
    (folder / "resume.json").write_text(json.dumps({"epochs_done": 2, "epochs": 4}))


@pytest.fixture
def dialog(qgis_iface, qgis_new_project, data, fake_python, monkeypatch):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    layers = [QgsRasterLayer(str(data["scene"]), "scene"), QgsRasterLayer(str(data["labels"]), "labels")]
    qgis_new_project.addMapLayers(layers)
    d = TrainDialog(qgis_iface)
    d.labels.setLayer(layers[1])
    yield d
    if d.task is not None:
        d.task.cancel()
        wait_for(lambda: d.task is None)
    d.close()
    d.deleteLater()


def test_resume_appears_after_a_cancelled_run_and_sends_resume(dialog, tmp_path, monkeypatch):
    d = dialog
    out = tmp_path / "model"
    d.out.setFilePath(str(out))
    assert not d.resume_button.isVisibleTo(d) and d.resume() is None  # nothing to resume yet
    assert d.start() is not None
    wait_for(lambda: d.status.text().startswith("Epoch 1"))
    cancelled_run_files(out)  # as the engine writes them when the cancel arrives
    assert not d.resume_button.isVisibleTo(d)  # never while a run is going
    d.cancel_button.click()
    wait_for(lambda: d.task is None)
    assert d.resume_button.isVisibleTo(d) and d.resume_button.isEnabled()
    assert "cancelled" in d.status.text() and "2 of 4 epochs are saved" in d.status.text()
    assert "2 of 4 epochs" in d.resume_button.toolTip()

    record = tmp_path / "record"
    monkeypatch.setenv("FAKE_ENGINE_MODE", "echo")  # done at once
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(record))
    d.resume_button.click()
    assert d.task is not None and not d.resume_button.isVisibleTo(d)
    wait_for(lambda: d.task is None)
    argv = json.loads((record / "argv.json").read_text())
    assert argv[0] == "train" and argv[argv.index("--resume") + 1] == str(out)
    assert "--image" not in argv and "--labels" not in argv  # the run's own arguments are kept


def test_resume_is_offered_for_a_chosen_folder_holding_a_checkpoint(dialog, tmp_path):
    d = dialog
    cancelled_run_files(tmp_path / "cancelled")
    d.out.setFilePath(str(tmp_path / "other"))
    assert not d.resume_button.isVisibleTo(d)
    d.out.setFilePath(str(tmp_path / "cancelled"))
    assert d.resume_button.isVisibleTo(d)
    (tmp_path / "cancelled" / "resume.ckpt").unlink()  # a finished run: no checkpoint
    d.out.setFilePath(str(tmp_path / "other"))
    d.out.setFilePath(str(tmp_path / "cancelled"))
    assert not d.resume_button.isVisibleTo(d)
