"""Where the engine's Python interpreter is: the stored setting, else a sensible default.

Qt-free: the stored value is read by the caller (``qgis_plugin.settings`` uses QgsSettings) and
passed in, so this logic is testable without QGIS.
"""
from __future__ import annotations

import os
from pathlib import Path

from .engine_client import venv_python
from .protocol import PLUGIN_DIR

ENV_VARIABLE = "GEOPEFT_ENGINE_PYTHON"  # overrides everything (CI, qgis_process scripts)
SETTINGS_KEY = "geopeft/engine_python"
SETUP_VENV_NAME = "geopeft-engine-venv"  # created by "Set up engine" in the profile folder


def setup_venv_dir(profile_dir: str | os.PathLike) -> Path:
    """The venv "Set up engine" creates, inside the QGIS profile folder."""
    return Path(profile_dir) / SETUP_VENV_NAME


def default_candidates(profile_dir: str | os.PathLike | None = None) -> list[Path]:
    """Interpreters tried when nothing is configured, best first."""
    candidates = []
    if profile_dir:
        candidates.append(venv_python(setup_venv_dir(profile_dir)))
    # plugin run from the repository (qgis_plugin/ next to .venv/ made by `make install`)
    candidates.append(venv_python(PLUGIN_DIR.parent / ".venv"))
    return candidates


def resolve_engine_python(stored: str | None = None,
                          profile_dir: str | os.PathLike | None = None,
                          environ: dict | None = None) -> str | None:
    """The interpreter to run the engine with: $GEOPEFT_ENGINE_PYTHON, the setting, a default.

    Returns the stored/explicit value even if it does not exist (so the error names it), and
    None only when nothing is configured and no default exists.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VARIABLE):
        return environ[ENV_VARIABLE]
    if stored:
        return stored
    for candidate in default_candidates(profile_dir):
        if candidate.is_file():
            return str(candidate)
    return None
