"""The plugin object QGIS loads: Processing provider, toolbar, menu, dialogs."""
from __future__ import annotations

from qgis.core import QgsApplication
from qgis.PyQt.QtWidgets import QAction

from .icons import icon

MENU = "&GeoPEFT"


class GeoPEFTPlugin:
    def __init__(self, iface):
        self.iface = iface  # None under qgis_process: only initProcessing() is called then
        self.provider = None
        self.actions: list[QAction] = []
        self.toolbar = None
        self.dialogs: dict[str, object] = {}

    # qgis_process (3.22) and the desktop both call this
    def initProcessing(self):  # noqa: N802 - QGIS API
        if self.provider is None:
            from .processing.provider import GeoPEFTProvider
            self.provider = GeoPEFTProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802 - QGIS API
        self.initProcessing()
        self.toolbar = self.iface.addToolBar("GeoPEFT")
        self.toolbar.setObjectName("GeoPEFTToolbar")
        for name, text, icon_name, slot in (
                ("train", "Train segmentation model…", "train.svg", self.show_train),
                ("predict", "Predict classes…", "predict.svg", self.show_predict),
                ("setup", "Set up engine…", "setup.svg", self.show_setup)):
            action = QAction(icon(icon_name), text, self.iface.mainWindow())
            action.setObjectName(f"geopeft_{name}")
            action.triggered.connect(slot)
            if name != "setup":
                self.toolbar.addAction(action)
            self.iface.addPluginToMenu(MENU, action)
            self.actions.append(action)

    def unload(self):
        for action in self.actions:
            if hasattr(self.iface, "removePluginMenu"):  # absent from test stubs
                self.iface.removePluginMenu(MENU, action)
            if self.toolbar is not None:
                self.toolbar.removeAction(action)
        self.actions = []
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        for dialog in self.dialogs.values():
            dialog.close()
        self.dialogs = {}
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def _show(self, name: str, factory):
        dialog = self.dialogs.get(name)
        if dialog is None:
            dialog = factory(self.iface, self.iface.mainWindow())
            self.dialogs[name] = dialog
        dialog.show()
        dialog.raise_()
        dialog.activateWindow()
        return dialog

    def show_train(self):
        from .dialogs.train_dialog import TrainDialog
        return self._show("train", TrainDialog)

    def show_predict(self):
        from .dialogs.predict_dialog import PredictDialog
        return self._show("predict", PredictDialog)

    def show_setup(self):
        from .dialogs.setup_dialog import SetupDialog
        return self._show("setup", SetupDialog)
