"""predict --devices 2 --strategy ddp: two CPU processes (Lightning DDP, gloo) each predict a band
of rows into their own files, rank 0 mosaics them (VRT) and writes the usual outputs. Through
the CLI, as the plugin runs it: Lightning starts the second process by running the command again."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

import engine.models  # noqa: F401 - torchvision fix before Lightning
from engine.inference.distributed import plan_processes, row_blocks, share, write_mosaic
from engine.inference.predict import predict
from engine.inference.runners import cpu_count
from engine.protocol import EngineError
from tests.conftest import run_engine

OUTPUTS = {"out": "classes.tif", "probabilities": "probabilities.tif", "uncertainty": "uncertainty.tif"}


def test_two_processes_equal_one(tiny_model, small_scene, tmp_path):
    """With an area of interest across the two processes' rows: outside is nodata in both
    processes' files, and neither file's nodata may cover the other's pixels in the mosaic."""
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
    with rasterio.open(small_scene.image) as src:
        grid = (src.crs, src.transform, src.width, src.height)
        (left, top), (right, bottom) = src.transform @ (10, 20), src.transform @ (70, 80)  # rows 20-80 of 96
    aoi = f"{left},{min(top, bottom)},{right},{max(top, bottom)}"
    # the reference in this process (one process, as always), the two processes through the CLI
    one = predict(tiny_model, [small_scene.image], tmp_path / "one" / OUTPUTS["out"], device="cpu", aoi=aoi,
                  **{k: tmp_path / "one" / v for k, v in OUTPUTS.items() if k != "out"})
    args = ["predict", "--model", tiny_model, "--image", small_scene.image, "--device", "cpu", "--aoi=" + aoi,
            "--devices", "2", "--strategy", "ddp",
            *[a for k, v in OUTPUTS.items() for a in (f"--{k}", tmp_path / "two" / v)]]
    two = run_engine(*args, timeout=300)
    assert sum(1 for e in two["_events"] if e["event"] == "start") == 1  # only rank 0 reports
    assert two["processes"] == 2 and one["processes"] == 1
    assert (two["tiles"], two["tiles_run"]) == (one["tiles"], one["tiles_run"])
    kinds = {e["kind"] for e in two["_events"] if e["event"] == "artifact"}
    assert kinds == {"raster", "probabilities", "uncertainty", "style"}
    for name in OUTPUTS.values():
        with rasterio.open(tmp_path / "one" / name) as a, rasterio.open(tmp_path / "two" / name) as b:
            assert (b.crs, b.transform, b.width, b.height) == grid
            assert b.driver == "GTiff" and b.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert b.overviews(1) == a.overviews(1)
            assert (b.dtypes, b.nodatavals, b.descriptions, b.tags()) == (a.dtypes, a.nodatavals, a.descriptions,
                                                                         a.tags())
            np.testing.assert_array_equal(b.read(), a.read())  # pixel for pixel, across the process boundary
            if name == "classes.tif":
                assert b.colormap(1) == a.colormap(1)
                valid = b.read(1) != b.nodata
                # predicted inside the AOI, in both processes' rows (48 each), nodata outside
                assert valid[20:48, 10:70].all() and valid[48:80, 10:70].all() and valid.sum() == 60 * 60
    # nothing else beside the outputs: no process files, mosaics, records or hidden folders
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([*OUTPUTS.values(), "classes.qml"])


def test_bad_combinations_are_refused(tiny_model, small_scene, tmp_path):
    out = tmp_path / "x" / "classes.tif"
    done = run_engine("predict", "--model", tiny_model, "--image", small_scene.image, "--out", out,
                      "--devices", "2", "--device", "gpu", expect_ok=False)  # this machine has no GPU
    error = next(e for e in done["_events"] if e["event"] == "error")
    assert done["_rc"] == 2 and "no CUDA GPU" in error["message"]
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    for device, devices, nodes, strategy, words in (("cpu", "2", 1, "fsdp", "--strategy fsdp"),
                                                    ("cpu", "0", 1, "ddp", "--devices 0"),
                                                    ("cpu", "two", 1, "ddp", "--devices two"),
                                                    ("cpu", "2", 0, "ddp", "--num-nodes 0"),
                                                    ("cpu", str(cpu_count() + 1), 1, "ddp", "cores")):
        with pytest.raises(EngineError, match=words):
            plan_processes(device, devices, nodes, strategy)
    assert plan_processes("cpu", "1", 1, "ddp") is None  # one process: predicted as usual, without Lightning
    assert plan_processes("cpu", "2", 1, "auto").processes == 2


def test_blocks_and_shares_cover_the_raster_once():
    for height, processes in ((96, 2), (1000, 3), (20, 4), (5000, 7)):
        blocks = row_blocks(height, 512, 32, 8, 4, processes)
        assert blocks[0][0] == 0 and blocks[-1][1] == height
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # consecutive, no gap, no overlap
        runs = [share(len(blocks), processes, r) for r in range(processes)]
        assert [i for run in runs for i in run] == list(range(len(blocks)))  # contiguous runs in rank order
        assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_mosaic_keeps_each_part_rows(tmp_path):
    """Parts side by side: a part's nodata never hides its neighbour's pixels."""
    from engine.data.rasters import Grid

    transform = rasterio.Affine(10, 0, 500000, 0, -10, 6000000)
    profile = {"driver": "GTiff", "width": 7, "count": 1, "dtype": "uint8", "nodata": 255, "crs": "EPSG:32633"}
    full = np.arange(7 * 10, dtype=np.uint8).reshape(10, 7)
    full[3, 2] = 255  # a nodata pixel inside a part stays nodata
    parts = []
    for i, (top, end) in enumerate(((0, 4), (4, 10))):
        path = tmp_path / f"part{i}.tif"
        with rasterio.open(path, "w", height=end - top, transform=transform @ rasterio.Affine.translation(0, top),
                           **profile) as dst:
            dst.write(full[top:end], 1)
            dst.update_tags(GEOPEFT_CLASSES="[]")
        parts.append((path, (top, end)))
    with rasterio.open(parts[0][0]) as src:
        grid = Grid(crs=src.crs, transform=transform, width=7, height=10)
    write_mosaic(tmp_path / "m.vrt", parts, grid)
    with rasterio.open(tmp_path / "m.vrt") as vrt:
        assert (vrt.crs, vrt.transform, vrt.nodata, vrt.tags()["GEOPEFT_CLASSES"]) == (src.crs, transform, 255, "[]")
        np.testing.assert_array_equal(vrt.read(1), full)


def test_cancel_stops_every_process_and_leaves_nothing(tiny_model, tmp_path):
    """SIGTERM to rank 0 (what the plugin sends) mid-prediction: done(cancelled), exit 0, the other
    process ends too, and neither outputs nor the processes' folder remain."""
    import json
    import signal
    import subprocess
    import sys

    from engine.data.demo import make_demo_scene
    from tests.conftest import ENGINE_ENV, REPO

    scene = make_demo_scene(tmp_path / "scene", size=512, seed=3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine", "predict", "--model", str(tiny_model), "--image", str(scene.image),
           "--out", str(out / "classes.tif"), "--probabilities", str(out / "p.tif"), "--device", "cpu",
           "--devices", "2", "--events", "jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENGINE_ENV)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1]["stage"] == "predict":
            proc.send_signal(signal.SIGTERM)
            break
    events += [json.loads(line) for line in proc.stdout]
    rc = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert rc == 0 and events[-1]["event"] == "done" and events[-1]["cancelled"] is True, stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())  # no output, no partial file, no hidden folder
    still = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).count(str(out / "classes.tif"))]
    assert not still  # the second process has ended as well


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
