"""Fixtures for the QGIS plugin tests: a real QGIS 3.22 (pytest-qgis, offscreen), the GeoPEFT
provider, small seeded rasters/polygons made with GDAL, and the real engine subprocess."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plugin_testdata import ENGINE_PYTHON, engine_available, tiny_train_parameters, write_test_data  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _engine_python_env():
    """Algorithms and dialogs find the engine through $GEOPEFT_ENGINE_PYTHON."""
    old = os.environ.get("GEOPEFT_ENGINE_PYTHON")
    os.environ["GEOPEFT_ENGINE_PYTHON"] = ENGINE_PYTHON
    yield ENGINE_PYTHON
    if old is None:
        os.environ.pop("GEOPEFT_ENGINE_PYTHON", None)
    else:
        os.environ["GEOPEFT_ENGINE_PYTHON"] = old


@pytest.fixture(scope="session")
def provider(qgis_app, qgis_processing):
    from qgis.core import QgsApplication

    from qgis_plugin.processing.provider import GeoPEFTProvider

    registry = QgsApplication.processingRegistry()
    existing = registry.providerById("geopeft")
    if existing is not None:
        return existing
    prov = GeoPEFTProvider()
    assert registry.addProvider(prov)
    return prov


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_test_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, data, provider) -> Path:
    """One tiny model trained through the real engine, shared by the tests that need one."""
    if not engine_available():
        pytest.skip("engine CLI (engine/cli.py) not importable yet")
    from qgis import processing
    out = tmp_path_factory.mktemp("model") / "model"
    result = processing.run("geopeft:train", tiny_train_parameters(data, out))
    return Path(result["OUTPUT"])




@pytest.fixture(scope="session")
def fake_python(tmp_path_factory) -> str:
    """An 'interpreter' whose `-m engine` is tests/plugin/fake_engine.py."""
    fake = Path(__file__).with_name("fake_engine.py")
    path = tmp_path_factory.mktemp("fake") / "python"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)
