"""Qt 6 readiness of the plugin's code: enums spelled with their scope, no ``exec_()``.

PyQt6 (QGIS 4) only knows ``Qt.AlignmentFlag.AlignLeft``, ``QMessageBox.StandardButton.Yes``,
``QSizePolicy.Policy.Expanding``…; the PyQt5 shortcut ``Qt.AlignLeft`` raises AttributeError
there, and so do QGIS's own enums (``Qgis.MessageLevel.Critical``, not ``Qgis.Critical``).
Both spellings work on QGIS 3.22, so the plugin uses the scoped one everywhere.

No list of enums to keep up to date: every attribute chain in the plugin's modules that starts
at a name imported from ``qgis.*`` (``Qt.AlignLeft``, ``QtCore.Qt.AlignLeft``,
``QgsTask.CanCancel``) is resolved here, in the real QGIS 3.22 (PyQt5): when it lands on an enum
member, the object before the member must be that member's enum type. With ``$PYQT6_PYTHON``
(an interpreter with PyQt6 installed), the Qt chains are also resolved in PyQt6.
"""
from __future__ import annotations

import ast
import enum
import importlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugin_testdata import REPO

PLUGIN = REPO / "qgis_plugin"


@dataclass
class Chain:
    path: Path
    line: int
    module: str  # where the root name was imported from, e.g. qgis.PyQt.QtCore
    names: list[str]  # root name as imported, then the attributes

    def __str__(self) -> str:
        return f"{where(self.path)}:{self.line}: {'.'.join(self.names)}"


def where(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def plugin_modules() -> list[Path]:
    return sorted(p for p in PLUGIN.rglob("*.py") if "__pycache__" not in p.parts)


def attribute_chains(path: Path) -> list[Chain]:
    """``A.b.c`` expressions whose root ``A`` is imported from ``qgis.*`` in this module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imported: dict[str, tuple[str, str]] = {}  # local name -> (module, attribute or "")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qgis"):
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qgis") and alias.asname:
                    imported[alias.asname] = (alias.name, "")
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    chains = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        names, cur = [], node
        while isinstance(cur, ast.Attribute):
            names.insert(0, cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in imported:
            module, attribute = imported[cur.id]
            root = [attribute] if attribute else []
            chains.append(Chain(path, node.lineno, module, root + names))
    return chains


def exec_underscore_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{where(path)}:{node.lineno}: .{node.attr}()" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("exec_", "print_")]


def is_enum_member(value) -> bool:
    kind = type(value)
    return isinstance(value, enum.Enum) or type(kind).__name__ == "enumtype"


def unscoped(chain: Chain) -> str | None:
    """Why the chain is an unscoped enum access (None when it is fine or not an enum)."""
    obj = importlib.import_module(chain.module)
    for index, name in enumerate(chain.names):
        parent, obj = obj, getattr(obj, name, None)
        if obj is None:
            return None  # not resolvable statically (an instance attribute, a signal…)
        if is_enum_member(obj) and index > 0 and parent is not type(obj):
            kind = type(obj)
            if getattr(parent, kind.__name__, None) is kind:  # an enum of the class: scope it
                scoped = ".".join(chain.names[:index] + [kind.__name__] + chain.names[index:])
            else:  # an alias of an enum declared elsewhere (QgsMapLayer.RasterLayer)
                scoped = f"{kind.__module__}.{kind.__qualname__}.{name} or an isinstance check"
            return f"{chain}  ->  {scoped}"
    return None


def test_the_scan_finds_unscoped_enums(tmp_path, qgis_app):
    """The check itself: it flags the PyQt5-only spellings and passes the scoped ones."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from qgis.PyQt.QtCore import Qt\nfrom qgis.PyQt import QtWidgets\n"
        "from qgis.PyQt.QtWidgets import QMessageBox, QSizePolicy as SP\n"
        "from qgis.core import Qgis, QgsTask\n"
        "a = Qt.AlignLeft\nb = Qt.AlignmentFlag.AlignLeft\nc = QMessageBox.Yes\n"
        "d = QMessageBox.StandardButton.Yes\ne = SP.Expanding\nf = QtWidgets.QFrame.HLine\n"
        "g = Qgis.Critical\nh = Qgis.MessageLevel.Critical\ni = QgsTask.CanCancel\n"
        "j = Qt.ItemDataRole.UserRole + 1\nk = QMessageBox.question\nl = d.exec_()\n")
    chains = attribute_chains(sample)
    flagged = sorted(c.line for c in chains if unscoped(c))
    assert flagged == [5, 7, 9, 10, 11, 13]
    assert unscoped(chains[0]).endswith("Qt.AlignmentFlag.AlignLeft")
    assert exec_underscore_calls(sample) == ["sample.py:16: .exec_()"]


def test_plugin_uses_scoped_enums_only(qgis_app):
    chains = [c for path in plugin_modules() for c in attribute_chains(path)]
    assert len(chains) > 100  # the scan sees the plugin's Qt and QGIS code
    problems = [why for why in map(unscoped, chains) if why]
    assert not problems, "unscoped enums (PyQt6 rejects them):\n" + "\n".join(problems)


def test_plugin_does_not_call_exec_underscore():
    problems = [p for path in plugin_modules() for p in exec_underscore_calls(path)]
    assert not problems, "exec_() is gone in PyQt6; use exec():\n" + "\n".join(problems)


@pytest.mark.skipif(not os.environ.get("PYQT6_PYTHON"),
                    reason="$PYQT6_PYTHON (an interpreter with PyQt6) not set")
def test_qt_chains_exist_in_pyqt6():
    """Every Qt name the plugin spells (qgis.PyQt.QtX.…) exists in PyQt6's QtX."""
    chains = sorted({(c.module.replace("qgis.PyQt", "PyQt6"), ".".join(c.names))
                     for path in plugin_modules() for c in attribute_chains(path)
                     if c.module.startswith("qgis.PyQt.Qt") and c.names[0][:1] == "Q"
                     and len(c.names) > 1})
    code = ("import importlib, json, sys\nmissing = []\n"
            "for module, chain in json.load(sys.stdin):\n"
            "    obj = importlib.import_module(module)\n"
            "    for name in chain.split('.'):\n"
            "        if not hasattr(obj, name):\n"
            "            if name[:1].isupper(): missing.append(module + ': ' + chain)\n"
            "            break\n"
            "        obj = getattr(obj, name)\n"
            "print(json.dumps(missing))\n")
    proc = subprocess.run([os.environ["PYQT6_PYTHON"], "-c", code], input=json.dumps(chains),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr
    missing = json.loads(proc.stdout)
    assert len(chains) > 15 and not missing, "\n".join(missing)
