"""Training set-up and evaluation at scene scale: peak memory of ``prepare_data`` (everything
``train`` does before its first optimisation step) and of ``evaluate`` on a 20000² 6-band
uint16 mosaic with a few small labelled areas, as polygons and as a class raster.

    python -m bench.scene_training               # 20000² (about a minute to write the rasters)
    python -m bench.scene_training --size 6000   # smaller, quicker

The rasters are written block by block (tiled, deflate; constant blocks except noise under the
labels), so writing them needs flat memory too. Each measurement runs in its own process; the
table gives that process's peak RSS (``ru_maxrss`` from ``wait4``, and the child's own VmHWM)
and wall time. A full-grid label array alone would be size² × 2 bytes (763 MiB at 20000²).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BLOCK = 512
CRS = "EPSG:32633"
PIXEL = 10.0
ORIGIN = (300000.0, 5200000.0)
BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]


def label_squares(size: int) -> list[tuple[int, int, int, int]]:
    """Five labelled squares (row, col, side, class 1 or 2) spread over the raster."""
    spots = [(0.08, 0.1), (0.3, 0.75), (0.5, 0.4), (0.72, 0.15), (0.9, 0.85)]
    side = max(64, size // 80)
    return [(int(r * (size - side)), int(c * (size - side)), side, 1 + k % 2) for k, (r, c) in enumerate(spots)]


def _transform():
    from rasterio.transform import from_origin

    return from_origin(*ORIGIN, PIXEL, PIXEL)


def _blocks(size: int):
    from rasterio.windows import Window

    for row in range(0, size, BLOCK):
        for col in range(0, size, BLOCK):
            yield Window(col, row, min(BLOCK, size - col), min(BLOCK, size - row))


def _meets(window, squares, margin=0) -> bool:
    return any(window.row_off < r + s + margin and window.row_off + window.height > r - margin and
               window.col_off < c + s + margin and window.col_off + window.width > c - margin
               for r, c, s, _ in squares)


def write_image(path: Path, size: int, squares) -> None:
    """6 bands uint16, block by block: noise near the labels, a constant per block elsewhere."""
    import rasterio

    profile = {"driver": "GTiff", "width": size, "height": size, "count": len(BANDS), "dtype": "uint16",
               "crs": CRS, "transform": _transform(), "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
               "compress": "deflate", "zlevel": 1, "nodata": 0, "BIGTIFF": "YES"}
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for k, band in enumerate(BANDS):
            dst.set_band_description(k + 1, band)
        for window in _blocks(size):
            shape = (len(BANDS), int(window.height), int(window.width))
            if _meets(window, squares, BLOCK):
                block = rng.integers(300, 3000, shape, dtype=np.uint16)
            else:
                block = np.full(shape, 500 + (int(window.row_off) // BLOCK * 7 + int(window.col_off) // BLOCK) % 2000,
                                np.uint16)
            dst.write(block, window=window)


def write_polygons(path: Path, squares) -> None:
    import fiona

    t = _transform()
    schema = {"geometry": "Polygon", "properties": {"class_id": "int"}}
    with fiona.open(path, "w", driver="GPKG", schema=schema, crs=CRS) as dst:
        for row, col, side, value in squares:
            # an irregular pentagon inside the square
            corners = [(col, row + side * 0.3), (col + side * 0.6, row), (col + side, row + side * 0.5),
                       (col + side * 0.7, row + side), (col + side * 0.1, row + side * 0.9)]
            ring = [tuple(t @ xy) for xy in corners]
            dst.write({"geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                       "properties": {"class_id": value}})


def write_class_raster(path: Path, size: int, squares, nodata: int = 0, predicted: bool = False) -> None:
    """uint8 classes block by block: the squares' classes (label raster, nodata elsewhere), or
    for a prediction every pixel classed (1 left of a diagonal, 2 right of it, the squares'
    own class inside them)."""
    import rasterio

    profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint8", "crs": CRS,
               "transform": _transform(), "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
               "compress": "deflate", "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        for window in _blocks(size):
            r0, c0 = int(window.row_off), int(window.col_off)
            h, w = int(window.height), int(window.width)
            if predicted:
                rows, cols = np.ogrid[r0:r0 + h, c0:c0 + w]
                block = np.where(cols > rows, 2, 1).astype(np.uint8)
            else:
                block = np.full((h, w), nodata, np.uint8)
            for row, col, side, value in squares:
                rs = slice(max(row - r0, 0), max(min(row + side - r0, h), 0))
                cs = slice(max(col - c0, 0), max(min(col + side - c0, w), 0))
                block[rs, cs] = value
            dst.write(block, 1, window=window)


# ---------------------------------------------------------------- measurements (child processes)
def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_prepare(image: str, labels: str, field: str | None) -> dict:
    from engine.models.registry import get_backbone_spec
    from engine.protocol import Reporter
    from engine.training import data as _  # noqa: F401 - imported here so the step's time is the data work
    from engine.training.train import TrainConfig, prepare_data

    spec = get_backbone_spec("prithvi_eo_v2_tiny")
    started = time.perf_counter()
    cfg = TrainConfig(images=[image], labels=labels, out=str(Path(image).with_name("model")), label_field=field)
    data = prepare_data(cfg, spec, Reporter("quiet"))
    return {"seconds": time.perf_counter() - started, "chip": data.chip_size,
            "windows": len(data.train_target.windows),
            "label_px": sum(w.index.size for w in data.train_target.windows),
            "train_px": data.train_target.labelled, "val_px": data.val_target.labelled,
            "positions": len(data.train_set.positions)}


def child_evaluate(prediction: str, labels: str, field: str | None) -> dict:
    from engine.evaluate import evaluate

    started = time.perf_counter()
    result = evaluate(prediction, labels, label_field=field)
    return {"seconds": time.perf_counter() - started, "miou": result["miou"], "pixels": result["pixels"]}


def child_imports() -> dict:
    started = time.perf_counter()
    import engine.models  # noqa: F401 - as train does: torchvision fix before lightning loads it
    import engine.training.data  # noqa: F401 - what prepare_data imports (torch, lightning)
    import engine.training.train  # noqa: F401
    return {"seconds": time.perf_counter() - started}


def measure(*args: str) -> dict:
    """Run ``python -m bench.scene_training --child ARGS`` and return its result with its peak RSS."""
    cmd = [sys.executable, "-m", "bench.scene_training", "--child", *args]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        out.seek(0), err.seek(0)
        output, errors = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errors[-3000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    result["maxrss_mib"] = usage.ru_maxrss / 1024
    return result


def run_child(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "imports":
        result = child_imports()
    elif kind == "prepare":
        result = child_prepare(rest[0], rest[1], rest[2] or None)
    else:
        result = child_evaluate(rest[0], rest[1], rest[2] or None)
    result["vmhwm_mib"] = _vm_hwm_mib()
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        run_child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="raster side in pixels (default 20000)")
    parser.add_argument("--workdir", help="where to write the rasters (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    size = args.size
    with tempfile.TemporaryDirectory(prefix="geopeft-scene-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        squares = label_squares(size)
        started = time.perf_counter()
        write_image(folder / "image.tif", size, squares)
        write_polygons(folder / "labels.gpkg", squares)
        write_class_raster(folder / "labels.tif", size, squares)
        write_class_raster(folder / "prediction.tif", size, squares, nodata=255, predicted=True)
        written = time.perf_counter() - started
        image_mib = (folder / "image.tif").stat().st_size / 2 ** 20
        rows = [
            ("imports only (torch, lightning, engine)", "", measure("imports")),
            ("train set-up (prepare_data)", "5 polygons (GeoPackage)",
             measure("prepare", str(folder / "image.tif"), str(folder / "labels.gpkg"), "class_id")),
            ("train set-up (prepare_data)", "uint8 class raster, nodata elsewhere",
             measure("prepare", str(folder / "image.tif"), str(folder / "labels.tif"), "")),
            ("evaluate (uint8 prediction)", "5 polygons (GeoPackage)",
             measure("evaluate", str(folder / "prediction.tif"), str(folder / "labels.gpkg"), "class_id")),
            ("evaluate (uint8 prediction)", "uint8 class raster, nodata elsewhere",
             measure("evaluate", str(folder / "prediction.tif"), str(folder / "labels.tif"), "")),
        ]
    full = size * size * 2 / 2 ** 20
    print(f"\nScene-scale training set-up and evaluation: {size}×{size} px, 6-band uint16 GeoTIFF "
          f"({size * size * 12 / 2 ** 30:.1f} GiB uncompressed, {image_mib:.0f} MiB on disk), "
          f"{len(squares)} labelled areas of about {squares[0][2]}² px, 2 classes; rasters written in "
          f"{written:.0f} s. A full-grid int16 label array alone would take {full:.0f} MiB.\n")
    print("| step | labels | peak RSS (ru_maxrss) | child VmHWM | process wall time (the step alone) | what it kept |")
    print("|---|---|---|---|---|---|")
    for step, labels, r in rows:
        if "chip" in r:
            kept = (f"{r['windows']} label windows, {r['label_px']:,} px; chip {r['chip']}; "
                    f"{r['train_px']:,} training / {r['val_px']:,} validation px; {r['positions']:,} crop positions")
        elif "miou" in r:
            kept = f"{r['pixels']:,} scored px, mIoU {r['miou']:.3f}"
        else:
            kept = ""
        print(f"| {step} | {labels} | {r['maxrss_mib']:.0f} MiB | {r['vmhwm_mib']:.0f} MiB | "
              f"{r['wall']:.1f} s ({r['seconds']:.1f} s) | {kept} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
