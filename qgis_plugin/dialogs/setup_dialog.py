"""Set up engine: choose the engine's Python, check it, or create a venv and install the engine."""
from __future__ import annotations

from qgis.core import Qgis, QgsApplication, QgsTask
from qgis.gui import QgsFileWidget, QgsMessageBar
from qgis.PyQt.QtCore import QSize, pyqtSignal
from qgis.PyQt.QtGui import QFont
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
)

from .. import settings
from ..core.engine_client import EngineError, engine_version, venv_python
from ..core.settings import setup_venv_dir
from ..core.setup_engine import SetupError, run_steps, setup_steps
from ..icons import icon
from .task import log

_RUNNING: list = []  # Python wrappers of running check tasks must outlive the dialog's call


class SetupTask(QgsTask):
    line = pyqtSignal(str)
    step = pyqtSignal(int, str)
    ended = pyqtSignal(object)

    def __init__(self, steps):
        super().__init__("GeoPEFT: setting up the engine", QgsTask.Flag.CanCancel)
        self.steps = steps
        self.error: str | None = None
        self.ok = False

    def run(self) -> bool:
        def on_step(index, step):
            self.setProgress(100.0 * index / len(self.steps))
            self.step.emit(index, step.label)
        try:
            self.ok = run_steps(self.steps, on_step=on_step, on_line=self.line.emit,
                                is_cancelled=self.isCanceled)
        except SetupError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown, never raised into QGIS
            self.error = f"Unexpected error: {exc}"
        return self.ok

    def finished(self, ok):
        self.ended.emit(self)


class VersionCheckTask(QgsTask):
    """``engine_version`` (starts the engine's Python: a second or more) off the UI thread."""

    ended = pyqtSignal(object)

    def __init__(self, python: str):
        super().__init__("GeoPEFT: checking the engine", QgsTask.Flag.CanCancel)
        self.python = python
        self.version: str | None = None
        self.error: str = ""

    def run(self) -> bool:  # worker thread
        try:
            self.version = engine_version(self.python, is_cancelled=self.isCanceled)
        except EngineError as exc:
            self.error = exc.message.split("\n")[0]
        except Exception as exc:  # noqa: BLE001 - shown, never raised into QGIS
            self.error = f"The engine could not be checked: {exc}"
        return self.version is not None

    def finished(self, ok: bool) -> None:  # UI thread
        self.ended.emit(self)


class SetupDialog(QDialog):
    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.task: SetupTask | None = None
        self.check_task: VersionCheckTask | None = None  # the latest engine check, while it runs
        self.engine_ok: bool | None = None  # the latest check's answer (None: not known yet)
        self._save_when_checked = False
        self.setWindowTitle("GeoPEFT — Engine set-up")
        self.setWindowIcon(icon("setup.svg"))
        self.bar = QgsMessageBar(self)
        self.bar.setSizePolicy(QSizePolicy.Policy.Minimum, QSizePolicy.Policy.Fixed)

        current = QGroupBox("Engine Python")
        form = QFormLayout(current)
        self.python = QgsFileWidget()
        self.python.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.python.setFilePath(settings.engine_python() or "")
        self.python.setToolTip("The Python interpreter of the environment where the GeoPEFT "
                               "engine is installed (e.g. <repo>/.venv/bin/python after "
                               "`make install`). QGIS's own Python is never used for the engine.")
        form.addRow("Interpreter", self.python)
        self.state = QLabel("")
        self.state.setWordWrap(True)
        form.addRow("Status", self.state)
        self.check_button = QPushButton("Check and save")
        self.check_button.clicked.connect(self.check)
        form.addRow("", self.check_button)

        create = QGroupBox("Create a new engine environment")
        cform = QFormLayout(create)
        self.venv = QgsFileWidget()
        self.venv.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.venv.setFilePath(str(setup_venv_dir(settings.profile_dir())))
        cform.addRow("Folder", self.venv)
        note = QLabel("Creates a separate Python environment and installs the engine with its "
                      "dependencies (PyTorch's CPU build, GDAL inside rasterio, ONNX Runtime: about "
                      "1.5 GB on disk) from PyPI. QGIS's Python is untouched.")
        note.setWordWrap(True)
        cform.addRow(note)
        self.gpu = QCheckBox("For an NVIDIA GPU (CUDA builds: Linux, Windows; several GB more)")
        self.gpu.setToolTip("Installs onnxruntime-gpu and PyPI's PyTorch, which on Linux brings "
                            "the CUDA libraries (on Windows set GEOPEFT_TORCH_INDEX_URL to a "
                            "CUDA index of PyTorch's). Without it everything runs on the CPU.")
        cform.addRow(self.gpu)
        self.setup_button = QPushButton(icon("setup.svg"), "Set up engine")
        self.setup_button.clicked.connect(self.start_setup)
        cform.addRow("", self.setup_button)

        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.step_label = QLabel("")
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setMaximumBlockCount(2000)
        self.output.setFont(QFont("monospace", 8))
        self.output.setPlaceholderText("Installer output appears here.")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.cancel_button = self.buttons.addButton("Cancel set-up", QDialogButtonBox.ButtonRole.ActionRole)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(self.bar)
        layout.addWidget(current)
        layout.addWidget(create)
        layout.addWidget(self.progress)
        layout.addWidget(self.step_label)
        layout.addWidget(self.output, 1)
        layout.addWidget(self.buttons)
        self.resize(QSize(640, 520))
        self.refresh_state()

    def refresh_state(self, save: bool = False) -> VersionCheckTask:
        """Check the interpreter in a task (it starts a Python): "Checking…" at once, the answer
        when the task ends (``checked`` state, and with ``save`` the setting and a message).
        A newer check supersedes a running one."""
        if self.check_task is not None:
            self.check_task.cancel()
        path = self.python.filePath().strip()
        self.engine_ok = None
        self._save_when_checked = save
        self.state.setText(f"Checking the engine Python {path}…" if path else "Checking…")
        task = VersionCheckTask(path)
        task.ended.connect(self._on_checked)
        self.check_task = task
        _RUNNING.append(task)
        QgsApplication.taskManager().addTask(task)
        return task

    def check(self) -> VersionCheckTask:
        """"Check and save": the check runs in a task; the setting is saved if it succeeds."""
        self.bar.clearWidgets()
        return self.refresh_state(save=True)

    def _on_checked(self, task: VersionCheckTask) -> None:
        if task in _RUNNING:
            _RUNNING.remove(task)
        if task is not self.check_task:  # superseded by a newer check
            return
        self.check_task = None
        try:
            ok = task.version is not None
            self.engine_ok = ok
            if ok:
                self.state.setText(f"GeoPEFT engine {task.version} is installed.")
            else:
                self.state.setText(task.error or "The engine could not be checked.")
            if self._save_when_checked:
                self.bar.clearWidgets()
                if ok:
                    settings.set_engine_python(task.python)
                    self.bar.pushMessage("GeoPEFT", "Engine found; setting saved.",
                                         Qgis.MessageLevel.Success, 5)
                else:
                    self.bar.pushMessage("GeoPEFT", self.state.text(),
                                         Qgis.MessageLevel.Warning, 0)
        except RuntimeError:  # the dialog was closed and deleted meanwhile
            pass

    def start_setup(self) -> SetupTask | None:
        if self.task is not None:
            return None
        try:
            steps = setup_steps(self.venv.filePath().strip(), gpu=self.gpu.isChecked())
        except SetupError as exc:
            self.bar.pushMessage("Cannot set up the engine", str(exc), Qgis.MessageLevel.Critical, 0)
            return None
        self.output.clear()
        self.task = SetupTask(steps)
        self.task.line.connect(self.output.appendPlainText)
        self.task.step.connect(self._on_step)
        self.task.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        self.task.ended.connect(self._on_completed)
        self.setup_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _on_step(self, index: int, label: str) -> None:
        self.step_label.setText(f"Step {index + 1}/{len(self.task.steps) if self.task else '?'}: {label}…")

    def _on_completed(self, task: SetupTask) -> None:
        self.task = None
        self.setup_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if task.ok:
            self.progress.setValue(100)
            python = str(venv_python(self.venv.filePath().strip()))
            self.python.setFilePath(python)
            settings.set_engine_python(python)
            self.refresh_state()
            self.step_label.setText("Done: the engine is set up.")
            self.bar.pushMessage("GeoPEFT", "Engine set up; setting saved.", Qgis.MessageLevel.Success, 0)
        elif task.error:
            self.step_label.setText("Set-up failed.")
            log(task.error, Qgis.MessageLevel.Critical)
            self.bar.pushMessage("Engine set-up failed", task.error.split("\n")[0], Qgis.MessageLevel.Critical, 0)
        else:
            self.step_label.setText("Set-up cancelled.")
