"""The engine's JSON-lines protocol, loaded from the engine's own ``engine/protocol.py``.

One source of truth: the plugin never keeps its own copy of the protocol. The file is found
next to the plugin and imported *by file path* under a private module name (it imports only
the standard library, so this never pulls the engine's dependencies into QGIS):

- source tree: ``<repo>/qgis_plugin/`` sits beside ``<repo>/engine/protocol.py``;
- installed plugin (``make plugin`` zip): the zip carries the engine source in
  ``geopeft/engine_src/engine/protocol.py`` (also used by "Set up engine" to pip-install it).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent.parent
_MODULE_NAME = "_geopeft_engine_protocol"


def engine_source_dir() -> Path | None:
    """The folder holding ``engine/`` + ``pyproject.toml`` (zip: engine_src/, source tree: repo)."""
    for candidate in (PLUGIN_DIR / "engine_src", PLUGIN_DIR.parent):
        if (candidate / "engine" / "protocol.py").is_file():
            return candidate
    return None


def _load():
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    source = engine_source_dir()
    if source is None:
        raise ImportError(
            "GeoPEFT: engine/protocol.py not found beside the plugin; reinstall the plugin "
            "from the zip built by `make plugin`.")
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, source / "engine" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


_protocol = _load()
decode_event = _protocol.decode_event
PROTOCOL_VERSION = _protocol.PROTOCOL_VERSION
EVENTS = _protocol.EVENTS
EXIT_OK = _protocol.EXIT_OK
EXIT_USER_ERROR = _protocol.EXIT_USER_ERROR
EXIT_INTERNAL_ERROR = _protocol.EXIT_INTERNAL_ERROR
parse_duration = _protocol.parse_duration

__all__ = ["decode_event", "engine_source_dir", "PROTOCOL_VERSION", "EVENTS",
           "EXIT_OK", "EXIT_USER_ERROR", "EXIT_INTERNAL_ERROR", "parse_duration"]
