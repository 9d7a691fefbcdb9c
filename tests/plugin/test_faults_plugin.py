"""Plugin-side faults (issue 9, "the plugin never blocks QGIS"), in a real QGIS with a fake
engine (tests/plugin/fake_engine.py): garbage on stdout, a hung engine (the watchdog kills it),
a missing engine, a crash with a traceback; the UI thread keeps running while an engine runs and
while Set up engine checks a (slow) Python; temporary folders are gone when a task ends.

Each case asserts the message the analyst sees (what happened, what to do, where the log is),
that nothing was written at the output path, and that QGIS is alive afterwards.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsFeature,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QTimer

from plugin_testdata import BANDS, CLASSES, bar_text, wait_for

WATCHDOG_S = 2  # the tests' watchdog (the plugin's default is 10 minutes)
pytestmark = pytest.mark.skipif(sys.platform.startswith("win"),
                                reason="process groups, /proc and sh scripts: POSIX")


# -- helpers ------------------------------------------------------------------------------------
def iface_errors(qgis_iface) -> list[str]:
    return qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)


def assert_qgis_alive() -> None:
    """QGIS still works: the project takes a layer and gives it back, the task manager answers."""
    project = QgsProject.instance()
    layer = QgsVectorLayer("Point?crs=EPSG:4326", "alive?", "memory")
    assert layer.isValid()
    project.addMapLayer(layer)
    assert project.mapLayer(layer.id()) is layer
    project.removeMapLayer(layer.id())
    assert QgsApplication.taskManager() is not None


class TickRecorder:
    """A QTimer on the UI thread, ticking every 20 ms; ``max_gap`` is the longest time between two
    ticks: how long the UI thread was blocked at worst."""

    def __init__(self):
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(20)
        self.timer.timeout.connect(lambda: self.ticks.append(time.monotonic()))

    def __enter__(self):
        self.ticks.append(time.monotonic())
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()
        self.ticks.append(time.monotonic())

    @property
    def max_gap(self) -> float:
        return max(b - a for a, b in zip(self.ticks, self.ticks[1:]))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) is dead too
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def faults_env(fake_python, monkeypatch, tmp_path):
    """The fake engine as the engine Python, the logs in tmp_path/logs, a 2 s watchdog."""
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", fake_python)
    monkeypatch.setenv("GEOPEFT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("GEOPEFT_WATCHDOG_S", str(WATCHDOG_S))
    monkeypatch.delenv("FAKE_ENGINE_MODE", raising=False)
    return tmp_path / "logs"


@pytest.fixture
def project(qgis_new_project, data):
    """The scene and its labels, plus the labels as an unsaved memory layer (copied for the
    engine by the Train task)."""
    scene = QgsRasterLayer(str(data["scene"]), "scene")
    labels = QgsRasterLayer(str(data["labels"]), "labels")
    source = QgsVectorLayer(str(data["labels_gpkg"]), "polygons", "ogr")
    memory = QgsVectorLayer(f"Polygon?crs={source.crs().authid()}", "drawn labels", "memory")
    memory.dataProvider().addAttributes([f for f in source.fields() if f.name() != "fid"])
    memory.updateFields()
    features = []
    for feature in source.getFeatures():
        copy = QgsFeature(memory.fields())
        copy.setGeometry(feature.geometry())
        copy.setAttributes([feature[name] for name in memory.fields().names()])
        features.append(copy)
    memory.dataProvider().addFeatures(features)
    assert all(x.isValid() for x in (scene, labels, memory)) and memory.featureCount() > 0
    qgis_new_project.addMapLayers([scene, labels, memory])
    return {"scene": scene, "labels": labels, "memory": memory}


def wait_models_info() -> None:
    """The dialogs ask the engine for its models when they open: let that finish first."""
    from qgis_plugin.dialogs import engine_info
    wait_for(lambda: not engine_info._RUNNING, 30)


@pytest.fixture
def train_dialog(qgis_iface, project, faults_env, tmp_path):
    from qgis_plugin.dialogs.train_dialog import TrainDialog
    dialog = TrainDialog(qgis_iface)
    wait_models_info()
    dialog.set_checked_rasters([project["scene"]])
    dialog.out.setFilePath(str(tmp_path / "model"))
    qgis_iface.messageBar().clear_messages()
    yield dialog
    if dialog.task is not None:
        dialog.task.cancel()
        wait_for(lambda: dialog.task is None, 60)
    dialog.close()
    dialog.deleteLater()


@pytest.fixture
def predict_dialog(qgis_iface, project, faults_env, tmp_path):
    from qgis_plugin.dialogs.predict_dialog import PredictDialog
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps({
        "backbone": {"name": "prithvi_eo_v2_tiny"}, "tuning": {"method": "lora"},
        "classes": CLASSES, "input": {"bands": [1, 2, 3, 4, 5, 6], "band_names": BANDS}}))
    dialog = PredictDialog(qgis_iface)
    wait_models_info()
    dialog.raster.setLayer(project["scene"])
    dialog.model.setFilePath(str(model))
    dialog.out.setFilePath(str(tmp_path / "out" / "pred.tif"))
    qgis_iface.messageBar().clear_messages()
    yield dialog
    if dialog.task is not None:
        dialog.task.cancel()
        wait_for(lambda: dialog.task is None, 60)
    dialog.close()
    dialog.deleteLater()


def run_to_the_end(dialog, timeout=60.0):
    task = dialog.start()
    assert task is not None, bar_text(dialog) + dialog.messages.text.toPlainText()
    wait_for(lambda: dialog.task is None, timeout)
    return task


def the_log(logs: Path, command: str) -> Path:
    """The newest log of a ``command`` run (the dialogs' `engine models` runs log too)."""
    files = sorted(logs.glob(f"engine-*-{command}-*.log"), key=lambda p: p.stat().st_mtime)
    assert files, f"no engine log of {command} in {logs}"
    return files[-1]


# -- the faults -----------------------------------------------------------------------------------
def test_garbage_on_stdout_then_exit_1(predict_dialog, qgis_iface, faults_env, monkeypatch,
                                       tmp_path):
    """Binary noise, JSON cut short, foreign JSON and a 100 kB line on stdout, then exit 1: the
    plugin ignores what is not protocol, reports the failure with the log, QGIS is unharmed."""
    monkeypatch.setenv("FAKE_ENGINE_MODE", "garbage")
    d = predict_dialog
    task = run_to_the_end(d)
    assert task.error is not None
    first = task.error.message.split("\n")[0]
    log = the_log(faults_env, "predict")
    assert first.startswith("The GeoPEFT engine stopped unexpectedly (exit status 1)")
    assert "fatal: the engine's stdout got mixed up" in first  # its last stderr line: the cause
    assert f"details in {log}" in first
    assert "Set up engine" in task.error.message  # what to do
    assert first in bar_text(d) and d.status.text() == "Prediction failed."
    assert any(f"details in {log}" in m for m in iface_errors(qgis_iface))
    text = log.read_text(encoding="utf-8")
    assert "[stdout, not protocol]" in text and '{"not": "a protocol event"}' in text
    assert "fatal: the engine's stdout got mixed up" in text and "# exit status 1" in text
    assert max(len(line) for line in text.splitlines()) < 2200  # the huge line was cut
    assert not (tmp_path / "out" / "pred.tif").exists() and not (tmp_path / "out").exists()
    assert_qgis_alive()


def test_hung_engine_is_killed_by_the_watchdog(train_dialog, qgis_iface, faults_env, monkeypatch,
                                               tmp_path):
    """An engine that goes silent (and ignores SIGTERM, with a child process) is killed after
    the watchdog's limit, with its child; the message says it stopped responding, names the
    log and says what to do."""
    pid_file = tmp_path / "pids"
    monkeypatch.setenv("FAKE_ENGINE_MODE", "hang")
    monkeypatch.setenv("FAKE_ENGINE_PID_FILE", str(pid_file))
    d = train_dialog
    started = time.monotonic()
    task = run_to_the_end(d, timeout=60)
    elapsed = time.monotonic() - started
    assert WATCHDOG_S <= elapsed < WATCHDOG_S + 15
    from qgis_plugin.core.engine_client import EngineHung
    assert isinstance(task.error, EngineHung)
    log = the_log(faults_env, "train")
    first = task.error.message.split("\n")[0]
    assert first == (f"The GeoPEFT engine stopped responding (no output for {WATCHDOG_S} s) and "
                     f"was stopped; details in {log}.")
    assert "Run it again" in task.error.message and "GEOPEFT_WATCHDOG_S" in task.error.message
    assert first in bar_text(d) and d.status.text() == "Training failed."
    assert any("stopped responding" in m for m in iface_errors(qgis_iface))
    assert "watchdog: no output" in log.read_text(encoding="utf-8")
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2  # the engine and its child
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10)
    assert not (tmp_path / "model").exists()
    assert d.train_button.isEnabled()  # ready for the next run
    assert_qgis_alive()


def test_missing_engine_says_how_to_set_it_up(predict_dialog, qgis_iface, monkeypatch, tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", str(missing))
    d = predict_dialog
    task = run_to_the_end(d)
    message = task.error.message
    assert message.split("\n")[0] == f"The GeoPEFT engine Python was not found at {missing}."
    assert "Set up engine" in message  # what to do
    assert f"not found at {missing}" in bar_text(d)
    assert any(f"not found at {missing}" in m for m in iface_errors(qgis_iface))
    assert "Set up engine" in d.messages.text.toPlainText()  # the fix, in full in the dialog
    assert not (tmp_path / "out").exists()
    assert_qgis_alive()


def test_crash_with_a_traceback_names_the_cause_and_the_log(train_dialog, qgis_iface, faults_env,
                                                            monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_ENGINE_MODE", "crash")
    d = train_dialog
    task = run_to_the_end(d)
    log = the_log(faults_env, "train")
    first = task.error.message.split("\n")[0]
    assert first == ("The GeoPEFT engine stopped unexpectedly (exit status 3): RuntimeError: CUDA "
                     f"out of memory; details in {log}.")
    assert first in bar_text(d)
    assert any(first in m for m in iface_errors(qgis_iface))
    shown = d.messages.text.toPlainText()  # the whole text: the fix and the traceback's tail
    assert "Set up engine" in shown and "Traceback (most recent call last)" in shown
    assert "Traceback (most recent call last)" in log.read_text(encoding="utf-8")
    assert not (tmp_path / "model").exists()
    assert_qgis_alive()


def test_crash_in_processing_reports_the_log(provider, faults_env, monkeypatch, tmp_path):
    """The same crash through the Processing algorithm: the exception's first line names the
    log; the feedback carries the engine's output and the log's path."""
    from qgis import processing
    monkeypatch.setenv("FAKE_ENGINE_MODE", "crash")
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text("{}")

    class Feedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.lines = []

        def reportError(self, error, fatalError=False):  # noqa: N802, N803 - QGIS API
            self.lines.append(error)

        def pushDebugInfo(self, info):  # noqa: N802 - QGIS API
            self.lines.append(info)

    feedback = Feedback()
    with pytest.raises(QgsProcessingException) as info:
        processing.run("geopeft:export_onnx", {"MODEL": str(model),
                                               "OUTPUT": str(tmp_path / "m.onnx")},
                       feedback=feedback)
    log = the_log(faults_env, "export")
    assert f"exit status 3): RuntimeError: CUDA out of memory; details in {log}." in str(info.value)
    assert any("CUDA out of memory" in line for line in feedback.lines)
    assert not (tmp_path / "m.onnx").exists()
    assert_qgis_alive()


# -- the UI thread is never blocked ---------------------------------------------------------------
def test_ui_thread_runs_while_the_engine_runs(train_dialog, project, faults_env, monkeypatch,
                                              tmp_path):
    """Training from an unsaved memory layer (copied for the engine) with an engine that runs
    for 3 s: the click returns at once and a UI-thread timer keeps ticking throughout."""
    monkeypatch.setenv("FAKE_ENGINE_MODE", "slow")
    monkeypatch.setenv("FAKE_ENGINE_SECONDS", "3")
    d = train_dialog
    d.labels.setLayer(project["memory"])
    assert d.label_field.currentField() == "class_id"
    assert d.validate() == []
    with TickRecorder() as ticks:
        QTimer.singleShot(0, d.train_button.click)  # as the analyst does: from the event loop
        wait_for(lambda: d.task is not None, 10)
        wait_for(lambda: d.task is None, 60)
    assert ticks.ticks[-1] - ticks.ticks[0] > 3.0  # the engine really ran a while
    assert ticks.max_gap < 0.5, f"the UI thread was blocked for {ticks.max_gap:.2f} s"
    assert d.status.text().startswith("Model saved to"), d.messages.text.toPlainText()
    assert_qgis_alive()


def test_ui_thread_runs_while_set_up_checks_the_engine(qgis_iface, faults_env, monkeypatch,
                                                       tmp_path):
    """Set up engine ▸ Check and save with a Python that takes 3 s to answer: the check runs
    in a task, the dialog says so, the UI thread keeps ticking, the answer arrives."""
    from qgis_plugin import settings
    from qgis_plugin.dialogs.setup_dialog import SetupDialog
    slow = tmp_path / "slow" / "python"
    slow.parent.mkdir()
    slow.write_text("#!/bin/sh\nsleep 3\necho 9.9.9-slow\n")
    slow.chmod(slow.stat().st_mode | stat.S_IXUSR)
    previous = settings.stored_engine_python()
    monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", str(slow))
    with TickRecorder() as ticks:
        d = SetupDialog(qgis_iface)  # checks the configured Python as it opens: in a task too
        assert d.state.text().startswith("Checking")
        first = d.check_task
        QTimer.singleShot(0, d.check_button.click)  # supersedes (cancels) the first check
        wait_for(lambda: d.check_task is not first, 5)
        assert d.check_task is not None and d.state.text().startswith("Checking")
        wait_for(lambda: d.check_task is None, 30)
    try:
        assert ticks.ticks[-1] - ticks.ticks[0] > 3.0
        assert ticks.max_gap < 0.5, f"the UI thread was blocked for {ticks.max_gap:.2f} s"
        assert d.engine_ok and d.state.text() == "GeoPEFT engine 9.9.9-slow is installed."
        assert "setting saved" in bar_text(d)
        assert settings.stored_engine_python() == str(slow)
    finally:
        settings.set_engine_python(previous)
        d.close()


# -- temporary folders --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["echo", "crash", "cancel"])
def test_temporary_copies_are_removed_when_the_task_ends(train_dialog, project, faults_env,
                                                         monkeypatch, tmp_path, mode):
    """The memory layer's copy exists while the engine runs (the engine got it) and is gone
    when the task ends: after success, failure and cancel."""
    record = tmp_path / "record"
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(record))
    monkeypatch.setenv("FAKE_ENGINE_MODE", "train" if mode == "cancel" else mode)
    d = train_dialog
    d.labels.setLayer(project["memory"])
    task = d.start()
    assert task is not None, bar_text(d)
    if mode == "cancel":
        wait_for(lambda: d.status.text().startswith("Epoch 1 · step"), 30)
        d.cancel_button.click()
    wait_for(lambda: d.task is None, 60)
    args = json.loads((record / "argv.json").read_text())
    copied = args[args.index("--labels") + 1]
    assert Path(copied).name == "labels.gpkg" and os.path.basename(
        os.path.dirname(copied)).startswith("geopeft-layer-")
    got = QgsVectorLayer(str(record / "labels.gpkg"), "got", "ogr")  # what the engine read
    assert got.isValid() and got.featureCount() == project["memory"].featureCount()
    assert "class_id" in got.fields().names()
    assert not os.path.exists(os.path.dirname(copied))
    assert (task.error is not None) == (mode == "crash")
    assert_qgis_alive()


def test_processing_removes_its_temporary_copies(provider, project, faults_env, monkeypatch,
                                                 tmp_path):
    """geopeft:train with memory-layer labels copies them for the engine, then removes the
    copy, also when the engine fails."""
    from qgis import processing
    record = tmp_path / "record"
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(record))
    monkeypatch.setenv("FAKE_ENGINE_MODE", "crash")
    with pytest.raises(QgsProcessingException):
        processing.run("geopeft:train", {
            "INPUT": [project["scene"]], "LABEL_POLYGONS": project["memory"],
            "LABEL_FIELD": "class_id", "PRETRAINED": False, "EPOCHS": 1,
            "OUTPUT": str(tmp_path / "model")})
    args = json.loads((record / "argv.json").read_text())
    copied = args[args.index("--labels") + 1]
    assert os.path.basename(os.path.dirname(copied)).startswith("geopeft-layer-")
    assert not os.path.exists(os.path.dirname(copied))
    assert not (tmp_path / "model").exists()


# -- logs ----------------------------------------------------------------------------------------
def test_one_log_per_run_and_old_ones_pruned(tmp_path):
    from qgis_plugin.core.engine_client import EngineLog
    logs = tmp_path / "logs"
    paths = []
    for i in range(5):
        log = EngineLog(logs, "train", keep=3)
        log.write(f"run {i}")
        log.close()
        paths.append(Path(log.path))
        os.utime(log.path, (time.time() - 100 + i, time.time() - 100 + i))
    assert sorted(logs.glob("engine-*.log")) == sorted(paths[-3:])
    assert paths[-1].read_text() == "run 4\n"
    # a folder that cannot be written: no log, no crash
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert EngineLog(blocked / "logs", "train").path is None


def test_engine_argv_is_a_list_and_the_environment_is_clean(monkeypatch, fake_python, tmp_path):
    """The engine gets an argument list (no shell: a path with spaces and quotes stays one
    argument) and an environment without QGIS's Python, GDAL, PROJ and Qt variables."""
    from qgis_plugin.core.engine_client import EngineProcess, run_engine
    for name in ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "QGIS_PREFIX_PATH",
                 "LD_LIBRARY_PATH"):
        monkeypatch.setenv(name, "/from/qgis")
    odd = str(tmp_path / "a b; 'c' $(d)")
    result = run_engine(fake_python, ["echo", "--out", odd], log_dir=tmp_path / "logs")
    assert result.done["argv"][-2:] == ["--out", odd]
    process = EngineProcess(fake_python, ["leak"], log_dir=tmp_path / "logs")
    assert isinstance(process.proc.args, list)
    events = list(process.events())
    process.wait()
    env = events[-1]["env"]
    assert env.pop("PYTHONUNBUFFERED") == "1"
    assert all(value is None for value in env.values()), env

