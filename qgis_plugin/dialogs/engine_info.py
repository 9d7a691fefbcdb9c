"""Ask the engine which models exist and which bands each was pretrained on (``engine models``),
in a QgsTask: it takes about a second, too long for the UI thread. Answers are cached."""
from __future__ import annotations

from typing import Callable

from qgis.core import QgsApplication, QgsTask

from .. import settings
from ..core.bands import ModelsInfo, cached_models_info, fetch_models_info
from ..core.engine_client import EngineError

_RUNNING: list = []  # Python wrappers of running tasks must outlive the call


class ModelsInfoTask(QgsTask):
    def __init__(self, python: str | None, on_done: Callable[[ModelsInfo | None, str], None]):
        super().__init__("GeoPEFT: list the foundation models")
        self.python = python
        self.on_done = on_done
        self.info: ModelsInfo | None = None
        self.error = ""
        self.run_options = {"log_dir": settings.engine_log_dir(),  # QgsSettings: UI thread
                            "watchdog_s": settings.watchdog_seconds()}

    def run(self) -> bool:  # worker thread
        try:
            self.info = fetch_models_info(self.python, **self.run_options)
        except EngineError as exc:
            self.error = exc.message.split("\n")[0]
        except Exception as exc:  # noqa: BLE001 - a worker thread must never raise into QGIS
            self.error = f"the engine could not be asked: {exc}"
        return self.info is not None

    def finished(self, ok: bool) -> None:  # UI thread
        if self in _RUNNING:
            _RUNNING.remove(self)
        try:
            self.on_done(self.info, self.error or ("" if ok else "the engine did not answer"))
        except RuntimeError:  # the dialog was closed and deleted meanwhile
            pass


def request_models_info(on_done: Callable[[ModelsInfo | None, str], None]) -> ModelsInfoTask | None:
    """Call ``on_done(info, error)`` on the UI thread: at once when cached, else after a task."""
    python = settings.engine_python()
    cached = cached_models_info(python)
    if cached is not None:
        on_done(cached, "")
        return None
    task = ModelsInfoTask(python, on_done)
    _RUNNING.append(task)
    QgsApplication.taskManager().addTask(task)
    return task
