"""A small live chart of training: loss and validation mIoU per epoch, drawn as events arrive.

Drawn with QPainter (no plotting library in QGIS's Python): loss on the left axis (scaled to the
largest loss so far), mIoU on the right axis (0 to 1).
"""
from __future__ import annotations

import math

from qgis.PyQt.QtCore import QPointF, QRectF, Qt
from qgis.PyQt.QtGui import QColor, QFont, QPainter, QPen, QPolygonF
from qgis.PyQt.QtWidgets import QSizePolicy, QWidget

# metric name -> (legend, colour, axis)
SERIES = {
    "train_loss": ("training loss", "#1f77b4", "loss"),
    "val_loss": ("validation loss", "#ff7f0e", "loss"),
    "val_miou": ("validation mIoU", "#2ca02c", "miou"),
}


class TrainingChart(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.points: dict[str, dict[int, float]] = {name: {} for name in SERIES}
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Loss (left axis) and validation mIoU (right axis, 0-1) per epoch.")

    def clear(self) -> None:
        self.points = {name: {} for name in SERIES}
        self.update()

    def add(self, name: str, epoch: int, value: float) -> None:
        if name in self.points and isinstance(value, (int, float)) and math.isfinite(value):
            self.points[name][int(epoch)] = float(value)
            self.update()

    def on_event(self, event: dict) -> bool:
        """Takes an engine ``metric`` event of training; True when it was one the chart shows."""
        if event.get("event") != "metric" or event.get("epoch") is None or event.get("name") not in SERIES:
            return False
        self.add(event["name"], event["epoch"], event.get("value"))
        return True

    @property
    def epochs(self) -> int:
        return max((max(p) for p in self.points.values() if p), default=0)

    def paintEvent(self, _event):  # noqa: N802 - Qt API
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            painter.end()

    def _paint(self, painter: QPainter) -> None:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QColor("white"))
        font = QFont(painter.font())
        font.setPointSizeF(max(font.pointSizeF() - 1, 7))
        painter.setFont(font)
        metrics = painter.fontMetrics()
        h_text = metrics.height()
        left, right, top, bottom = 8 + metrics.horizontalAdvance("0.000"), 8 + metrics.horizontalAdvance("1.0"), \
            h_text + 6, 2 * h_text + 4
        plot = QRectF(left, top, max(self.width() - left - right, 10), max(self.height() - top - bottom, 10))
        painter.setPen(QPen(QColor("#c8c8c8"), 1))
        painter.drawRect(plot)
        epochs = max(self.epochs, 1)
        losses = [v for name, (_, _, axis) in SERIES.items() if axis == "loss" for v in self.points[name].values()]
        loss_max = max(losses, default=1.0) or 1.0

        def x_of(epoch: int) -> float:
            return plot.left() + (epoch - 1) / max(epochs - 1, 1) * plot.width() if epochs > 1 else plot.center().x()

        def y_of(value: float, axis: str) -> float:
            scale = loss_max if axis == "loss" else 1.0
            return plot.bottom() - max(min(value / scale, 1.0), 0.0) * plot.height()

        # axes' labels: loss on the left, mIoU on the right, epochs below
        painter.setPen(QColor("#505050"))
        for frac in (0.0, 0.5, 1.0):
            y = plot.bottom() - frac * plot.height()
            painter.drawText(QRectF(0, y - h_text / 2, left - 4, h_text),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{frac * loss_max:.3g}")
            painter.drawText(QRectF(plot.right() + 4, y - h_text / 2, right - 4, h_text),
                             int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), f"{frac:.1f}")
        painter.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), h_text),
                         int(Qt.AlignmentFlag.AlignCenter),
                         f"epoch (1–{self.epochs})" if self.epochs else "epochs appear here as training runs")
        # the series, and the legend above the plot
        x_legend = plot.left()
        for name, (label, colour, axis) in SERIES.items():
            points = self.points[name]
            pen = QPen(QColor(colour), 2)
            painter.setPen(pen)
            if points:
                polygon = QPolygonF([QPointF(x_of(e), y_of(points[e], axis)) for e in sorted(points)])
                painter.drawPolyline(polygon)
                if len(points) == 1:
                    painter.drawEllipse(polygon[0], 2.5, 2.5)
            last = points[max(points)] if points else None
            text = f"{label}" + (f" {last:.3f}" if last is not None else "")
            painter.drawLine(QPointF(x_legend, 4 + h_text / 2), QPointF(x_legend + 14, 4 + h_text / 2))
            painter.setPen(QColor("#303030"))
            painter.drawText(QPointF(x_legend + 18, 2 + h_text - metrics.descent()), text)
            x_legend += 30 + metrics.horizontalAdvance(text)


def time_left(event: dict) -> str | None:
    """'about 3 min left' from a training progress event (elapsed time and fraction done)."""
    fraction, elapsed = event.get("fraction"), event.get("elapsed_s")
    if not isinstance(fraction, (int, float)) or not isinstance(elapsed, (int, float)) or not 0.02 <= fraction < 1:
        return None
    seconds = elapsed * (1 - fraction) / fraction
    if seconds < 60:
        return f"about {max(5, round(seconds / 5) * 5):.0f} s left"
    if seconds < 3600:
        return f"about {round(seconds / 60):.0f} min left"
    return f"about {seconds / 3600:.1f} h left"
