"""What the dialogs tell the analyst: the full text of problems and errors (never cut to the two
lines a message bar shows), and the engine's log of the latest run, one click away."""
from __future__ import annotations

from qgis.core import Qgis
from qgis.PyQt.QtGui import QFont
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .task import log


class MessagePanel(QWidget):
    """A read-only, selectable text box (hidden while empty) with the whole latest message, and
    an "Engine log…" button showing everything the engine printed in the latest run."""

    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setMaximumHeight(96)
        self.text.setVisible(False)
        self.log_lines: list[str] = []
        self.log_view: QDialog | None = None
        self.log_button = QPushButton("Engine log…")
        self.log_button.setToolTip("Everything the engine printed in the latest run "
                                   "(also in the Log Messages panel, tab GeoPEFT)")
        self.log_button.clicked.connect(self.open_log)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.text)

    def show_text(self, text: str) -> None:
        self.text.setPlainText(text)
        self.text.setVisible(bool(text))

    def clear(self) -> None:
        self.show_text("")

    # -- the engine log of the latest run ------------------------------------------------------
    def start_log(self, command: str) -> None:
        self.log_lines = ["$ " + command]
        if self.log_view is not None:
            self.log_view.findChild(QPlainTextEdit).setPlainText(self.log_lines[0])

    def add_log(self, line: str) -> None:
        self.log_lines.append(line)
        log(line)
        if self.log_view is not None:
            self.log_view.findChild(QPlainTextEdit).appendPlainText(line)

    def open_log(self) -> QDialog:
        if self.log_view is None:
            self.log_view = QDialog(self.window())
            self.log_view.setWindowTitle("GeoPEFT — engine log of the latest run")
            view = QPlainTextEdit()
            view.setReadOnly(True)
            view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
            view.setFont(QFont("monospace"))
            buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
            buttons.rejected.connect(self.log_view.close)
            panel = QPushButton("QGIS log panel")
            panel.clicked.connect(self._open_qgis_log)
            panel.setEnabled(self.iface is not None)
            row = QHBoxLayout()
            row.addWidget(panel)
            row.addStretch(1)
            row.addWidget(buttons)
            layout = QVBoxLayout(self.log_view)
            layout.addWidget(view)
            layout.addLayout(row)
            self.log_view.resize(760, 420)
        self.log_view.findChild(QPlainTextEdit).setPlainText(
            "\n".join(self.log_lines) or "No engine run yet.")
        self.log_view.show()
        self.log_view.raise_()
        return self.log_view

    def _open_qgis_log(self) -> None:
        if self.iface is not None:
            self.iface.openMessageLog()


def show_problems(bar, panel: MessagePanel, title: str, problems: list[str]) -> None:
    """Validation problems: a short notice in the dialog's bar, each problem in full below."""
    bar.clearWidgets()
    if not problems:
        panel.clear()
        return
    first = problems[0] + (f" (and {len(problems) - 1} more below)" if len(problems) > 1 else "")
    bar.pushMessage(title, first, Qgis.MessageLevel.Warning, 0)
    panel.show_text("\n".join("• " + p for p in problems))


def show_error(iface, bar, panel: MessagePanel, error) -> None:
    """An engine error: its first line in the dialog's and QGIS's message bars, with the whole
    text behind "more" there and in full in the dialog's panel and the log."""
    full = error.message + ("\n\n" + error.details if error.details and error.details not in
                            error.message else "")
    log(full, Qgis.MessageLevel.Critical)
    first = error.message.split("\n")[0]
    bar.clearWidgets()
    bar.pushMessage("GeoPEFT", first, full, Qgis.MessageLevel.Critical, 0)
    panel.show_text(full)
    if iface is not None:
        iface.messageBar().pushMessage("GeoPEFT", first, full, Qgis.MessageLevel.Critical, 0)
