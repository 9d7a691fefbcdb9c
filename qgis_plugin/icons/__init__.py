"""The plugin's icons (SVG, drawn for GeoPEFT)."""
from __future__ import annotations

import os

from qgis.PyQt.QtGui import QIcon

ICON_DIR = os.path.dirname(__file__)


def icon_path(name: str) -> str:
    return os.path.join(ICON_DIR, name)


def icon(name: str) -> QIcon:
    return QIcon(icon_path(name))
