"""geopeft:evaluate's REPORT: the engine's HTML report, an HTML output of Processing."""
from __future__ import annotations

import base64
import re
from pathlib import Path

from qgis.core import QgsApplication, QgsProcessingOutputHtml

from plugin_testdata import needs_engine


def run(params: dict) -> dict:
    from qgis import processing
    return processing.run("geopeft:evaluate", params)


@needs_engine
def test_evaluate_writes_the_html_report(provider, data, tmp_path):
    alg = QgsApplication.processingRegistry().algorithmById("geopeft:evaluate")
    # an HTML destination: Processing shows it in its Results Viewer; the dialog makes one by default
    assert isinstance(alg.outputDefinition("REPORT"), QgsProcessingOutputHtml)
    definition = alg.parameterDefinition("REPORT")
    assert definition.createByDefault() and definition.defaultFileExtension() == "html"
    # the label raster scored against its own polygons: a real engine run, no model needed
    report = tmp_path / "report" / "evaluation.html"
    result = run({"INPUT": str(data["labels"]), "LABEL_POLYGONS": str(data["labels_gpkg"]),
                  "LABEL_FIELD": "class_id", "OUTPUT": str(tmp_path / "metrics.json"), "REPORT": str(report)})
    assert result["REPORT"] == str(report) and report.is_file()
    text = report.read_text(encoding="utf-8")
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)
    assert len(images) >= 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert f"{result['MIOU']:.4f}" in text and "No model card was found" in text
    assert sorted(p.name for p in report.parent.iterdir()) == ["evaluation.html"]
    # a script that leaves REPORT out gets no report (and the engine no --report)
    plain = run({"INPUT": str(data["labels"]), "LABELS": str(data["labels"]),
                 "OUTPUT": str(tmp_path / "plain.json")})
    assert not plain.get("REPORT") and Path(plain["OUTPUT"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "plain.json", "report"]
