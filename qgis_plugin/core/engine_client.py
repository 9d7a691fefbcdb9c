"""Run the engine in its own Python: argv, a sanitised environment, events, cancel, errors.

Qt-free and thread-agnostic: a Processing algorithm calls :func:`run_engine` on its worker
thread, a dialog calls it inside a ``QgsTask``. Callers pass two callables: ``on_event`` (every
protocol event, in order) and ``is_cancelled`` (polled about ten times a second, even while the
engine is silent, because stdout and stderr are read by their own threads).
"""
from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .protocol import EXIT_USER_ERROR, decode_event

IS_WINDOWS = sys.platform.startswith("win")
STDERR_TAIL_LINES = 40
CANCEL_GRACE_S = 30.0  # after this, a cancelled engine that has not exited is killed

# Variables that QGIS (or its launcher) sets for its own Python, GDAL, PROJ and Qt. Leaking them
# into the engine mixes two Python/GDAL/PROJ installations, with crashes or wrong CRS results.
LEAKY_VARIABLES = (
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONUSERBASE",
    "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "__PYVENV_LAUNCHER__",
    "GDAL_DATA", "GDAL_DRIVER_PATH", "GDAL_FILENAME_IS_UTF8", "GDAL_SKIP", "CPL_ZIP_ENCODING",
    "PROJ_LIB", "PROJ_DATA", "PROJ_NETWORK", "PROJ_USER_WRITABLE_DIRECTORY",
    "QGIS_PREFIX_PATH", "QGIS_CUSTOM_CONFIG_PATH", "QGIS_PLUGINPATH", "QGIS_AUTH_DB_DIR_PATH",
    "QT_PLUGIN_PATH", "QML2_IMPORT_PATH", "O4W_QT_PREFIX", "O4W_QT_BINARIES", "O4W_QT_PLUGINS",
    "OSGEO4W_ROOT", "GISBASE", "GRASS_PREFIX",
    "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH", "DYLD_FRAMEWORK_PATH",
)

FIX_HINT = ("Fix: in QGIS use GeoPEFT ▸ Set up engine… (creates a separate Python environment "
            "with the engine), or point GeoPEFT ▸ Set up engine… ▸ Engine Python at the "
            "interpreter of an existing install (from the repository: `make install`, then "
            "<repo>/.venv/bin/python).")


class EngineError(Exception):
    """A failure to show the user as one message (no traceback): what happened and the fix."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.message = message
        self.details = details  # e.g. the tail of the engine's stderr, for the log


class EngineNotFound(EngineError):
    """No usable engine: missing interpreter, or the engine is not installed in it."""


class EngineFailed(EngineError):
    """The engine ran and reported an error, or crashed."""


@dataclass
class EngineResult:
    returncode: int
    events: list[dict] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    cancelled: bool = False

    @property
    def done(self) -> dict:
        for event in reversed(self.events):
            if event["event"] == "done":
                return event
        return {}

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.done.get("ok", False))

    def artifacts(self, kind: str | None = None) -> list[dict]:
        return [e for e in self.events
                if e["event"] == "artifact" and (kind is None or e.get("kind") == kind)]

    def artifact(self, kind: str) -> dict | None:
        found = self.artifacts(kind)
        return found[-1] if found else None

    def metrics(self) -> dict[str, float]:
        """Last value of each metric."""
        return {e["name"]: e["value"] for e in self.events if e["event"] == "metric"}

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "error"]


# -- interpreter and environment --------------------------------------------------------------
def venv_python(venv_dir: str | os.PathLike) -> Path:
    """The interpreter of a virtual environment (bin/python, or Scripts\\python.exe)."""
    venv_dir = Path(venv_dir)
    return venv_dir / ("Scripts/python.exe" if IS_WINDOWS else "bin/python")


def sanitized_env(base: dict | None = None, python: str | None = None) -> dict[str, str]:
    """The engine's environment: ``base`` without QGIS's Python/GDAL/PROJ/Qt variables.

    The engine's own venv (if ``python`` lives in one) goes first on PATH so that its tools are
    found before QGIS's; Python output is unbuffered and UTF-8 so events arrive line by line.
    """
    env = dict(os.environ if base is None else base)
    for name in LEAKY_VARIABLES:
        env.pop(name, None)
    for name in list(env):
        if name.startswith(("QGIS_", "PYQGIS_")):
            env.pop(name, None)
    if python:
        bin_dir = str(Path(python).parent)
        env["PATH"] = os.pathsep.join([bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep)
                                                   if p and p != bin_dir])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONSAFEPATH"] = "1"  # 3.11+: `-m engine` never picks up an `engine/` in the cwd
    return env


def engine_argv(python: str, args: list[str], events: bool = True) -> list[str]:
    """``<python> -m engine <command> --events jsonl [--cancel-on-stdin] <options>``."""
    if not args:
        raise ValueError("no engine command")
    command, options = args[0], list(args[1:])
    flags = ["--events", "jsonl"] if events else []
    if events and IS_WINDOWS:
        flags.append("--cancel-on-stdin")
    return [str(python), "-m", "engine", command, *flags, *options]


def check_python(python: str | None) -> str:
    """The interpreter path if it exists, else :class:`EngineNotFound` with the fix."""
    if not python:
        raise EngineNotFound("The GeoPEFT engine is not set up: no engine Python is configured.\n"
                             + FIX_HINT)
    path = Path(python).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise EngineNotFound(f"The GeoPEFT engine Python was not found at {path}.\n" + FIX_HINT)
    return str(path)


def engine_version(python: str, timeout: float = 60.0) -> str:
    """The engine version installed in ``python``; :class:`EngineNotFound` if it is missing or broken."""
    python = check_python(python)
    code = "import engine, engine.protocol; print(getattr(engine, '__version__', 'unknown'))"
    try:
        proc = subprocess.run([python, "-c", code], env=sanitized_env(python=python),
                              cwd=str(Path(python).parent),
                              capture_output=True, text=True, timeout=timeout,
                              **_popen_platform_kwargs())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineNotFound(f"The GeoPEFT engine Python {python} could not be run: {exc}\n"
                             + FIX_HINT) from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise EngineNotFound(f"The GeoPEFT engine is not installed in {python} ({tail[0]}).\n"
                             + FIX_HINT, details=proc.stderr)
    return proc.stdout.strip()


def _popen_platform_kwargs() -> dict:
    if IS_WINDOWS:  # no console window; a process group so CTRL_BREAK reaches only the engine
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000}
    return {"start_new_session": True}  # Ctrl+C in QGIS's terminal does not hit the engine


# -- running ----------------------------------------------------------------------------------
class EngineProcess:
    """One engine run: start, iterate events, cancel, collect the stderr tail."""

    def __init__(self, python: str, args: list[str], cwd: str | None = None,
                 on_stderr: Callable[[str], None] | None = None, env: dict | None = None):
        self.python = check_python(python)
        self.argv = engine_argv(self.python, args)
        self._queue: queue.Queue = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._on_stderr = on_stderr
        self.cancel_requested_at: float | None = None
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=cwd, env=env or sanitized_env(python=self.python),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1,
                **_popen_platform_kwargs())
        except OSError as exc:
            raise EngineNotFound(f"Could not start the GeoPEFT engine with {self.python}: {exc}\n"
                                 + FIX_HINT) from exc
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            event = decode_event(line)
            if event is not None:
                self._queue.put(event)
            elif line.strip():  # not protocol: keep it for diagnostics, never parse it
                self._add_stderr(line)
        self._queue.put(None)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self._add_stderr(line)

    def _add_stderr(self, line: str) -> None:
        line = line.rstrip("\n")
        # progress bars redraw with \r: keep only the last state of the line
        line = line.split("\r")[-1].replace("\x1b[K", "")
        if not line.strip():
            return
        self._stderr_tail.append(line)
        if self._on_stderr is not None:
            try:
                self._on_stderr(line)
            except Exception:  # noqa: BLE001 - a logging callback must not kill the reader
                pass

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr_tail)

    def cancel(self) -> None:
        """Ask the engine to stop: SIGTERM (Windows: a ``cancel`` line on stdin)."""
        if self.cancel_requested_at is not None or self.proc.poll() is not None:
            return
        self.cancel_requested_at = time.monotonic()
        try:
            if IS_WINDOWS:
                self.proc.stdin.write("cancel\n")
                self.proc.stdin.flush()
            else:
                self.proc.send_signal(signal.SIGTERM)
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                if IS_WINDOWS:
                    self.proc.kill()
                else:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def events(self, is_cancelled: Callable[[], bool] = lambda: False, poll_s: float = 0.1,
               grace_s: float = CANCEL_GRACE_S):
        """Yield events until the engine's stdout closes; cancel (then kill) when asked."""
        while True:
            if is_cancelled():
                self.cancel()
            if self.cancel_requested_at is not None and \
                    time.monotonic() - self.cancel_requested_at > grace_s:
                self.kill()
            try:
                event = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            if event is None:
                return
            yield event

    def wait(self) -> int:
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        code = self.proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        return code


def run_engine(python: str, args: list[str], on_event: Callable[[dict], None] | None = None,
               is_cancelled: Callable[[], bool] = lambda: False,
               on_stderr: Callable[[str], None] | None = None,
               grace_s: float = CANCEL_GRACE_S, check: bool = True) -> EngineResult:
    """Run one engine command to the end and return what it reported.

    With ``check`` (default) a failure raises :class:`EngineNotFound` / :class:`EngineFailed`
    carrying one readable message (the engine's error + hint, or the tail of its stderr when it
    crashed). A cancelled run is not a failure: ``result.cancelled`` is True.
    """
    process = EngineProcess(python, args, on_stderr=on_stderr)
    result = EngineResult(returncode=-1)
    try:
        for event in process.events(is_cancelled, grace_s=grace_s):
            result.events.append(event)
            if on_event is not None:
                on_event(event)
    except BaseException:  # a callback raised: never leave the engine running
        process.cancel()
        try:
            process.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    finally:
        result.returncode = process.wait()
        result.stderr_tail = process.stderr_tail
    result.cancelled = process.cancel_requested_at is not None or bool(result.done.get("cancelled"))
    if check and not result.cancelled and not result.ok:
        raise failure(result)
    return result


def failure(result: EngineResult) -> EngineError:
    """The one error to show for a failed run."""
    tail = "\n".join(result.stderr_tail[-15:])
    if result.errors:
        error = result.errors[-1]
        message = error.get("message") or "The engine reported an error."
        if error.get("hint"):
            message += f"\nHint: {error['hint']}"
        if result.returncode != EXIT_USER_ERROR and tail:
            message += "\n\nEngine output (last lines):\n" + tail
        return EngineFailed(message, details=tail)
    if "No module named engine" in tail or "No module named 'engine'" in tail:
        return EngineNotFound("The GeoPEFT engine is not installed in the configured engine "
                              "Python.\n" + FIX_HINT, details=tail)
    message = f"The GeoPEFT engine stopped unexpectedly (exit status {result.returncode})."
    if tail:
        message += "\n\nEngine output (last lines):\n" + tail
    return EngineFailed(message, details=tail)
