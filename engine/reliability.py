"""Run-time faults: output locks, leftovers of killed jobs, a dead parent, memory and disk.

What the CLI (``engine.cli.main``) does around every command with outputs:

* **One job per output.** A lock file ``.<name>.geopeft-lock`` beside the output holds the
  writing job's PID (and host and command). A second job asking for the same output refuses at
  once with a message naming the path and the other job's PID. On Linux/macOS the lock is an
  ``flock`` held by the open file, so the kernel releases it when its process dies, even by
  SIGKILL: a lock whose process is gone is taken over. Without ``fcntl`` (Windows) the lock is
  created exclusively and taken over when the PID it holds no longer runs. Removed on exit.
* **Leftovers of killed jobs.** Temporary files and folders are written beside their output
  under hidden names carrying the writer's PID (``.<stem>.<pid>-<random>.partial…``; a model
  folder ``.<name>.<pid>-<random>.partial``) and renamed into place only when complete, so a
  killed job never leaves something that looks like a valid output. The next job writing the
  same output (holding its lock) removes those whose PID no longer runs and says so, and the
  work folder of a multi-process predict (``.<name>.geopeft-….parts``: its job held the lock).
  A train also removes the work folders of dead trainings (``geopeft-train-<pid>-…`` in the
  temporary folder: their resumable checkpoints).
* **The parent is gone.** With ``--events jsonl`` a watchdog thread notices when the process
  that started the engine dies (QGIS closing or crashing): on Linux/macOS the parent PID changes
  (the orphan is re-parented), on Windows (no re-parenting) the original parent's PID stops
  running. It cancels like SIGTERM and, if the job has not ended ``PARENT_STOP_S`` seconds
  later, stops it like a second SIGTERM. An event the caller can no longer read (its pipe
  closed) cancels too (``Reporter.emit``).
* **Out of memory, disk full.** ``explain_fault`` turns MemoryError, PyTorch's CPU/CUDA
  out-of-memory errors and ENOSPC/EDQUOT (also inside GDAL's messages) into user errors with
  what to do: a smaller ``--batch-size`` (half the batch that failed: predict's batches hold at
  most a strip's tiles), or free space / another output folder.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from engine.protocol import EngineError, Reporter

LOCK_SUFFIX = ".geopeft-lock"
PARENT_POLL_S = 1.0
LOW_SPACE = 64 * 2**20  # a write that fails with less free space than this: the disk is full
PARENT_STOP_S = 10.0  # after the parent is gone: cancel, then stop hard this much later


# -- processes ---------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine). Never signals it."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it on Windows
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError):  # a zombie has ended; it only waits for its parent
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


# -- temporary names ---------------------------------------------------------------------------
def _leftover_pid(name: str, path: Path) -> int | None:
    """The PID in a temporary name beside ``path`` (a partial file or folder, or a model folder
    set aside while being replaced), None for other names."""
    for stem in {path.stem, path.name}:
        m = re.match(rf"^\.{re.escape(stem)}\.(\d+)-[^/]*\.partial", name) or \
            re.match(rf"^\.{re.escape(stem)}\.old-(\d+)$", name)
        if m:
            return int(m.group(1))
    return None


def clean_leftovers(path: str | os.PathLike, reporter: Reporter | None = None) -> list[Path]:
    """Remove the temporary files and folders beside ``path`` left by jobs that no longer run
    (killed, crashed, machine switched off). Call it holding ``path``'s lock. A model folder set
    aside while being replaced (``.<name>.old-<pid>``) goes back into place when the job died
    between the two renames. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for item in siblings:
        pid = _leftover_pid(item.name, path)
        # a multi-process predict's work folder (engine.inference.distributed) has no PID in its
        # name, but its job held this output's lock: under the lock, no running job owns it
        parts = re.match(rf"^\.{re.escape(path.name)}\.geopeft-[^/]*\.parts$", item.name) is not None
        if not parts and (pid is None or pid == os.getpid() or pid_alive(pid)):
            continue
        try:
            if item.name.endswith(f".old-{pid}") and not path.exists():
                os.replace(item, path)
                if reporter:
                    reporter.info(f"restored {path} from {item.name}, left by an interrupted job (PID {pid})")
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
            removed.append(item)
        except OSError as exc:
            if reporter:
                reporter.info(f"could not remove {item} left by an interrupted job (PID {pid}): {exc}")
    if removed and reporter:
        pids = sorted({str(pid) for pid in (_leftover_pid(p.name, path) for p in removed) if pid is not None})
        whose = f"PID {', '.join(pids)} no longer running" if pids else "no running job holds its lock"
        reporter.info(f"removed {len(removed)} temporary file(s) beside {path} left by an interrupted job "
                      f"({whose}): {', '.join(p.name for p in removed)}")
    return removed


# -- locks -------------------------------------------------------------------------------------
def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def _read_owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(path: Path, lock: Path, owner: dict) -> EngineError:
    pid = owner.get("pid", "?")
    where = f" on {owner['host']}" if owner.get("host") not in (None, socket.gethostname()) else ""
    what = f"{owner['command']}, " if owner.get("command") else ""
    return _typed(EngineError(
        f"another GeoPEFT job ({what}PID {pid}{where}) is writing {path}",
        hint=f"wait for it to finish or cancel it, or choose another output; if no such job runs, "
             f"delete the lock file {lock}"), "OutputBusy")


class OutputLock:
    """An exclusive claim on one output path (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike, command: str = "", reporter: Reporter | None = None):
        self.path = Path(path)
        self.lock = lock_path(self.path)
        self.command = command
        self.reporter = reporter
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> "OutputLock":
        # folders made for the lock are removed with it when nothing else was written there
        missing = [p for p in (self.lock.parent, *self.lock.parent.parents) if not p.exists()]
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            import fcntl
        except ImportError:
            fcntl = None
        previous: dict = {}
        for _ in range(20):
            if fcntl is not None:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise _busy(self.path, self.lock, _read_owner(self.lock)) from None
                try:  # the file may have been removed by its last holder since we opened it
                    same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = _read_owner(self.lock)
                os.ftruncate(fd, 0)
                os.write(fd, mine.encode())
            else:  # no flock: an exclusive create; a lock whose PID no longer runs is taken over
                try:
                    fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    previous = _read_owner(self.lock)
                    pid = previous.get("pid")
                    if isinstance(pid, int) and previous.get("host") in (None, socket.gethostname()) \
                            and not pid_alive(pid):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.lock)
                        continue
                    raise _busy(self.path, self.lock, previous) from None
                os.write(fd, mine.encode())
            self._fd = fd
            if previous.get("pid") and self.reporter:
                self.reporter.info(f"took over the lock on {self.path} left by GeoPEFT job PID {previous['pid']}, "
                                   f"which is no longer running")
            return self
        raise EngineError(f"could not lock {self.path}: its lock file {self.lock} keeps changing",
                          hint="another job is starting on the same output; try again, or choose another output")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock)  # while still holding it: a waiting job then locks a new file
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        for folder in self._made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def output_paths(args) -> list[tuple[str, Path]]:
    """(option, absolute path) of what a parsed CLI command writes (its lock and leftover scope)."""
    command = getattr(args, "command", None)
    if command in ("train", "export", "demo-data", "embed"):
        names = ("out",)
    elif command == "evaluate":
        names = ("out", "report")
    elif command == "predict":
        names = ("out", "probabilities", "uncertainty", "polygons", "uncertain_areas")
    else:
        return []
    found: dict[Path, str] = {}
    for name in names:
        value = getattr(args, name, None)
        if value:
            found.setdefault(Path(os.path.abspath(value)), f"--{name.replace('_', '-')}")
    return [(option, path) for path, option in found.items()]


@contextlib.contextmanager
def guard_outputs(outputs: Iterable[tuple[str, Path]], command: str, reporter: Reporter) -> Iterator[None]:
    """Refuse outputs that cannot be written (under a file, in a read-only folder), lock every
    output path (refusing at once when another job holds one), remove the leftovers of killed
    jobs beside them, run the body, then release the locks."""
    from engine.data.rasters import check_writable

    outputs = list(outputs)
    for option, path in outputs:  # before the lock, which would have to create the folders
        check_writable(path, option, folder=command in ("train", "demo-data"))
    paths = [path for _, path in outputs]
    with contextlib.ExitStack() as stack:
        for path in sorted(set(paths)):  # a fixed order: two jobs never wait on each other
            stack.enter_context(OutputLock(path, command, reporter))
        for path in paths:
            clean_leftovers(path, reporter)
        if command == "train":
            clean_work_folders(reporter)
        try:
            yield
        except Exception as exc:  # noted before the locks go (they remove the folders they made)
            with contextlib.suppress(AttributeError):
                exc.geopeft_folders_gone = [p.parent for p in paths if not p.parent.exists()]
            raise


def clean_work_folders(reporter: Reporter | None = None) -> list[Path]:
    """Remove the training work folders (``geopeft-train-<pid>-…`` in the temporary folder, where
    resumable checkpoints are kept while training) of trainings that no longer run."""
    import tempfile

    removed = []
    with contextlib.suppress(OSError):
        for item in Path(tempfile.gettempdir()).glob("geopeft-train-*"):
            m = re.match(r"^geopeft-train-(\d+)-", item.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))) and item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
                if not item.exists():
                    removed.append(item)
    if removed and reporter:
        reporter.info(f"removed {len(removed)} work folder(s) of interrupted trainings: "
                      f"{', '.join(str(p) for p in removed)}")
    return removed


# -- the parent ----------------------------------------------------------------------------------
def watch_parent(reporter: Reporter, poll_s: float = PARENT_POLL_S, stop_after_s: float = PARENT_STOP_S) -> None:
    """Cancel the job when the process that started the engine is gone (see the module's
    docstring). On with ``--events jsonl`` (a program such as QGIS drives the engine), off for
    people at a terminal (``nohup … &`` must go on after the shell exits);
    ``GEOPEFT_PARENT_WATCHDOG=1`` or ``0`` forces it on or off. Off when started by init (PID 1)."""
    forced = os.environ.get("GEOPEFT_PARENT_WATCHDOG", "")
    if forced == "0" or (forced != "1" and reporter.mode != "jsonl"):
        return
    parent = os.getppid()
    if parent <= 1:
        return

    def gone() -> bool:
        if sys.platform == "win32":  # no re-parenting on Windows: is the original parent alive?
            return not pid_alive(parent)
        return os.getppid() != parent

    def watch() -> None:
        while not gone():
            time.sleep(poll_s)
        reporter.cancel()
        with contextlib.suppress(Exception):  # its pipe may be gone with it
            print(f"GeoPEFT: the process that started the engine (PID {parent}) is gone: cancelling",
                  file=sys.__stderr__, flush=True)
        time.sleep(stop_after_s)
        # still running: stop like a second SIGTERM (KeyboardInterrupt in the main thread)
        if hasattr(signal, "SIGTERM") and sys.platform != "win32":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            import _thread
            _thread.interrupt_main()

    threading.Thread(target=watch, name="geopeft-parent-watchdog", daemon=True).start()


# -- memory and disk -------------------------------------------------------------------------------
# (oneDNN, PyTorch's CPU convolutions, says "could not create a primitive" when it cannot allocate
# its buffers: seen under a memory cap with a large batch)
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory",
             "unable to allocate", "bad_alloc", "could not create a primitive")
_NOSPACE_TEXT = ("no space left on device", "disk quota exceeded", "free disk space available")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _io_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed read or write (Python's or GDAL's)."""
    return any(isinstance(e, OSError) or type(e).__module__.startswith("rasterio") for e in _chain(exc))


def is_out_of_memory(exc: BaseException) -> str | None:
    """"gpu" or "cpu" when ``exc`` (or what caused it) is an allocation failure, else None."""
    for e in _chain(exc):
        name = type(e).__name__
        text = str(e).lower()
        if ("cuda" in text and "out of memory" in text) or (name == "OutOfMemoryError" and "cpu" not in text):
            return "gpu"
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(t in text for t in _OOM_TEXT)):
            return "cpu"
    return None


def is_disk_full(exc: BaseException) -> str | None:
    """The path (or "") when ``exc`` (or what caused it) says the disk is full, else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return e.filename or ""
        if any(t in str(e).lower() for t in _NOSPACE_TEXT):
            return ""
    return None


def explain_fault(exc: BaseException, args) -> EngineError | None:
    """A run-time fault of a CLI command (out of memory, disk full, the output's folder removed
    or not writable) → an EngineError saying what to do; None for anything else (a bug)."""
    command = getattr(args, "command", "engine")
    memory = is_out_of_memory(exc)
    if memory:
        batch = getattr(args, "batch_size", None)
        images = ", ".join(Path(p).name for p in (getattr(args, "image", None) or []))
        where = "GPU memory" if memory == "gpu" else "memory"
        verb = {"train": "training", "predict": "predicting", "export": "exporting"}.get(command, f"running {command}")
        doing = f" while {verb} {images}" if images else f" while {verb}"
        # a batch holds at most the tiles of a strip: halve the batch that failed
        ran = next((e.geopeft_batch for e in _chain(exc) if isinstance(getattr(e, "geopeft_batch", None), int)), None)
        if batch and ran and ran < batch:
            batch_note = f" (batches of {ran} tiles here)"
        else:
            batch_note, ran = "", batch
        if ran and ran > 1:
            suggestion = max(1, ran // 2)
            message = f"out of {where}{doing} with --batch-size {batch}{batch_note}: try --batch-size {suggestion}"
            hint = f"try --batch-size {suggestion} (or smaller)"
        else:
            message = f"out of {where}{doing}"
            hint = "close other programs"
        if memory == "gpu":
            hint += ", or --device cpu"
        if command == "train":
            hint += "; a smaller --chip-size also helps"
        return _typed(EngineError(message, hint=hint), "OutOfMemory")
    path = is_disk_full(exc)
    out = getattr(args, "out", None)
    if path is None and out and _io_error(exc):  # GDAL does not always say why a write failed
        with contextlib.suppress(OSError):
            folder = Path(out).absolute().parent
            if shutil.disk_usage(folder).free < LOW_SPACE:
                path = str(out)
    if path is not None:
        folder = Path(path or out or "x").absolute().parent
        return _typed(EngineError(f"no space left on the disk of {folder} (writing {out or path}): free space or "
                                  f"choose another output; nothing was written",
                                  hint="free space on that disk, or choose an output folder on another disk"),
                      "DiskFull")
    gone = getattr(exc, "geopeft_folders_gone", None)  # seen while the job ran (guard_outputs)
    if gone is None:
        gone = [Path(out).absolute().parent] if out and not Path(out).absolute().parent.exists() else []
    if out and command != "demo" and gone:
        folder = gone[0]
        return _typed(EngineError(f"the output folder {folder} was removed while writing {out}: nothing was "
                                  f"written", hint="choose an output in an existing folder and run again"),
                      "OutputFolderGone")
    folder = Path(out).absolute().parent if out else None
    for e in _chain(exc):
        text = str(e).lower()
        denied = (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)) or \
            "permission denied" in text or "read-only file system" in text
        name = getattr(e, "filename", None)
        ours = folder is not None and (str(folder).lower() in text or not os.access(folder, os.W_OK) or
                                       (name is not None and Path(name).absolute().parent == folder))
        if denied and ours:
            return _typed(EngineError(f"cannot write {out}: "
                                      f"permission denied (is its folder read-only?); nothing was written",
                                      hint="choose an output in a folder you can write to, or make it writable"),
                          "PermissionDenied")
    return None


def _typed(error: EngineError, error_type: str) -> EngineError:
    """``error`` with the ``error_type`` its ``error`` event carries (the CLI's default: EngineError)."""
    error.error_type = error_type
    return error
