"""The plugin's settings (QgsSettings, i.e. the profile's QGIS3.ini): the engine Python, where
the engine logs go and how long a silent engine may run."""
from __future__ import annotations

import os

from qgis.core import QgsApplication, QgsSettings

from .core.engine_client import LOG_DIR_VARIABLE, WATCHDOG_S, WATCHDOG_VARIABLE
from .core.settings import SETTINGS_KEY, resolve_engine_python

WATCHDOG_KEY = "geopeft/watchdog_s"


def stored_engine_python() -> str:
    return QgsSettings().value(SETTINGS_KEY, "", type=str) or ""


def set_engine_python(path: str) -> None:
    QgsSettings().setValue(SETTINGS_KEY, path)


def profile_dir() -> str:
    return QgsApplication.qgisSettingsDirPath()


def engine_python() -> str | None:
    """$GEOPEFT_ENGINE_PYTHON, else the setting, else the set-up venv or <repo>/.venv."""
    return resolve_engine_python(stored_engine_python(), profile_dir())


def engine_log_dir() -> str:
    """$GEOPEFT_LOG_DIR, else <QGIS profile>/geopeft/logs: one log file per engine run."""
    return os.environ.get(LOG_DIR_VARIABLE, "").strip() or \
        os.path.join(profile_dir(), "geopeft", "logs")


def watchdog_seconds() -> float:
    """How long the engine may print nothing before it is taken as hung and killed:
    $GEOPEFT_WATCHDOG_S, else the setting geopeft/watchdog_s, else 10 minutes (0: never)."""
    for value in (os.environ.get(WATCHDOG_VARIABLE, ""),
                  QgsSettings().value(WATCHDOG_KEY, "", type=str) or ""):
        try:
            if str(value).strip():
                return max(float(value), 0.0)
        except ValueError:
            continue
    return WATCHDOG_S
