"""The Train dialog's bands: tick the bands to use, see which pretrained band of the chosen model
each one matches by name, and name or assign them (passed to the engine as --band-names; the
model card then records them and the matched/fresh bands)."""
from __future__ import annotations

from dataclasses import dataclass

from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QStyledItemDelegate,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.bands import ModelsInfo, fallback_band_name

NUMBER = Qt.ItemDataRole.UserRole
MATCHED = QColor("#1a7f37")
FRESH = QColor("#8a8a8a")


@dataclass(frozen=True)
class Band:
    number: int  # 1-based, in the stack of the ticked rasters
    layer: str  # layer name
    description: str  # the file's band description ('' when unnamed)


class NameDelegate(QStyledItemDelegate):
    """Edits a band name with an editable list of the model's pretrained bands."""

    def __init__(self, choices, parent=None):
        super().__init__(parent)
        self.choices = choices  # callable: the current pretrained bands

    def createEditor(self, parent, option, index):  # noqa: N802 - Qt API
        combo = QComboBox(parent)
        combo.setEditable(True)
        combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        combo.addItems(self.choices())
        return combo

    def setEditorData(self, editor, index):  # noqa: N802
        editor.setCurrentText(index.data() or "")

    def setModelData(self, editor, model, index):  # noqa: N802
        model.setData(index, editor.currentText().strip())


class BandTable(QWidget):
    changed = pyqtSignal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.model = ""
        self.info: ModelsInfo | None = None
        self.info_error = ""
        self.bands: list[Band] = []
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Band", "Name", "Pretrained band"])
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setDefaultSectionSize(24)
        self.table.setMinimumHeight(240)
        self.table.setItemDelegateForColumn(1, NameDelegate(self._choices, self.table))
        self.table.setToolTip("Tick the bands fed to the model. Double-click a name to name the "
                              "band like the model's pretrained band (or pick one from the list) "
                              "so that it starts from the pretrained weights; others start fresh.")
        self.table.itemChanged.connect(lambda *_: self._refresh())
        self.only_matching = QPushButton("Tick matching bands only")
        self.only_matching.setToolTip("Use only the bands that match a pretrained band by name")
        self.only_matching.clicked.connect(self.tick_matching)
        row = QHBoxLayout()
        row.addWidget(self.summary, 1)
        row.addWidget(self.only_matching)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.table)

    # -- content -------------------------------------------------------------------------------
    def set_bands(self, bands: list[Band], show_layer: bool = False) -> None:
        """New bands; ticks and names the analyst changed are kept by band number."""
        ticked = {b.number: self.is_ticked(b.number) for b in self.bands}
        named = {b.number: self.name(b.number) for b in self.bands}
        described = {b.number: b.description for b in self.bands}
        self.bands = list(bands)
        self.table.blockSignals(True)
        self.table.setRowCount(len(bands))
        for row, band in enumerate(bands):
            text = f"{band.number}" + (f" · {band.layer}" if show_layer else "")
            item = QTableWidgetItem(text)
            item.setData(NUMBER, band.number)
            item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if ticked.get(band.number, True)
                               else Qt.CheckState.Unchecked)
            item.setToolTip(f"Band {band.number} of the stack, from layer {band.layer}")
            self.table.setItem(row, 0, item)
            kept = named.get(band.number)
            changed_by_analyst = kept is not None and kept != described.get(band.number)
            name = QTableWidgetItem(kept if changed_by_analyst else band.description)
            name.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsEditable)
            name.setToolTip(f"Band description in the file: {band.description or '(none)'}; "
                            f"unnamed bands are passed as {fallback_band_name(band.number)}")
            self.table.setItem(row, 1, name)
            match = QTableWidgetItem("")
            match.setFlags(Qt.ItemFlag.ItemIsEnabled)
            self.table.setItem(row, 2, match)
        self.table.blockSignals(False)
        self._refresh()

    def set_model(self, model: str, info: ModelsInfo | None = None, error: str = "") -> None:
        self.model = model
        if info is not None or error:
            self.info, self.info_error = info, error
        self._refresh()

    def _choices(self) -> list[str]:
        return list(self.info.bands.get(self.model, [])) if self.info else []

    # -- reading -------------------------------------------------------------------------------
    def _row(self, number: int) -> int:
        return [b.number for b in self.bands].index(number)

    def is_ticked(self, number: int) -> bool:
        return self.table.item(self._row(number), 0).checkState() == Qt.CheckState.Checked

    def name(self, number: int) -> str:
        return self.table.item(self._row(number), 1).text().strip()

    def set_name(self, number: int, name: str) -> None:
        self.table.item(self._row(number), 1).setText(name)

    def ticked(self) -> list[int]:
        return [b.number for b in self.bands if self.is_ticked(b.number)]

    def set_ticked(self, numbers) -> None:
        self.table.blockSignals(True)
        for row, band in enumerate(self.bands):
            self.table.item(row, 0).setCheckState(Qt.CheckState.Checked if band.number in numbers
                                                  else Qt.CheckState.Unchecked)
        self.table.blockSignals(False)
        self._refresh()

    def ticked_names(self) -> list[str]:
        """Names of the ticked bands for --band-names (unnamed bands: band_<n>)."""
        return [self.name(n) or fallback_band_name(n) for n in self.ticked()]

    def names_changed(self) -> bool:
        """Whether any ticked band's name differs from its file's description."""
        return any(self.name(b.number) != b.description for b in self.bands
                   if self.is_ticked(b.number))

    def matches(self) -> list[str | None]:
        """The pretrained band each row's name matches (None: fresh weights or unknown)."""
        if self.info is None:
            return [None] * len(self.bands)
        return self.info.pretrained_matches(self.model, [self.name(b.number) for b in self.bands])

    def tick_matching(self) -> None:
        self.set_ticked([b.number for b, m in zip(self.bands, self.matches()) if m])

    # -- display -------------------------------------------------------------------------------
    def _refresh(self) -> None:
        matches = self.matches()
        self.table.blockSignals(True)
        for row, match in enumerate(matches):
            item = self.table.item(row, 2)
            if self.info is None:
                item.setText("?")
            elif match:
                item.setText(f"✓ {match}")
                item.setForeground(MATCHED)
            else:
                item.setText("new (fresh weights)")
                item.setForeground(FRESH)
        self.table.blockSignals(False)
        self.only_matching.setEnabled(any(matches))
        self.summary.setText(self.describe(matches))
        self.changed.emit()

    def describe(self, matches: list[str | None]) -> str:
        if self.info is None:
            return (f"Pretrained bands unknown: {self.info_error}" if self.info_error else
                    "Asking the engine which bands the model was pretrained on…")
        pretrained = self.info.bands.get(self.model, [])
        ticked = [m for b, m in zip(self.bands, matches) if self.is_ticked(b.number)]
        used = {m for m in ticked if m}
        text = (f"{self.model} was pretrained on {', '.join(pretrained)}. "
                f"{len([m for m in ticked if m])} of the {len(ticked)} ticked bands match by name")
        missing = [b for b in pretrained if b not in used]
        if missing:
            text += f"; no band for {', '.join(missing)}"
        return text + "."
