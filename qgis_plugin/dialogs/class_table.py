"""The Train dialog's classes: value, name and colour of each class (passed as --classes).

For a class raster the analyst names and colours the classes here; the table starts from the
raster's palette or category names, else from "class <value>" and a colour that fits the name
(renaming a class "water" turns an automatic colour blue). Polygon labels show their classes
read-only (names come from the field or the layer's categorized style).
"""
from __future__ import annotations

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (QAbstractItemView, QColorDialog, QHeaderView, QTableWidget,
                                 QTableWidgetItem)

from ..styling import colour_for_name

AUTO_COLOUR = Qt.ItemDataRole.UserRole  # on the value item: the colour follows the name


class ClassTable(QTableWidget):
    def __init__(self, parent=None):
        super().__init__(0, 3, parent)
        self.setHorizontalHeaderLabels(["Value", "Name", "Colour"])
        self.verticalHeader().setVisible(False)
        self.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = self.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.verticalHeader().setDefaultSectionSize(24)
        self.setMinimumHeight(90)
        self.setMaximumHeight(150)
        self.editable = True
        self.itemChanged.connect(self._name_changed)
        self.cellDoubleClicked.connect(self._pick_colour)

    def set_classes(self, classes: list[dict], editable: bool = True, keep: bool = False) -> None:
        """Fill the table; with ``keep``, names and colours already in the table are kept for the
        same values. A class with ``"from_layer": False`` gets a colour that follows its name."""
        keep = keep and self.editable and editable
        edited = {c["value"]: c for c in self.classes()} if keep else {}
        auto_before = self._auto_by_value
        self.editable = editable
        self.blockSignals(True)
        self.setRowCount(len(classes))
        for row, c in enumerate(classes):
            kept = edited.get(c["value"])
            auto = not c.get("from_layer", True)
            if kept is not None:
                auto = auto and auto_before.get(c["value"], True)
                c = {**c, "name": kept["name"], "colour": kept["colour"]}
            value = QTableWidgetItem(str(c["value"]))
            value.setFlags(Qt.ItemFlag.ItemIsEnabled)
            value.setData(AUTO_COLOUR, auto)
            self.setItem(row, 0, value)
            name = QTableWidgetItem(str(c["name"]))
            flags = Qt.ItemFlag.ItemIsEnabled
            if editable:
                flags |= Qt.ItemFlag.ItemIsEditable
            name.setFlags(flags)
            self.setItem(row, 1, name)
            colour = QTableWidgetItem()
            colour.setFlags(Qt.ItemFlag.ItemIsEnabled)
            colour.setToolTip("Double-click to choose another colour" if editable else "")
            self.setItem(row, 2, colour)
            self._show_colour(row, c["colour"])
        self.blockSignals(False)

    @property
    def _auto_by_value(self) -> dict[int, bool]:
        return {int(self.item(r, 0).text()): bool(self.item(r, 0).data(AUTO_COLOUR))
                for r in range(self.rowCount())}

    def classes(self) -> list[dict]:
        return [{"value": int(self.item(r, 0).text()),
                 "name": self.item(r, 1).text().strip() or f"class {self.item(r, 0).text()}",
                 "colour": self.item(r, 2).text()} for r in range(self.rowCount())]

    def set_name(self, value: int, name: str) -> None:
        for r in range(self.rowCount()):
            if int(self.item(r, 0).text()) == value:
                self.item(r, 1).setText(name)

    def set_colour(self, value: int, colour: str) -> None:
        """The analyst's colour for class ``value``: it stays when the class is renamed."""
        for r in range(self.rowCount()):
            if int(self.item(r, 0).text()) == value:
                self.item(r, 0).setData(AUTO_COLOUR, False)
                self._show_colour(r, colour)

    def _show_colour(self, row: int, colour: str) -> None:
        item = self.item(row, 2)
        blocked = self.blockSignals(True)
        item.setText(QColor(colour).name())
        item.setData(Qt.ItemDataRole.DecorationRole, QColor(colour))
        self.blockSignals(blocked)

    def _name_changed(self, item: QTableWidgetItem) -> None:
        if item.column() == 1 and self.item(item.row(), 0).data(AUTO_COLOUR):
            self._show_colour(item.row(), colour_for_name(item.text(), item.row()))

    def _pick_colour(self, row: int, column: int) -> None:
        if column != 2 or not self.editable:
            return
        colour = QColorDialog.getColor(QColor(self.item(row, 2).text()), self, "Class colour")
        if colour.isValid():
            self.set_colour(int(self.item(row, 0).text()), colour.name())
