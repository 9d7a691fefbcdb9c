"""What every GeoPEFT algorithm shares: running the engine with Processing's feedback."""
from __future__ import annotations

import functools
import shutil
import threading

from qgis.core import QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingFeedback
from qgis.PyQt.QtCore import QCoreApplication

from .. import settings
from ..core.engine_client import EngineError, EngineResult, run_engine
from ..icons import icon
from ..layers import LayerError, layer_path as _layer_path

# progress range (percent) of each engine stage, per command
STAGES = {
    "train": {"prepare": (0, 5), "train": (5, 99), "validate": (5, 99)},
    "predict": {"prepare": (0, 5), "predict": (5, 95), "uncertain_areas": (95, 95), "polygons": (95, 100)},
    "export": {"prepare": (0, 10), "export": (10, 100)},
    "evaluate": {"prepare": (0, 10), "evaluate": (10, 100)},
    "embed": {"prepare": (0, 5), "embed": (5, 100)},
}


# the temporary folders made during the processAlgorithm running on this thread (layer copies)
_RUN = threading.local()


def tr(text: str) -> str:
    return QCoreApplication.translate("GeoPEFT", text)


def describe_event(event: dict) -> str | None:
    """One human line for the Processing log (None for events not worth a line)."""
    kind = event["event"]
    if kind == "metric":
        epoch = f" (epoch {event['epoch']})" if event.get("epoch") is not None else ""
        value = event.get("value")
        value = f"{value:.4f}" if isinstance(value, float) else value
        return f"{event.get('stage', '')} {event['name']} = {value}{epoch}".strip()
    if kind == "artifact":
        return f"Wrote {event.get('kind')}: {event.get('path')}"
    if kind == "warning":
        return f"Warning: {event.get('message')}"
    if kind == "start":
        return f"GeoPEFT engine {event.get('engine_version', '')}: {event.get('command', '')}"
    if kind == "progress" and event.get("message") and event.get("stage") in ("prepare", "polygons"):
        return event["message"]
    return None


class ProgressMapper:
    """Engine progress events -> one 0..100 percentage."""

    def __init__(self, command: str):
        self.ranges = STAGES.get(command, {})

    def percent(self, event: dict) -> float | None:
        if event.get("event") != "progress":
            return None
        low, high = self.ranges.get(event.get("stage"), (0, 100))
        total = event.get("total")
        fraction = event.get("fraction")  # train: max(steps done, time budget used)
        if not isinstance(fraction, (int, float)):
            if not total:
                return float(low)
            fraction = float(event.get("step", 0)) / float(total)
        return low + (high - low) * min(max(float(fraction), 0.0), 1.0)


class EngineAlgorithm(QgsProcessingAlgorithm):
    """Base of the GeoPEFT algorithms: ``run_engine_command`` bridges engine <-> feedback."""

    command = ""  # engine command name

    def __init_subclass__(cls, **kwargs):
        """Each algorithm's processAlgorithm removes the temporary layer copies it made (see
        :func:`layer_path`) when it ends: success, failure or cancel."""
        super().__init_subclass__(**kwargs)
        process = cls.__dict__.get("processAlgorithm")
        if process is None or getattr(process, "_removes_temporaries", False):
            return

        @functools.wraps(process)
        def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS API
            outer = getattr(_RUN, "temp_dirs", None)
            _RUN.temp_dirs = []
            try:
                return process(self, parameters, context, feedback)
            finally:
                for folder in _RUN.temp_dirs:
                    shutil.rmtree(folder, ignore_errors=True)
                _RUN.temp_dirs = outer
        processAlgorithm._removes_temporaries = True
        cls.processAlgorithm = processAlgorithm

    def group(self) -> str:
        return tr("Segmentation")

    def groupId(self) -> str:
        return "segmentation"

    def icon(self):
        return icon("geopeft.svg")

    def tr(self, text: str) -> str:
        return tr(text)

    def createInstance(self):
        return type(self)()

    def run_engine_command(self, args: list[str], feedback: QgsProcessingFeedback) -> EngineResult:
        """Run ``<python> -m engine <args>``: progress, log lines, cancel; errors raise
        ``QgsProcessingException`` with one readable message."""
        feedback = feedback or QgsProcessingFeedback()
        mapper = ProgressMapper(args[0])
        python = settings.engine_python()

        def on_event(event: dict) -> None:
            percent = mapper.percent(event)
            if percent is not None:
                feedback.setProgress(percent)
                if event.get("stage") == "train" and event.get("total"):
                    loss = event.get("loss")
                    feedback.setProgressText(
                        f"epoch {event.get('epoch', '?')} · step {event['step']}/{event['total']}"
                        + (f" · loss {loss:.4f}" if isinstance(loss, float) else ""))
            line = describe_event(event)
            if line:
                feedback.pushInfo(line)
            if event["event"] == "error":
                feedback.reportError(event.get("message", ""), fatalError=False)

        feedback.pushCommandInfo(" ".join(["<engine python> -m engine"] + args))
        try:
            result = run_engine(python, args, on_event=on_event, is_cancelled=feedback.isCanceled,
                                on_stderr=feedback.pushDebugInfo,
                                log_dir=settings.engine_log_dir(),
                                watchdog_s=settings.watchdog_seconds())
        except EngineError as exc:
            if exc.details:
                feedback.pushDebugInfo(exc.details)
            raise QgsProcessingException(exc.message) from None
        if result.log_path:
            feedback.pushDebugInfo(self.tr("Engine log: {}").format(result.log_path))
        if result.cancelled:
            feedback.pushInfo(self.tr("Cancelled: the engine stopped cleanly."))
        return result


def layer_path(layer, feedback=None) -> str | None:
    """A file the engine can read for ``layer`` (QgsProcessingException if it cannot be made).
    A temporary copy is removed when the running processAlgorithm ends."""
    try:
        return _layer_path(layer, feedback.pushInfo if feedback else None,
                           getattr(_RUN, "temp_dirs", None))
    except LayerError as exc:
        raise QgsProcessingException(str(exc)) from None

