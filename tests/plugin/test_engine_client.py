"""The Qt-free engine client: argv, sanitised environment, events, cancel, errors."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from qgis_plugin.core import engine_client
from qgis_plugin.core.engine_client import (EngineFailed, EngineNotFound, engine_argv, run_engine,
                                            sanitized_env)



def test_argv_adds_protocol_flags():
    argv = engine_argv("/py", ["predict", "--model", "m", "--out", "o.tif"])
    assert argv[:6] == ["/py", "-m", "engine", "predict", "--events", "jsonl"]
    assert argv[-4:] == ["--model", "m", "--out", "o.tif"]


def test_environment_is_sanitised():
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/usr/share/qgis/python", "PYTHONHOME": "/x",
            "GDAL_DATA": "/qgis/gdal", "PROJ_LIB": "/qgis/proj", "PROJ_DATA": "/qgis/proj",
            "GDAL_DRIVER_PATH": "/qgis/gdalplugins", "QGIS_PREFIX_PATH": "/usr",
            "LD_LIBRARY_PATH": "/usr/lib/grass82/lib", "QGIS_CUSTOM_CONFIG_PATH": "/p",
            "HOME": "/home/u", "LANG": "C.UTF-8"}
    env = sanitized_env(base, python="/venv/bin/python")
    for name in ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA",
                 "GDAL_DRIVER_PATH", "QGIS_PREFIX_PATH", "LD_LIBRARY_PATH", "QGIS_CUSTOM_CONFIG_PATH"):
        assert name not in env
    assert env["HOME"] == "/home/u" and env["LANG"] == "C.UTF-8"
    assert env["PATH"].split(os.pathsep)[0] == "/venv/bin"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_environment_reaches_the_engine_sanitised(fake_python, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/usr/share/qgis/python")
    monkeypatch.setenv("GDAL_DATA", "/qgis/gdal")
    monkeypatch.setenv("QGIS_SOMETHING", "1")
    result = run_engine(fake_python, ["leak"])
    env = result.done["env"]
    assert env.pop("PYTHONUNBUFFERED") == "1"
    assert all(value is None for value in env.values()), env


def test_events_and_protocol_only(fake_python):
    events = []
    stop = threading.Event()

    def on_event(event):
        events.append(event)
        if event["event"] == "progress" and event["step"] >= 5:
            stop.set()
    result = run_engine(fake_python, ["train"], on_event=on_event, is_cancelled=stop.is_set)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert result.metrics() == {"val_miou": 0.5}
    assert result.cancelled and result.done["cancelled"] is True
    # the stray non-protocol stdout line is kept for diagnostics, never parsed as an event
    assert "not a protocol line on stdout" in result.stderr_tail
    assert "some human log line" in result.stderr_tail


def test_cancel_stops_a_silent_engine_quickly(fake_python):
    started = time.monotonic()
    result = run_engine(fake_python, ["silent"], is_cancelled=lambda: time.monotonic() - started > 0.5)
    assert result.cancelled  # returned at all: the engine never prints, so only cancel ends it


def test_user_error_gives_message_and_hint(fake_python):
    with pytest.raises(EngineFailed) as info:
        run_engine(fake_python, ["usererror"])
    assert "labels not found: x.tif" in info.value.message
    assert "Hint: check the path" in info.value.message
    assert "Traceback" not in info.value.message


def test_crash_shows_the_tail_of_stderr(fake_python):
    with pytest.raises(EngineFailed) as info:
        run_engine(fake_python, ["crash"])
    assert "exit status 3" in info.value.message
    assert "CUDA out of memory" in info.value.message


def test_missing_engine_gives_the_fix(fake_python, tmp_path):
    with pytest.raises(EngineNotFound) as info:
        run_engine(str(tmp_path / "nope" / "python"), ["train"])
    assert "not found" in info.value.message and "Set up engine" in info.value.message
    with pytest.raises(EngineNotFound) as info:
        run_engine(fake_python, ["noengine"])
    assert "not installed" in info.value.message and "Set up engine" in info.value.message
    with pytest.raises(EngineNotFound):
        run_engine(None, ["train"])


def test_engine_version_of_a_python_without_engine(monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])  # the repository's engine/ must not count
    with pytest.raises(EngineNotFound) as info:
        engine_client.engine_version("/usr/bin/python3")
    assert "not installed" in info.value.message


def test_progress_mapping():
    from qgis_plugin.processing.base import ProgressMapper
    train = ProgressMapper("train")
    assert train.percent({"event": "progress", "stage": "prepare", "step": 1, "total": 4}) == 1.25
    assert train.percent({"event": "progress", "stage": "train", "step": 47, "total": 94}) == 52.0
    # with only a time budget, the engine sends the fraction of it used
    assert train.percent({"event": "progress", "stage": "train", "step": 3, "total": None,
                          "fraction": 0.5}) == 52.0
    assert train.percent({"event": "metric", "name": "val_miou", "value": 0.5}) is None


def test_setup_steps_and_runner(tmp_path):
    from qgis_plugin.core.setup_engine import SetupError, SetupStep, run_steps, setup_steps
    steps = setup_steps(tmp_path / "venv", python="/usr/bin/python3", environ={})
    assert steps[0].argv == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "venv")]
    install = steps[-2].argv  # the engine, after its dependencies (tests/plugin/test_engine_setup.py)
    assert install[:2] == [str(tmp_path / "venv" / "bin" / "python"), "-m"]
    assert install[-1] == str(Path(__file__).parents[2])  # the engine source: the repository
    assert not [a for step in steps for a in step.argv if "constraints" in a]  # no Debian pins
    lines, seen = [], []
    ok = run_steps([SetupStep("a", [sys.executable, "-c", "print('hello')"])],
                   on_step=lambda i, s: seen.append(s.label), on_line=lines.append)
    assert ok and seen == ["a"] and "hello" in lines
    with pytest.raises(SetupError, match="b failed"):
        run_steps([SetupStep("b", [sys.executable, "-c", "import sys; print('boom'); sys.exit(4)"])])
    assert not run_steps([SetupStep("c", [sys.executable, "-c", "import time; time.sleep(30)"])],
                         is_cancelled=lambda: True)


def test_engine_python_resolution(tmp_path):
    from qgis_plugin.core.settings import resolve_engine_python, setup_venv_dir
    assert resolve_engine_python("/stored", environ={"GEOPEFT_ENGINE_PYTHON": "/env"}) == "/env"
    assert resolve_engine_python("/stored", environ={}) == "/stored"
    venv_python = setup_venv_dir(tmp_path) / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert resolve_engine_python("", tmp_path, environ={}) == str(venv_python)
    # nothing configured, no set-up venv: the repository's .venv from `make install`
    repo_python = Path(__file__).parents[2] / ".venv" / "bin" / "python"
    assert resolve_engine_python("", tmp_path / "nothing", environ={}) == \
        (str(repo_python) if repo_python.is_file() else None)
