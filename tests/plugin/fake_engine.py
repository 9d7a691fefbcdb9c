"""A stand-in engine for testing the plugin's client: ``fake_engine.py -m engine <cmd> ...``.

Commands: ``train`` (progress every 50 ms until SIGTERM/'cancel' on stdin, then writes and
reports done cancelled), ``usererror`` (error event + exit 2), ``crash`` (traceback, exit 3),
``silent`` (no output for a long time, honours SIGTERM), ``noengine`` (like a Python without
the engine), ``leak`` (reports its environment), ``echo`` (done at once, reporting its argv). ``$FAKE_ENGINE_MODE`` overrides the command.
"""
import json
import os
import signal
import sys
import threading
import time

args = sys.argv[3:] if sys.argv[1:3] == ["-m", "engine"] else sys.argv[1:]
command = os.environ.get("FAKE_ENGINE_MODE") or args[0]  # run `crash` for any command
cancel = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: cancel.set())
if "--cancel-on-stdin" in args:
    def watch():
        for line in sys.stdin:
            if line.strip() == "cancel":
                cancel.set()
    threading.Thread(target=watch, daemon=True).start()


def emit(event, **fields):
    print(json.dumps({"v": 1, "event": event, **fields}), flush=True)


emit("start", command=command, engine_version="fake")
if command == "train":
    print("some human log line", file=sys.stderr, flush=True)
    print("not a protocol line on stdout", flush=True)
    for step in range(1, 10_000):
        if cancel.is_set():
            break
        emit("progress", stage="train", step=step, total=10_000, epoch=1, loss=1.0 / step)
        if step == 3:
            emit("metric", name="val_miou", value=0.5, stage="validate", epoch=1)
        time.sleep(0.05)
    emit("done", ok=True, cancelled=cancel.is_set(), out="x")
elif command == "usererror":
    emit("error", message="labels not found: x.tif", error_type="EngineError", hint="check the path")
    emit("done", ok=False, cancelled=False)
    sys.exit(2)
elif command == "crash":
    print("Traceback (most recent call last):\n  File \"engine/x.py\", line 1\n"
          "RuntimeError: CUDA out of memory", file=sys.stderr, flush=True)
    sys.exit(3)
elif command == "silent":
    while not cancel.is_set():
        time.sleep(0.05)
    emit("done", ok=True, cancelled=True)
elif command == "noengine":
    print("/usr/bin/python3: No module named engine", file=sys.stderr, flush=True)
    sys.exit(1)
elif command == "echo":
    emit("done", ok=True, cancelled=False, argv=args)
elif command == "leak":
    keys = ["PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA", "QGIS_PREFIX_PATH",
            "LD_LIBRARY_PATH", "GDAL_DRIVER_PATH", "QGIS_SOMETHING", "PYTHONUNBUFFERED"]
    emit("done", ok=True, cancelled=False, env={k: os.environ.get(k) for k in keys})
