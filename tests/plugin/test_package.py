"""The plugin as a package: metadata, zip, profile install, no torch in QGIS, engine in sync."""
from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
import zipfile

import pytest

from plugin_testdata import REPO

PLUGIN = REPO / "qgis_plugin"


def test_importing_the_plugin_does_not_import_torch():
    code = (
        "import sys, pkgutil, importlib\n"
        "import qgis_plugin\n"
        "for m in pkgutil.walk_packages(qgis_plugin.__path__, 'qgis_plugin.'):\n"
        "    importlib.import_module(m.name)\n"
        "from qgis_plugin.plugin import GeoPEFTPlugin\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('torch', 'lightning', 'timm', 'peft', 'rasterio', 'onnxruntime', 'engine'))\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n")
    path = [str(REPO), "/usr/share/qgis/python/plugins"]
    env = {"PYTHONPATH": ":".join(path), "QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=str(REPO / "qgis_plugin"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_metadata():
    meta = configparser.ConfigParser()
    meta.read(PLUGIN / "metadata.txt", encoding="utf-8")
    general = meta["general"]
    assert general["name"] == "GeoPEFT"
    assert general["qgisMinimumVersion"] == "3.22" and general["qgisMaximumVersion"] == "4.99"
    assert general["hasProcessingProvider"] == "yes"
    for key in ("description", "about", "version", "author", "email", "homepage", "tracker",
                "repository", "category", "tags", "icon"):
        assert general.get(key), key
    assert (PLUGIN / general["icon"]).is_file()


def test_root_metadata_is_the_plugin_metadata():
    """`make plugin` copies qgis_plugin/metadata.txt to the repository root."""
    root = REPO / "metadata.txt"
    assert root.is_file(), "run `make plugin`"
    assert root.read_bytes() == (PLUGIN / "metadata.txt").read_bytes(), "run `make plugin`"


def test_zip_layout(tmp_path):
    from qgis_plugin.packaging import build_zip
    path = build_zip(tmp_path)
    names = zipfile.ZipFile(path).namelist()
    assert all(n.startswith("geopeft/") for n in names)
    for required in ("geopeft/__init__.py", "geopeft/metadata.txt", "geopeft/plugin.py",
                     "geopeft/processing/provider.py", "geopeft/icons/geopeft.svg",
                     "geopeft/engine_src/engine/protocol.py", "geopeft/engine_src/pyproject.toml"):
        assert required in names, required
    assert "geopeft/engine_src/constraints.txt" not in names  # the dev venv's Debian pins
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "geopeft/packaging.py" not in names


def test_install_into_a_profile(tmp_path):
    from qgis_plugin.packaging import build_zip, install
    profile = tmp_path / "profiles" / "default"
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[PythonPlugins]\nprocessing=true\n\n[UI]\nfoo=bar\n")
    target = install(profile, engine_python="/opt/engine/bin/python", zip_path=build_zip(tmp_path))
    assert (target / "metadata.txt").is_file()
    assert (target / "engine_src" / "engine" / "protocol.py").is_file()
    text = ini.read_text()
    assert "processing=true" in text and "foo=bar" in text
    assert re.search(r"\[PythonPlugins\]\nprocessing=true\ngeopeft=true", text)
    assert "[geopeft]\nengine_python=/opt/engine/bin/python" in text
    install(profile, engine_python="/other/python")  # again, from the source tree: updates in place
    assert ini.read_text().count("geopeft=true") == 1
    assert "engine_python=/other/python" in ini.read_text()


def test_installed_plugin_loads_protocol_from_engine_src(tmp_path):
    """Outside the repository the plugin finds engine/protocol.py in its engine_src/."""
    from qgis_plugin.packaging import install
    target = install(tmp_path / "profile", repo=REPO)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from geopeft.core.protocol import decode_event, engine_source_dir; "
            "print(engine_source_dir()); "
            "assert decode_event('{\"v\": 1, \"event\": \"done\"}')['event'] == 'done'")
    proc = subprocess.run([sys.executable, "-c", code, str(target.parent)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(target / "engine_src")


@pytest.fixture(scope="module")
def engine_models() -> dict:
    """The summary of `engine models`, as the plugin reads it."""
    proc = subprocess.run([sys.executable, "-m", "engine", "models", "--events", "jsonl"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in proc.stdout.splitlines() if '"done"' in line][0]


def test_backbones_match_the_engine_registry(engine_models):
    """The plugin's model list is what the engine itself reports (`engine models`)."""
    from qgis_plugin.core.commands import PATCH_SIZES
    assert {m["name"]: m["patch"] for m in engine_models["models"]} == PATCH_SIZES


def test_offline_choices_match_the_engine(engine_models):
    """The Train dialog's tuning methods and decoders come from `engine models`; the plugin's
    own tuples, used until the engine answers (and by Processing), are the same lists."""
    from qgis_plugin.core.bands import ModelsInfo
    from qgis_plugin.core.commands import DECODERS, TUNING_METHODS
    info = ModelsInfo.from_summary(engine_models)
    assert info.tuning_methods == TUNING_METHODS
    assert info.decoders == DECODERS
    assert TUNING_METHODS[0] == DECODERS[0] == "auto" and "linear" in DECODERS


def test_band_matches_shown_are_the_engines(engine_models):
    """The band table's matches (name first, then the nearest wavelength within 3 %) are what the
    engine's loader will do, for every model."""
    import engine.models  # noqa: F401
    from engine.models.checkpoints import match_bands
    from engine.models.registry import BACKBONES
    from qgis_plugin.core.bands import ModelsInfo
    info = ModelsInfo.from_summary(engine_models)
    names = ["B02", "B03", "B04", "B08", "B8A", "705nm", "0.74um", "thermal", "", "B12", "swir16", "VV", "red"]
    for model, spec in BACKBONES.items():
        engine_side = match_bands(spec.bands, names)
        expected = [spec.bands[engine_side[j]] if j in engine_side else None for j in range(len(names))]
        assert info.pretrained_matches(model, names) == expected, model
