"""Run the Qt-free engine client in a QgsTask; report back to the UI through signals."""
from __future__ import annotations

import shutil
import traceback

from qgis.core import Qgis, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .. import settings
from ..core.engine_client import EngineError, EngineResult, run_engine

LOG_TAG = "GeoPEFT"


def log(message: str, level=Qgis.MessageLevel.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


class EngineTask(QgsTask):
    """One engine command in the background (task manager: progress bar, cancel button).

    ``after(result, task)`` runs on the worker thread too when the engine succeeded (e.g.
    polygonising); its return value is kept in ``after_result``. ``before(task)`` runs on the
    worker thread before the engine starts (e.g. writing a layer's features to the file named in
    ``args``; an EngineError it raises is the task's error, a cancel during it skips the engine);
    ``cleanup()`` runs on the worker thread at the very end, whatever happened (e.g. deleting
    that file). Folders in ``temp_dirs`` (e.g. made by ``before``) are deleted at the end too,
    whatever happened; both also when the task is cancelled before it ever ran. Signals arrive
    on the UI thread. The engine's log goes to the profile's geopeft/logs (``log_path`` once it
    started); an engine silent for ``settings.watchdog_seconds()`` is killed.
    """

    engineEvent = pyqtSignal(object)  # each protocol event (dict); not "event": QObject.event()
    logLine = pyqtSignal(str)  # the engine's stderr, line by line
    ended = pyqtSignal(object)  # this task, when finished (ok, cancelled or failed)

    def __init__(self, description: str, python: str | None, args: list[str], progress=None,
                 after=None, before=None, cleanup=None):
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.python = python
        self.args = args
        self.progress = progress  # event -> percent or None
        self.after = after
        self.before = before
        self.cleanup = cleanup
        self.temp_dirs: list[str] = []
        self.result: EngineResult | None = None
        self.after_result = None
        self.error: EngineError | None = None
        self.log_dir = settings.engine_log_dir()  # read here: QgsSettings on the UI thread
        self.watchdog_s = settings.watchdog_seconds()
        self._ran = False
        self._cleaned = False

    @property
    def log_path(self) -> str | None:
        """The log file of the engine run (None before it started, or if none was written)."""
        if self.result is not None:
            return self.result.log_path
        return self.error.log_path if self.error is not None else None

    @property
    def cancelled(self) -> bool:
        return self.isCanceled() or bool(self.result and self.result.cancelled)

    def _on_event(self, event: dict) -> None:
        if self.progress is not None:
            percent = self.progress(event)
            if percent is not None:
                self.setProgress(percent)
        self.engineEvent.emit(event)

    def run(self) -> bool:  # worker thread
        self._ran = True
        try:
            return self._run()
        finally:
            self._clean_up()

    def _clean_up(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self.cleanup is not None:
            try:
                self.cleanup()
            except Exception as exc:  # noqa: BLE001 - a leftover temporary file, not a failure
                self.logLine.emit(f"Cleanup failed: {exc}")
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self) -> bool:
        try:
            if self.before is not None:
                self.before(self)
                if self.isCanceled():
                    return True
            self.result = run_engine(self.python, self.args, on_event=self._on_event,
                                     is_cancelled=self.isCanceled, on_stderr=self.logLine.emit,
                                     log_dir=self.log_dir, watchdog_s=self.watchdog_s)
            if self.after is not None and not self.result.cancelled:
                self.after_result = self.after(self.result, self)
            return True
        except EngineError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - shown to the user, never crashes QGIS
            self.error = EngineError(f"Unexpected error: {exc}", details=traceback.format_exc())
        return False

    def finished(self, ok: bool) -> None:  # UI thread
        if not self._ran:  # cancelled while queued: nothing big to remove, but remove it
            self._clean_up()
        if self.error is None and not ok and not self.isCanceled():
            self.error = EngineError("The task failed.")
        self.ended.emit(self)
