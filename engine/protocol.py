"""The JSON-lines protocol between the engine and its callers (the QGIS plugin above all).

With ``--events jsonl`` every command prints exactly one JSON object per line on stdout and
nothing else there; human-readable logging goes to stderr. Every event carries the protocol
version ``v`` and its kind ``event``:

=========  ==================================================================================
event      fields
=========  ==================================================================================
start      command (str), engine_version (str)
progress   stage (str: "prepare", "train", "validate", "predict", "export", "evaluate",
           "embed"),
           step (int, 1-based), total (int or null), message (str, optional), plus any extras
           (train: epoch, loss, elapsed_s, and fraction in [0, 1] = the larger of steps done and
           time budget used, for progress bars when only ``--max-time`` bounds training)
metric     name (str), value (float), stage (str), epoch (int, optional)
artifact   kind (str: "model", "card", "raster", "probabilities", "onnx", "metrics"),
           path (str), plus extras (e.g. classes for rasters); predict also reports
           "uncertainty", "polygons", "style" and "uncertain_areas" (the most uncertain
           squares: layer, areas = how many, size_px, count, max_mean_uncertainty);
           demo-data also reports "labels" and "polygons"; evaluate also reports "report"
           (the HTML report of ``--report``); embed reports "embedding" (the feature
           GeoTIFF: bands, components, patch_size, nodata, explained_variance)
warning    message (str)
error      message (str), error_type (str), hint (str, optional)
done       ok (bool), cancelled (bool), plus a summary dict of the command's results
=========  ==================================================================================

Cancel: SIGTERM (or a line ``cancel`` on stdin when started with ``--cancel-on-stdin``, for
Windows). The engine finishes the current step, writes what it must, then emits ``done`` with
``cancelled: true`` and exits with status 0; a half-written output is never left behind.
Errors end with an ``error`` event, a ``done`` with ``ok: false`` and a non-zero exit status.
"""
from __future__ import annotations

import json
import math
import re
import signal
import sys
import threading
import time
from typing import IO, Any

PROTOCOL_VERSION = 1
EVENTS = ("start", "progress", "metric", "artifact", "warning", "error", "done")

# Exit statuses of the CLI.
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad input: the message says what to fix
EXIT_INTERNAL_ERROR = 3  # a bug: the message carries the traceback's last line


class EngineError(Exception):
    """An error the user can fix: bad input, missing file, unknown option.

    ``hint`` tells them what to do. The CLI turns it into an ``error`` event and exit status 2.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _jsonable(value: Any) -> Any:
    """Make numpy scalars, paths and non-finite floats JSON-safe."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def encode_event(event: str, **fields: Any) -> str:
    """One protocol line (without the newline)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    return json.dumps({"v": PROTOCOL_VERSION, "event": event, **_jsonable(fields)},
                      separators=(",", ":"))


def decode_event(line: str) -> dict | None:
    """Parse one stdout line; ``None`` for anything that is not a protocol event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("event") not in EVENTS or "v" not in obj:
        return None
    return obj


def parse_duration(text: str | None) -> float | None:
    """A time budget (``--max-time``): ``90s``, ``5m``, ``1h``, ``1h30m`` or plain seconds →
    seconds; None when empty. Raises ValueError for anything else. Here because the plugin
    validates the same text before it starts the engine."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
        if not parts or "".join(a + b for a, b in parts) != text:
            raise ValueError(f"bad duration {text!r}: use e.g. 90s, 5m, 1h or 1h30m")
        seconds = sum(float(a) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[b] for a, b in parts)
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: must be positive")
    return seconds


class Reporter:
    """Where engine code sends its events: JSON lines on stdout, or a human view on stderr.

    Engine functions take a ``Reporter`` (default: a quiet human one) and never print directly.
    Only rank 0 of a distributed run reports (``enabled=False`` elsewhere).
    """

    def __init__(self, mode: str = "human", stream: IO[str] | None = None, enabled: bool = True):
        if mode not in ("human", "jsonl", "quiet"):
            raise ValueError(f"unknown event mode {mode!r}")
        self.mode = mode
        self.enabled = enabled
        self._stream = stream
        self._cancel = threading.Event()
        self._last_bar = 0.0
        self.warnings: list[str] = []

    # -- cancellation ------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def withdraw_cancel(self) -> None:
        """The job finished before the cancel could stop it: ``done`` says it was not cancelled."""
        self._cancel.clear()

    def install_cancel_handlers(self, stdin: bool = False) -> None:
        """SIGTERM (and SIGINT) set the cancel flag; optionally a ``cancel`` line on stdin."""
        def handler(signum, frame):  # noqa: ARG001
            if self.cancelled:  # a second signal means: stop now
                raise KeyboardInterrupt
            self.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread, or unsupported
                pass
        if stdin:
            def watch():
                for line in sys.stdin:
                    if line.strip().lower() == "cancel":
                        self.cancel()
                        return
            threading.Thread(target=watch, daemon=True).start()

    # -- events ------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        if self.mode == "jsonl":
            stream = self._stream or sys.stdout
            line = encode_event(event, **fields) + "\n"
            try:
                stream.write(line)
                stream.flush()
            except (BrokenPipeError, ValueError):  # closed: the caller stopped reading (gone): stop the job
                self.enabled = False
                self.cancel()
        elif self.mode == "human":
            self._human(event, fields)

    def start(self, command: str) -> None:
        from engine import __version__
        self.emit("start", command=command, engine_version=__version__)

    def progress(self, stage: str, step: int, total: int | None, message: str = "", **extra) -> None:
        self.emit("progress", stage=stage, step=step, total=total, message=message, **extra)

    def metric(self, name: str, value: float, stage: str, **extra) -> None:
        self.emit("metric", name=name, value=float(value), stage=stage, **extra)

    def artifact(self, kind: str, path: str, **extra) -> None:
        self.emit("artifact", kind=kind, path=str(path), **extra)

    def warning(self, message: str) -> None:
        self.warnings.append(message)
        self.emit("warning", message=message)

    def info(self, message: str) -> None:
        """A log line for people (what was chosen and why): on stderr, not part of the protocol;
        with ``jsonl`` too, where it lands in the caller's engine log."""
        if not self.enabled:
            return
        if self.mode == "human":
            self._write_err(message)
        elif self.mode == "jsonl":
            print(message, file=sys.stderr, flush=True)

    def error(self, message: str, error_type: str, hint: str | None = None) -> None:
        self.emit("error", message=message, error_type=error_type, hint=hint)

    def done(self, ok: bool = True, **summary: Any) -> None:
        self.emit("done", ok=ok, cancelled=self.cancelled, **summary)

    # -- human view ----------------------------------------------------------------------
    def _write_err(self, text: str) -> None:
        stream = self._stream or sys.stderr
        if self._last_bar:
            stream.write("\n")
            self._last_bar = 0.0
        stream.write(text + "\n")
        stream.flush()

    def _human(self, event: str, f: dict) -> None:
        stream = self._stream or sys.stderr
        if event == "progress":
            now = time.monotonic()
            total = f.get("total")
            last = total is not None and f["step"] >= total
            if not last and now - self._last_bar < 0.2:  # keep the bar cheap
                return
            extras = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in f.items() if k not in ("stage", "step", "total", "message", "fraction"))
            frac = f["step"] / total if total else f.get("fraction")
            if frac is not None:
                width = 30
                filled = int(width * min(frac, 1.0))
                count = f"{f['step']}/{total}" if total else f"step {f['step']}, {frac:.0%} of time budget"
                bar = f"[{'#' * filled}{'.' * (width - filled)}] {count}"
            else:
                bar = f"step {f['step']}"
            stream.write(f"\r{f['stage']:>9} {bar} {f.get('message') or ''} {extras}".rstrip() + "\x1b[K")
            stream.flush()
            self._last_bar = now
            if last:
                stream.write("\n")
                self._last_bar = 0.0
        elif event == "metric":
            epoch = f" (epoch {f['epoch']})" if f.get("epoch") is not None else ""
            self._write_err(f"{f['stage']}: {f['name']} = {f['value']:.4f}{epoch}")
        elif event == "artifact":
            self._write_err(f"wrote {f['kind']}: {f['path']}")
        elif event == "warning":
            self._write_err(f"WARNING: {f['message']}")
        elif event == "error":
            hint = f"\n  hint: {f['hint']}" if f.get("hint") else ""
            self._write_err(f"ERROR: {f['message']}{hint}")
        elif event == "done" and f.get("cancelled"):
            self._write_err("cancelled")
