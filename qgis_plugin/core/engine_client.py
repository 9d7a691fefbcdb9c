"""Run the engine in its own Python: argv, a sanitised environment, events, cancel, errors.

Qt-free and thread-agnostic: a Processing algorithm calls :func:`run_engine` on its worker
thread, a dialog calls it inside a ``QgsTask``. Callers pass two callables: ``on_event`` (every
protocol event, in order) and ``is_cancelled`` (polled about ten times a second, even while the
engine is silent, because stdout and stderr are read by their own threads).

Every run writes a log file (the command line, the engine's stderr, stray stdout lines, the
events but progress, the exit status) in ``log_dir``; every error names it ("details in …").
A watchdog kills an engine that prints nothing at all (no event, no log line) for
``watchdog_s`` seconds and reports that it stopped responding.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .protocol import EXIT_USER_ERROR, decode_event

IS_WINDOWS = sys.platform.startswith("win")
STDERR_TAIL_LINES = 40
CANCEL_GRACE_S = 30.0  # after this, a cancelled engine that has not exited is killed
WATCHDOG_S = 600.0  # an engine silent this long (no event, no log line) is killed
WATCHDOG_VARIABLE = "GEOPEFT_WATCHDOG_S"  # overrides WATCHDOG_S (seconds; 0 turns it off)
LOG_DIR_VARIABLE = "GEOPEFT_LOG_DIR"  # where the engine logs go (default: see default_log_dir)
LOG_KEEP = 30  # log files kept in the log folder (older ones are deleted when a run starts)
LOG_LINE_MAX = 2000  # characters of one stray line kept (binary garbage has no newlines)

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

    def __init__(self, message: str, details: str = "", log_path: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details  # e.g. the tail of the engine's stderr, for the log
        self.log_path = log_path  # the run's log file, when the engine was started


class EngineNotFound(EngineError):
    """No usable engine: missing interpreter, or the engine is not installed in it."""


class EngineFailed(EngineError):
    """The engine ran and reported an error, or crashed."""


class EngineHung(EngineFailed):
    """The watchdog killed an engine that stopped responding."""


@dataclass
class EngineResult:
    returncode: int
    events: list[dict] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    cancelled: bool = False
    log_path: str | None = None
    last_stderr: str = ""  # the engine's last stderr line (a traceback's exception line)
    hung_after_s: float | None = None  # the watchdog's limit, when it killed the engine

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


def engine_version(python: str, timeout: float = 60.0,
                   is_cancelled: Callable[[], bool] = lambda: False) -> str:
    """The engine version installed in ``python``; :class:`EngineNotFound` if it is missing or broken.

    Starts a Python (a second or more): call it on a worker thread, never on the UI thread.
    ``is_cancelled`` is polled while waiting; a cancelled check raises :class:`EngineNotFound`.
    """
    python = check_python(python)
    code = "import engine, engine.protocol; print(getattr(engine, '__version__', 'unknown'))"
    try:
        proc = subprocess.Popen([python, "-c", code], env=sanitized_env(python=python),
                                cwd=str(Path(python).parent), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", **_popen_platform_kwargs())
    except OSError as exc:
        raise EngineNotFound(f"The GeoPEFT engine Python {python} could not be run: {exc}\n"
                             + FIX_HINT) from exc
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if is_cancelled() or time.monotonic() > deadline:
                _kill_tree(proc)
                proc.communicate()
                why = "cancelled" if is_cancelled() else f"no answer in {timeout:g} s"
                raise EngineNotFound(f"The GeoPEFT engine Python {python} could not be checked "
                                     f"({why}).\n" + FIX_HINT) from None
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-1:] or ["(no output)"]
        raise EngineNotFound(f"The GeoPEFT engine is not installed in {python} ({tail[0]}).\n"
                             + FIX_HINT, details=err)
    return out.strip()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its children (its own process group; Windows: the process)."""
    if proc.poll() is not None:
        return
    try:
        if IS_WINDOWS:
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


# -- watchdog and log files -------------------------------------------------------------------
def default_watchdog_s(environ: dict | None = None) -> float:
    """$GEOPEFT_WATCHDOG_S (seconds; 0: no watchdog), else :data:`WATCHDOG_S`."""
    value = (os.environ if environ is None else environ).get(WATCHDOG_VARIABLE, "").strip()
    try:
        return max(float(value), 0.0) if value else WATCHDOG_S
    except ValueError:
        return WATCHDOG_S


def default_log_dir(environ: dict | None = None) -> Path:
    """$GEOPEFT_LOG_DIR, else ``<temp>/geopeft/logs`` (the plugin passes its profile folder)."""
    value = (os.environ if environ is None else environ).get(LOG_DIR_VARIABLE, "").strip()
    return Path(value) if value else Path(tempfile.gettempdir()) / "geopeft" / "logs"


_LOG_COUNTER = itertools.count(1)


def prune_logs(log_dir: str | os.PathLike, keep: int = LOG_KEEP) -> None:
    """Delete all but the ``keep`` newest ``engine-*.log`` files of ``log_dir``."""
    try:
        logs = sorted(Path(log_dir).glob("engine-*.log"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for old in logs[:max(len(logs) - keep, 0)]:
        try:
            old.unlink()
        except OSError:
            pass


class EngineLog:
    """The log file of one run, written by the reader threads (thread-safe, line-buffered).

    Never raises: a folder that cannot be written leaves ``path`` None and the run goes on."""

    def __init__(self, log_dir: str | os.PathLike | None, command: str, keep: int = LOG_KEEP):
        self.path: str | None = None
        self._file = None
        self._lock = threading.Lock()
        folder = Path(log_dir) if log_dir else default_log_dir()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in command)[:40] or "run"
        name = (f"engine-{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{os.getpid()}-"
                f"{next(_LOG_COUNTER)}.log")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            prune_logs(folder, keep - 1)
            self._file = open(folder / name, "w", encoding="utf-8", errors="replace", buffering=1)
            self.path = str(folder / name)
        except OSError:
            self._file = None

    def write(self, line: str) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(line.rstrip("\n") + "\n")
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None


def _popen_platform_kwargs() -> dict:
    if IS_WINDOWS:  # no console window; a process group so CTRL_BREAK reaches only the engine
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000}
    return {"start_new_session": True}  # Ctrl+C in QGIS's terminal does not hit the engine


# -- running ----------------------------------------------------------------------------------
class EngineProcess:
    """One engine run: start, iterate events, cancel, watchdog, log file, the stderr tail."""

    def __init__(self, python: str, args: list[str], cwd: str | None = None,
                 on_stderr: Callable[[str], None] | None = None, env: dict | None = None,
                 log_dir: str | os.PathLike | None = None, watchdog_s: float | None = None):
        self.python = check_python(python)
        self.argv = engine_argv(self.python, args)  # a list: never a shell string
        self._queue: queue.Queue = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._on_stderr = on_stderr
        self.cancel_requested_at: float | None = None
        self.watchdog_s = default_watchdog_s() if watchdog_s is None else watchdog_s
        self.hung_after_s: float | None = None  # set when the watchdog killed the engine
        self.killed_at: float | None = None
        self.exited_at: float | None = None
        self.last_stderr = ""
        self.last_output_at = time.monotonic()
        self._last_stage = None
        self.started_at = time.monotonic()
        self.log = EngineLog(log_dir, args[0] if args else "run")
        self.log.write(f"# GeoPEFT engine run, {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.log.write("# " + " ".join(shlex.quote(a) for a in self.argv))
        self.log.write(f"# watchdog: {self.watchdog_s:g} s without output"
                       if self.watchdog_s else "# watchdog: off")
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=cwd, env=env or sanitized_env(python=self.python),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1,
                **_popen_platform_kwargs())
        except OSError as exc:
            self.log.write(f"# could not start: {exc}")
            self.log.close()
            raise EngineNotFound(f"Could not start the GeoPEFT engine with {self.python}: {exc}\n"
                                 + FIX_HINT, log_path=self.log.path) from exc
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def log_path(self) -> str | None:
        return self.log.path

    def _read_stdout(self) -> None:
        try:
            for line in self.proc.stdout:
                self.last_output_at = time.monotonic()
                try:
                    event = decode_event(line)
                except Exception:  # noqa: BLE001 - whatever the engine prints, never crash
                    event = None
                if event is not None:
                    self._log_event(event)
                    self._queue.put(event)
                elif line.strip():  # not protocol: keep it for diagnostics, never parse it
                    self._add_stderr(line, stream="stdout")
        except (OSError, ValueError):  # the pipe closed under us (killed)
            pass
        finally:
            self._queue.put(None)

    def _read_stderr(self) -> None:
        try:
            for line in self.proc.stderr:
                self.last_output_at = time.monotonic()
                self._add_stderr(line)
        except (OSError, ValueError):
            pass

    def _log_event(self, event: dict) -> None:
        if event.get("event") == "progress":  # one line per stage, not one per step
            if event.get("stage") == self._last_stage:
                return
            self._last_stage = event.get("stage")
        try:
            self.log.write("[event] " + json.dumps(event, ensure_ascii=False, default=str))
        except (TypeError, ValueError):
            pass

    def _add_stderr(self, line: str, stream: str = "stderr") -> None:
        line = line.rstrip("\n")
        # progress bars redraw with \r: keep only the last state of the line
        line = line.split("\r")[-1].replace("\x1b[K", "")
        if not line.strip():
            return
        if len(line) > LOG_LINE_MAX:
            line = line[:LOG_LINE_MAX] + f" … ({len(line) - LOG_LINE_MAX} more characters)"
        self.log.write(line if stream == "stderr" else "[stdout, not protocol] " + line)
        self._stderr_tail.append(line)
        if stream == "stderr":
            self.last_stderr = line
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
        self.log.write("# cancel requested")
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
            if self.killed_at is None:
                self.killed_at = time.monotonic()
            _kill_tree(self.proc)

    def _check_watchdog(self) -> None:
        if not self.watchdog_s or self.hung_after_s is not None or self.proc.poll() is not None:
            return
        if self.cancel_requested_at is not None:  # the cancel grace period applies instead
            return
        silent = time.monotonic() - self.last_output_at
        if silent > self.watchdog_s:
            self.hung_after_s = self.watchdog_s
            self.log.write(f"# watchdog: no output for {silent:.1f} s (limit {self.watchdog_s:g} s): "
                           "the engine stopped responding and was killed")
            self.kill()

    def _orphaned_stdout(self, after_s: float = 5.0) -> bool:
        """The engine has exited (or was killed) but its stdout is still open after ``after_s``:
        a child process of its holds it. Kill what is left of its process group; stop reading."""
        if self.proc.poll() is None:
            return False
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        if time.monotonic() - self.exited_at <= after_s:
            return False
        self.log.write("# the engine exited but a child process kept its output open: "
                       "stopped reading, and stopped the child")
        if not IS_WINDOWS:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        return True

    def events(self, is_cancelled: Callable[[], bool] = lambda: False, poll_s: float = 0.1,
               grace_s: float = CANCEL_GRACE_S):
        """Yield events until the engine's stdout closes; cancel (then kill) when asked; kill
        an engine silent for longer than the watchdog's limit."""
        while True:
            if is_cancelled():
                self.cancel()
            if self.cancel_requested_at is not None and \
                    time.monotonic() - self.cancel_requested_at > grace_s:
                self.kill()
            self._check_watchdog()
            try:
                event = self._queue.get(timeout=poll_s)
            except queue.Empty:
                if self._orphaned_stdout():
                    return
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
        self.log.write(f"# exit status {code} after {time.monotonic() - self.started_at:.1f} s")
        self.log.close()
        return code


def run_engine(python: str, args: list[str], on_event: Callable[[dict], None] | None = None,
               is_cancelled: Callable[[], bool] = lambda: False,
               on_stderr: Callable[[str], None] | None = None,
               grace_s: float = CANCEL_GRACE_S, check: bool = True,
               log_dir: str | os.PathLike | None = None,
               watchdog_s: float | None = None) -> EngineResult:
    """Run one engine command to the end and return what it reported.

    With ``check`` (default) a failure raises :class:`EngineNotFound` / :class:`EngineFailed`
    (:class:`EngineHung` when the watchdog killed it) carrying one readable message (the
    engine's error + hint, or the tail of its stderr when it crashed) that names the log file.
    A cancelled run is not a failure: ``result.cancelled`` is True. ``log_dir``: where the run's
    log goes (default :func:`default_log_dir`); ``watchdog_s``: silence that counts as hung
    (default :func:`default_watchdog_s`; 0: never).
    """
    process = EngineProcess(python, args, on_stderr=on_stderr, log_dir=log_dir,
                            watchdog_s=watchdog_s)
    result = EngineResult(returncode=-1, log_path=process.log_path)
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
        result.last_stderr = process.last_stderr
        result.hung_after_s = process.hung_after_s
    result.cancelled = process.cancel_requested_at is not None or bool(result.done.get("cancelled"))
    if check and (result.hung_after_s is not None or (not result.cancelled and not result.ok)):
        raise failure(result)
    return result


def _details(result: EngineResult) -> str:
    return f"details in {result.log_path}" if result.log_path else "no log file could be written"


def failure(result: EngineResult) -> EngineError:
    """The one error to show for a failed run; it names the run's log file."""
    tail = "\n".join(result.stderr_tail[-15:])
    log = result.log_path
    if result.hung_after_s is not None:
        return EngineHung(
            f"The GeoPEFT engine stopped responding (no output for {result.hung_after_s:g} s) "
            f"and was stopped; {_details(result)}.\n"
            "Run it again; if it hangs again, read the log and check the engine (GeoPEFT ▸ "
            "Set up engine…). A step that is silent for longer needs a higher limit: "
            f"set the environment variable {WATCHDOG_VARIABLE} (seconds) before starting QGIS.",
            details=tail, log_path=log)
    if result.errors:
        error = result.errors[-1]
        message = error.get("message") or "The engine reported an error."
        if error.get("hint"):
            message += f"\nHint: {error['hint']}"
        if result.returncode != EXIT_USER_ERROR and tail:
            message += "\n\nEngine output (last lines):\n" + tail
        message += f"\n({_details(result)[0].upper() + _details(result)[1:]})"
        return EngineFailed(message, details=tail, log_path=log)
    if "No module named engine" in tail or "No module named 'engine'" in tail:
        return EngineNotFound("The GeoPEFT engine is not installed in the configured engine "
                              f"Python ({_details(result)}).\n" + FIX_HINT, details=tail,
                              log_path=log)
    cause = f": {result.last_stderr.strip()[:200]}" if result.last_stderr.strip() else ""
    message = (f"The GeoPEFT engine stopped unexpectedly (exit status {result.returncode}){cause}; "
               f"{_details(result)}.\n"
               "If it happens again, read the log and check the engine with GeoPEFT ▸ Set up "
               "engine… (reinstall it there if it is broken).")
    if tail:
        message += "\n\nEngine output (last lines):\n" + tail
    return EngineFailed(message, details=tail, log_path=log)
