"""Issue 11.1: the Processing toolbox's Train and Evaluate dialogs with a raster as labels.

The class field's parent used to be a raster-or-polygons parameter; with a raster chosen, QGIS
segfaulted in QgsProcessingFieldWidgetWrapper::setParentLayerWrapperValue. The dialogs open in
a QGIS of their own (a subprocess), so a crash fails this test rather than killing pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("open_processing_dialogs.py")


def test_train_and_evaluate_dialogs_take_a_raster_as_labels(data):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(data["labels"].parent), "train", "evaluate"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, f"QGIS died (exit status {proc.returncode}): {proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ALIVE"
    opened = [json.loads(line) for line in lines if line.startswith("{")]
    assert [o["algorithm"] for o in opened] == ["train", "evaluate"]
    for dialog in opened:
        # the raster went into the class raster parameter; polygons and their field into theirs
        assert dialog["labels"].startswith("labels_"), dialog
        assert dialog["polygons"].startswith("label_polygons_"), dialog
        assert dialog["field"] == "class_id", dialog
