"""A stand-in engine for testing the plugin's client: ``fake_engine.py -m engine <cmd> ...``.

Commands: ``train`` (progress every 50 ms until SIGTERM/'cancel' on stdin, then writes and
reports done cancelled), ``usererror`` (error event + exit 2), ``crash`` (traceback, exit 3),
``silent`` (no output for a long time, honours SIGTERM), ``noengine`` (like a Python without
the engine), ``leak`` (reports its environment), ``echo`` (done at once, reporting its argv), ``predict``
(writes small outputs on the input's grid as the real engine names them: class raster, uncertainty
uint8 0-100 with nodata 255, polygons GeoPackage layer "predictions" with class_value,
class_name, area; uncertain areas GeoPackage layer "uncertain_areas" with rank, mean_uncertainty,
valid_fraction: the whole squares of --area-size px (default 32) by mean uncertainty; reports each
as an artifact). ``$FAKE_ENGINE_MODE`` overrides the command.
``$FAKE_ENGINE_RECORD`` (a folder): what the engine got, before anything runs: ``argv.json`` and a
copy of the files given to --aoi/--mask/--labels (``aoi.gpkg``, ``mask.tif``, ``labels.gpkg``: the
plugin may delete its own temporary ones afterwards).
Faults (plugin-side tests): ``garbage`` (non-protocol bytes, broken JSON and foreign JSON on
stdout, a line on stderr, exit 1), ``hang`` (start, then silence forever: ignores SIGTERM and
has a sleeping child process), ``slow`` (progress every 0.1 s for ``$FAKE_ENGINE_SECONDS``,
default 3, then done ok). ``$FAKE_ENGINE_PID_FILE``: the engine's pid is written there (``hang``
adds its child's on the next line).
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


def option(name, default=None):
    for arg in args:  # "--aoi=-10.5,…" as well as "--aoi VALUE"
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return args[args.index(name) + 1] if name in args else default


def record(folder):
    import shutil
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "argv.json"), "w", encoding="utf-8") as f:
        json.dump(args, f)
    for flag in ("--aoi", "--mask", "--labels"):
        value = option(flag)
        if value and os.path.isfile(value):
            shutil.copy(value, os.path.join(folder, flag[2:] + os.path.splitext(value)[1]))


if os.environ.get("FAKE_ENGINE_RECORD"):
    record(os.environ["FAKE_ENGINE_RECORD"])
if os.environ.get("FAKE_ENGINE_PID_FILE"):
    with open(os.environ["FAKE_ENGINE_PID_FILE"], "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")


def fake_predict():
    """Classes in vertical stripes (one per class of the card), uncertainty rising left to right."""
    import numpy as np
    from osgeo import gdal, ogr, osr

    model = option("--model")
    card = os.path.join(model, "card.json") if os.path.isdir(model) else model
    with open(card, encoding="utf-8") as f:
        classes = json.load(f).get("classes") or [{"value": 1, "name": "a", "colour": "#1f78b4"}]
    src = gdal.Open(option("--image"))
    width, height = src.RasterXSize, src.RasterYSize
    transform, projection = src.GetGeoTransform(), src.GetProjection()
    stripe = -(-width // len(classes))
    values = np.array([c["value"] for c in classes], dtype="uint8")
    cols = np.arange(width) // stripe
    grid = np.broadcast_to(values[cols], (height, width))

    def write_tif(path, array, nodata):
        ds = gdal.GetDriverByName("GTiff").Create(path, width, height, 1, gdal.GDT_Byte)
        ds.SetGeoTransform(transform)
        ds.SetProjection(projection)
        ds.GetRasterBand(1).SetNoDataValue(nodata)
        ds.GetRasterBand(1).WriteArray(array)
        ds = None

    write_tif(option("--out"), grid, 0)
    emit("progress", stage="predict", step=1, total=1)
    emit("artifact", kind="raster", path=option("--out"), classes=classes, nodata=0)
    if option("--uncertainty"):
        ramp = (np.arange(width) * 100 // max(width - 1, 1)).astype("uint8")
        uncertainty = np.broadcast_to(ramp, (height, width)).copy()
        uncertainty[0, :] = 255  # a nodata row
        write_tif(option("--uncertainty"), uncertainty, 255)
        emit("artifact", kind="uncertainty", path=option("--uncertainty"), nodata=255,
             measure="normalised entropy × 100")
    if option("--polygons"):
        min_area = float(option("--min-area", 0))
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(option("--polygons"))
        srs = osr.SpatialReference(wkt=projection) if projection else None
        layer = ds.CreateLayer("predictions", srs, ogr.wkbPolygon)
        layer.CreateField(ogr.FieldDefn("class_value", ogr.OFTInteger))
        layer.CreateField(ogr.FieldDefn("class_name", ogr.OFTString))
        layer.CreateField(ogr.FieldDefn("area", ogr.OFTReal))
        x0, dx, _, y0, _, dy = transform
        count = 0
        for i, c in enumerate(classes):
            left, right = x0 + i * stripe * dx, x0 + min((i + 1) * stripe, width) * dx
            top, bottom = y0, y0 + height * dy
            ring = f"POLYGON(({left} {top},{right} {top},{right} {bottom},{left} {bottom},{left} {top}))"
            geometry = ogr.CreateGeometryFromWkt(ring)
            if geometry.GetArea() < min_area:
                continue
            feature = ogr.Feature(layer.GetLayerDefn())
            feature.SetField("class_value", int(c["value"]))
            feature.SetField("class_name", c["name"])
            feature.SetField("area", geometry.GetArea())
            feature.SetGeometry(geometry)
            layer.CreateFeature(feature)
            count += 1
        ds = None
        emit("artifact", kind="polygons", path=option("--polygons"), layer="predictions",
             polygons=count)
    if option("--uncertain-areas"):
        size, count = int(option("--area-size", 32)), int(option("--area-count", 10))
        ramp = (np.arange(width) * 100 // max(width - 1, 1)).astype("float64")
        ramp = np.broadcast_to(ramp, (height, width)).copy()
        ramp[0, :] = np.nan  # the nodata row
        cells = []
        for row in range(0, height - size + 1, size):
            for col in range(0, width - size + 1, size):
                block = ramp[row:row + size, col:col + size]
                valid = ~np.isnan(block)
                cells.append((-float(block[valid].mean()), row, col, valid.mean()))
        cells = sorted(cells)[:count]
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(option("--uncertain-areas"))
        srs = osr.SpatialReference(wkt=projection) if projection else None
        layer = ds.CreateLayer("uncertain_areas", srs, ogr.wkbPolygon)
        layer.CreateField(ogr.FieldDefn("rank", ogr.OFTInteger))
        layer.CreateField(ogr.FieldDefn("mean_uncertainty", ogr.OFTReal))
        layer.CreateField(ogr.FieldDefn("valid_fraction", ogr.OFTReal))
        x0, dx, _, y0, _, dy = transform
        for rank, (mean, row, col, fraction) in enumerate(cells, start=1):
            left, top = x0 + col * dx, y0 + row * dy
            right, bottom = left + size * dx, top + size * dy
            feature = ogr.Feature(layer.GetLayerDefn())
            feature.SetField("rank", rank)
            feature.SetField("mean_uncertainty", round(-mean, 3))
            feature.SetField("valid_fraction", float(fraction))
            feature.SetGeometry(ogr.CreateGeometryFromWkt(
                f"POLYGON(({left} {top},{right} {top},{right} {bottom},{left} {bottom},{left} {top}))"))
            layer.CreateFeature(feature)
        ds = None
        emit("artifact", kind="uncertain_areas", path=option("--uncertain-areas"), layer="uncertain_areas",
             areas=len(cells), size_px=size, count=count)
    emit("done", ok=True, cancelled=False, out=option("--out"))


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
elif command == "predict":
    fake_predict()
elif command == "echo":
    emit("done", ok=True, cancelled=False, argv=args)
elif command == "garbage":
    out = sys.stdout.buffer
    out.write(b"\x00\xff\xfe binary \x1b[31m noise \x89PNG\r\n\x1a\n")
    out.write(b'{"v": 1, "event": "progress", "stage": "train", "step": \n')  # cut short
    out.write(b'{"not": "a protocol event"}\n[1, 2, 3]\nnull\n')
    out.write(b"x" * 100_000 + b"\n")  # one huge line
    out.flush()
    print("fatal: the engine's stdout got mixed up", file=sys.stderr, flush=True)
    sys.exit(1)
elif command == "hang":
    import subprocess
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.environ.get("FAKE_ENGINE_PID_FILE"):
        with open(os.environ["FAKE_ENGINE_PID_FILE"], "a", encoding="utf-8") as f:
            f.write(f"{child.pid}\n")
    while True:
        time.sleep(1)
elif command == "slow":
    seconds = float(os.environ.get("FAKE_ENGINE_SECONDS", "3"))
    steps = max(int(seconds / 0.1), 1)
    for step in range(1, steps + 1):
        if cancel.is_set():
            break
        emit("progress", stage="train", step=step, total=steps, epoch=1, loss=1.0 / step)
        time.sleep(0.1)
    emit("done", ok=True, cancelled=cancel.is_set(), out=option("--out", "x"))
elif command == "leak":
    keys = ["PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA", "QGIS_PREFIX_PATH",
            "LD_LIBRARY_PATH", "GDAL_DRIVER_PATH", "QGIS_SOMETHING", "PYTHONUNBUFFERED"]
    emit("done", ok=True, cancelled=False, env={k: os.environ.get(k) for k in keys})
