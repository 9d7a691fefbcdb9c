"""Open GeoPEFT's Processing dialogs the way the toolbox does, in a QGIS of its own.

    open_processing_dialogs.py DATA_DIR ALGORITHM...

Run in a subprocess by test_processing_dialogs.py, so that a crash of QGIS (the class field
widget used to segfault when the labels were a raster) fails a test instead of killing pytest.
The project holds rasters only, as an analyst's first project often does; each dialog is opened
with ``processing.createAlgorithmDialog`` (what the toolbox runs on a double click), shown, and
given a raster as labels, then polygons. Prints one JSON line per dialog with the parameters
the dialog would run with, then ``ALIVE``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))


def main(data_dir: str, algorithms: list[str]) -> int:
    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtCore import QCoreApplication
    from qgis.PyQt.QtWidgets import QMainWindow

    app = QgsApplication([], True)
    app.initQgis()
    # processing.createAlgorithmDialog parents the dialog on iface.mainWindow(): give it a
    # stand-in QGIS interface before Processing is imported.
    import qgis.utils
    from qgis.gui import QgsMessageBar

    class Iface:
        def __init__(self):
            self.window = QMainWindow()
            self.canvas = QgsMapCanvas(self.window)
            self.bar = QgsMessageBar(self.window)

        def mainWindow(self):  # noqa: N802 - QGIS API
            return self.window

        def mapCanvas(self):  # noqa: N802
            return self.canvas

        def messageBar(self):  # noqa: N802
            return self.bar

        def __getattr__(self, name):  # activeLayer(), browserModel(), …: nothing
            return lambda *args, **kwargs: None

    qgis.utils.iface = Iface()
    sys.path.append(os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))
    from processing.core.Processing import Processing
    Processing.initialize()
    import processing

    from qgis_plugin.processing.provider import GeoPEFTProvider
    provider = GeoPEFTProvider()
    QgsApplication.processingRegistry().addProvider(provider)

    data = Path(data_dir)
    labels = QgsRasterLayer(str(data / "labels.tif"), "labels")
    scene = QgsRasterLayer(str(data / "scene.tif"), "scene")
    QgsProject.instance().addMapLayers([labels, scene])  # rasters only: the labels come first

    def settle():
        for _ in range(10):
            QCoreApplication.processEvents()

    for name in algorithms:
        dialog = processing.createAlgorithmDialog(f"geopeft:{name}", {})
        dialog.show()
        settle()
        dialog.setParameters({"LABELS": labels.id(), "INPUT": [scene.id()] if name == "train"
                              else scene.id()})
        settle()
        chosen = dialog.mainWidget().createProcessingParameters()
        polygons = QgsVectorLayer(str(data / "labels.gpkg"), "label polygons", "ogr")
        QgsProject.instance().addMapLayer(polygons)
        dialog.setParameters({"LABELS": None, "LABEL_POLYGONS": polygons.id(),
                              "LABEL_FIELD": "class_id"})
        settle()
        with_polygons = dialog.mainWidget().createProcessingParameters()
        QgsProject.instance().removeMapLayer(polygons.id())
        settle()
        print(json.dumps({"algorithm": name,
                          "labels": str(chosen.get("LABELS")),
                          "polygons": str(with_polygons.get("LABEL_POLYGONS")),
                          "field": str(with_polygons.get("LABEL_FIELD"))}), flush=True)
        dialog.close()
        settle()
    print("ALIVE", flush=True)
    QgsApplication.processingRegistry().removeProvider(provider)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
