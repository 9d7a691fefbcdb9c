"""The plugin's settings (QgsSettings, i.e. the profile's QGIS3.ini): the engine Python."""
from __future__ import annotations

from qgis.core import QgsApplication, QgsSettings

from .core.settings import SETTINGS_KEY, resolve_engine_python


def stored_engine_python() -> str:
    return QgsSettings().value(SETTINGS_KEY, "", type=str) or ""


def set_engine_python(path: str) -> None:
    QgsSettings().setValue(SETTINGS_KEY, path)


def profile_dir() -> str:
    return QgsApplication.qgisSettingsDirPath()


def engine_python() -> str | None:
    """$GEOPEFT_ENGINE_PYTHON, else the setting, else the set-up venv or <repo>/.venv."""
    return resolve_engine_python(stored_engine_python(), profile_dir())
