"""`qgis_process run geopeft:predict …` from the shell, with the plugin installed in a profile."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from qgis.core import QgsRasterLayer

from plugin_testdata import ENGINE_PYTHON, REPO, needs_engine

# Debian's /usr/bin/qgis_process wrapper adds --noversioncheck, which 3.22 rejects
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> dict:
    """A QGIS config folder with GeoPEFT installed and enabled (QGIS_CUSTOM_CONFIG_PATH)."""
    from qgis_plugin.packaging import install
    root = tmp_path_factory.mktemp("qgis-config")
    install(root / "profiles" / "default", engine_python=ENGINE_PYTHON, repo=REPO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEOPEFT_", "PYTHON"))}
    env.update(QGIS_CUSTOM_CONFIG_PATH=str(root), QT_QPA_PLATFORM="offscreen")
    return {"root": root, "env": env}


pytestmark = pytest.mark.skipif(not Path(QGIS_PROCESS).is_file(), reason="qgis_process not installed")


def test_qgis_process_lists_the_algorithms(profile):
    proc = subprocess.run([QGIS_PROCESS, "list"], env=profile["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for alg in ("geopeft:train", "geopeft:predict", "geopeft:export_onnx", "geopeft:evaluate"):
        assert alg in proc.stdout


@needs_engine
def test_qgis_process_runs_predict(profile, trained_model, data, tmp_path):
    out = tmp_path / "qp_pred.tif"
    proc = subprocess.run(
        [QGIS_PROCESS, "run", "geopeft:predict", "--json", f"--INPUT={data['scene']}",
         f"--MODEL={trained_model}", f"--OUTPUT={out}", "--DEVICE=1"],
        env=profile["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert Path(result["results"]["OUTPUT"]) == out
    layer = QgsRasterLayer(str(out), "pred")
    ref = QgsRasterLayer(str(data["scene"]), "scene")
    assert layer.isValid() and (layer.width(), layer.height()) == (ref.width(), ref.height())
    assert layer.extent() == ref.extent()
