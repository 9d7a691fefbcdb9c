"""``predict``: a whole raster, tile by tile, in bounded memory.

The raster is processed one row of tiles at a time (the shared tiling rule, ``tile_starts``):
a strip as tall as a tile and as wide as the raster is read, its tiles run in batches, their
probabilities blended with ``blend_weights`` into a rolling accumulator, and the rows no later
tile can touch are written out. Memory is O(tile × raster width), not O(raster).
Outputs are on exactly the input grid; nodata input pixels stay nodata. Before it runs, the
raster is checked against the model card (``checks``).

An area of interest (``aoi``: a bounding box or polygons) and/or a ``mask`` raster limit where it
predicts (``aoi.Region``, rasterised per strip): tiles with no pixel inside are never run, strips
with none are not even read, and pixels outside are nodata in every output. The outputs stay on
the full input grid. Tiles inside still see the image around the AOI, so predictions inside
equal those of a prediction of the whole raster. Cancel is checked before every batch.

The same loop writes the optional per-class probabilities and per-pixel uncertainty. The rasters
are then copied as cloud-optimised GeoTIFFs with overviews, the class raster optionally
vectorised into a GeoPackage, the most uncertain squares listed in another (``uncertain``: where
to label next; the uncertainty is streamed for them even when not kept), and a QGIS style
written beside it (``outputs``); every file is renamed into place only when all of them are
complete.

``devices``/``num_nodes`` > 1 predict in several processes (``distributed``: Lightning DDP, each
process a band of rows into its own files, joined by rank 0 with a VRT), then the same tail
(``finish_outputs``); one process, the default, never starts Lightning.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from engine.data.chips import blend_weights, normalise, tile_starts
from engine.data.rasters import RasterStack, atomic_output, block_cache, colormap
from engine.inference.aoi import load_region
from engine.inference.checks import check_band_count, check_image, check_outputs
from engine.inference.outputs import (POLYGON_LAYER, UNCERTAINTY_NODATA, _PolygonsCancelled, check_output_options,
                                      style_path, to_cog, uncertainty_uint8, write_polygons, write_style)
from engine.inference.runners import load_runner
from engine.inference.uncertain import AREAS_LAYER, AreasCancelled, check_area_options, write_uncertain_areas
from engine.protocol import EngineError, Reporter

PROBABILITY_NODATA = 255
DEFAULT_AREA_COUNT = 10  # --uncertain-areas without --area-count
PANEL = 4096  # the widest strip predicted at once (pixels, whole blocks): flat memory on any width


def output_dtype(classes: list[dict]) -> tuple[str, int]:
    """(dtype, nodata) holding every class value plus a nodata value none of them uses."""
    values = [int(c["value"]) for c in classes]
    if min(values) >= 0 and max(values) <= 254:
        return "uint8", 255
    if min(values) >= 0 and max(values) < 65535:
        return "uint16", 65535
    return "int32", -2147483648


def _run_prediction(model: str | os.PathLike, images: list[str], out: str | os.PathLike,
                   probabilities: str | os.PathLike | None = None, uncertainty: str | os.PathLike | None = None,
                   polygons: str | os.PathLike | None = None, min_area: float | None = None,
                   simplify: float | None = None, batch_size: int = 8, overlap: int | None = None,
                   device: str = "auto", bands: list[int] | None = None, precision: str = "auto",
                   aoi: str | os.PathLike | None = None, aoi_layer: str | None = None,
                   mask: str | os.PathLike | None = None, devices: int | str = 1, num_nodes: int = 1,
                   strategy: str = "auto", trust_checkpoint: bool = False, reporter: Reporter | None = None,
                   uncertain_areas: str | os.PathLike | None = None, area_count: int | None = None,
                   area_size: int | None = None) -> dict:
    reporter = reporter or Reporter("quiet")
    started = time.monotonic()
    check_output_options(polygons, min_area, simplify)
    _check_area_options(uncertain_areas, area_count, area_size)
    style = style_path(out)
    check_outputs([*images, *([mask] if mask else [])], out=out, probabilities=probabilities, uncertainty=uncertainty, polygons=polygons,
                  style=style, uncertain_areas=uncertain_areas)
    plan = None
    if _asks_for_processes(devices, num_nodes, strategy):
        try:
            from engine.inference import distributed  # PyTorch and Lightning: only here
        except ImportError as exc:
            raise EngineError(f"prediction in several processes needs PyTorch and Lightning ({exc})",
                              hint="install the engine's full environment, or predict with --devices 1") from None
        plan = distributed.plan_processes(device, devices, num_nodes, strategy)
    # Several processes: this runner serves the checks; each process loads its own (its device, its cores).
    runner = load_runner(model, "cpu" if plan else device, reporter, precision, trust_checkpoint=trust_checkpoint)
    card = runner.card
    classes = card["classes"]
    size = int(card["chip_size"])
    overlap = size // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < size // 2 + 1:
        raise EngineError(f"--overlap {overlap} must be between 0 and half a tile ({size // 2})")
    stride = size - overlap
    inp = card["input"]
    job = Job(model=str(model), classes=classes, values=np.array([c["value"] for c in classes]),
              dtype_nodata=output_dtype(classes), size=size, overlap=overlap, batch_size=batch_size,
              mean=inp["mean"], std=inp["std"], trust_checkpoint=trust_checkpoint)
    polygon_summary = None
    processes = 1
    check_band_count(images, bands, card)
    with RasterStack(images, bands or inp["bands"]) as stack, contextlib.ExitStack() as inputs:
        # GDAL's block cache sized for strips: flat memory however large the raster
        # (a strip touches at most two 256-row blocks besides its own rows)
        inputs.enter_context(block_cache(min(stack.grid.width, PANEL + size), size + 512, stack.pixel_bytes + np.dtype(
            job.dtype_nodata[0]).itemsize + (len(classes) if probabilities else 0) + (1 if uncertainty or uncertain_areas else 0)))
        check_image(stack, card, reporter)
        stack.check_has_data()
        grid = stack.grid
        region = load_region(grid, aoi, aoi_layer, mask)
        if region is not None:
            inputs.callback(region.close)
        H, W = grid.height, grid.width
        total_tiles = len(tile_starts(H, size, stride)) * len(tile_starts(W, size, stride))
        # the uncertain areas are found in the uncertainty raster: streamed even when not kept
        wanted = [name for name, path in (("out", out), ("probabilities", probabilities),
                                          ("uncertainty", uncertainty or uncertain_areas)) if path]
        if plan is not None:
            # Every process predicts its rows into its own files in a hidden folder beside ``out``
            # (removed on leaving, also on failure or cancel); rank 0 gets their mosaics (VRTs).
            done = distributed.predict_distributed(plan, job, stack, region, wanted, Path(out), runner, precision,
                                                   reporter, inputs)
            if done is None:  # not rank 0: its part is written, rank 0 writes the outputs
                return {}
            runner, sources, run_tiles, processes = done.runner, done.sources, done.run_tiles, done.processes
        with contextlib.ExitStack() as outputs:
            # Every output goes to a temporary name, renamed onto its path only if all succeed. The
            # rasters are streamed into scratch GeoTIFFs (or mosaicked from the processes' files),
            # then copied to their temporary names as cloud-optimised GeoTIFFs (overviews need the
            # finished raster).
            tmp = {name: outputs.enter_context(atomic_output(path)) for name, path in
                   (("out", out), ("probabilities", probabilities), ("uncertainty", uncertainty),
                    ("polygons", polygons), ("uncertain_areas", uncertain_areas), ("style", style)) if path}
            if plan is None:
                sources = {}
                for name in wanted:
                    # an uncertainty asked for only for the areas: a scratch name beside ``out``'s
                    stem = tmp[name].stem if name in tmp else f"{tmp['out'].stem}.{name}"
                    sources[name] = tmp["out"].with_name(stem + ".stream.tif")
                    outputs.callback(_unlink, sources[name])
                run_tiles = 0
                done_tiles = 0
                with open_outputs(sources, job, grid) as (dst, pdst, udst), \
                        StripWriter(dst, pdst, udst, job.values, job.nodata) as writer:
                    for panel in panels(W, size):
                        for strip in predict_strips(stack, runner, inp["mean"], inp["std"], size, overlap,
                                                    batch_size, region, cols=panel,
                                                    cancelled=lambda: reporter.cancelled):
                            writer.submit(strip)  # argmax, percentages and writes overlap the next tiles
                            run_tiles += strip.run
                            done_tiles += strip.tiles
                            reporter.progress("predict", done_tiles, total_tiles, tiles=done_tiles, run=run_tiles)
            if region is not None and run_tiles == 0:
                reporter.warning("no valid image pixel inside the area of interest / mask: every output "
                                 "is nodata")
            areas = (area_size or size, area_count or DEFAULT_AREA_COUNT) if uncertain_areas else None
            polygon_summary, areas_summary = finish_outputs(sources, tmp, classes, polygons, min_area, simplify,
                                                            reporter, areas=areas)
    seconds = time.monotonic() - started
    nodata = job.nodata
    reporter.artifact("raster", str(out), classes=classes, nodata=nodata)
    if probabilities:
        reporter.artifact("probabilities", str(probabilities), classes=classes, nodata=PROBABILITY_NODATA)
    if uncertainty:
        reporter.artifact("uncertainty", str(uncertainty), nodata=UNCERTAINTY_NODATA,
                          measure="normalised entropy × 100")
    if polygons:
        reporter.artifact("polygons", str(polygons), layer=POLYGON_LAYER, **polygon_summary)
    if uncertain_areas:
        reporter.artifact("uncertain_areas", str(uncertain_areas), layer=AREAS_LAYER, **areas_summary)
    reporter.artifact("style", str(style), of=str(out))
    return {"out": str(out), "probabilities": str(probabilities) if probabilities else None,
            "uncertainty": str(uncertainty) if uncertainty else None,
            "polygons": str(polygons) if polygons else None, "style": str(style),
            "uncertain_areas": str(uncertain_areas) if uncertain_areas else None,
            "area_count": areas_summary["areas"] if uncertain_areas else None,
            "polygon_count": polygon_summary["polygons"] if polygon_summary else None,
            "tiles": total_tiles, "tiles_run": run_tiles, "seconds": round(seconds, 2), "runner": type(runner).__name__,
            "precision": "bf16" if getattr(runner, "bf16", False) else (getattr(runner, "quantize", None) or "fp32"),
            "device": str(runner.device), "provider": getattr(runner, "provider", None), "processes": processes,
            "classes": classes}


@dataclass
class Job:
    """What every process of a prediction needs besides the raster: the model's classes and
    output types, its tile size, overlap, batch size and normalisation."""

    model: str
    classes: list[dict]
    values: np.ndarray
    dtype_nodata: tuple[str, int]
    size: int
    overlap: int
    batch_size: int
    mean: list[float]
    std: list[float]
    trust_checkpoint: bool = False  # --trust-checkpoint: each process loads the model with it

    @property
    def dtype(self) -> str:
        return self.dtype_nodata[0]

    @property
    def nodata(self) -> int:
        return self.dtype_nodata[1]


@contextlib.contextmanager
def open_outputs(paths: dict, job: Job, grid, rows: tuple[int, int] | None = None):
    """Open the streamed GeoTIFFs ``paths`` (keys ``out``, ``probabilities``, ``uncertainty``)
    for writing, with their nodata, band descriptions, tags and colour table; yields
    (class, probabilities, uncertainty) datasets, None for those not asked for. ``rows`` =
    (first, end): files holding only those raster rows (a process's part), else the whole grid."""
    first, end = rows or (0, grid.height)
    profile = {"driver": "GTiff", "width": grid.width, "height": end - first, "crs": grid.crs,
               "transform": grid.transform @ Affine.translation(0, first),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    classes = job.classes
    with contextlib.ExitStack() as opened:
        def create(name, **kw):
            return opened.enter_context(rasterio.open(paths[name], "w", **kw, **profile)) if name in paths else None

        dst = create("out", count=1, dtype=job.dtype, nodata=job.nodata)
        pdst = create("probabilities", count=len(classes), dtype="uint8", nodata=PROBABILITY_NODATA)
        udst = create("uncertainty", count=1, dtype="uint8", nodata=UNCERTAINTY_NODATA)
        dst.set_band_description(1, "class")
        dst.update_tags(GEOPEFT_CLASSES=json.dumps(classes), GEOPEFT_MODEL=job.model)
        if job.dtype in ("uint8", "uint16"):
            dst.write_colormap(1, colormap(classes))
        if pdst:
            for k, c in enumerate(classes):
                pdst.set_band_description(k + 1, f"P({c['name']}) %")
            pdst.update_tags(GEOPEFT_CLASSES=json.dumps(classes), scale="percent")
        if udst:
            udst.set_band_description(1, "uncertainty %")
            udst.update_tags(GEOPEFT_CLASSES=json.dumps(classes), scale="percent",
                             measure="normalised entropy of the blended class probabilities")
        yield dst, pdst, udst


def finish_outputs(sources: dict, tmp: dict, classes: list[dict], polygons, min_area, simplify,
                   reporter: Reporter, areas: tuple[int, int] | None = None) -> tuple[dict | None, dict | None]:
    """The finished rasters ``sources`` (streamed GeoTIFFs or mosaics) → cloud-optimised GeoTIFFs
    at their temporary names ``tmp``, then the uncertain areas (``areas`` = (square size,
    count): from the uncertainty, kept or not), the polygons and the style. Returns the
    polygons' and the areas' summaries (None for those not asked for). Raises ``_Cancelled``
    when the reporter is cancelled."""
    for name, resampling in (("out", "NEAREST"), ("probabilities", "AVERAGE"), ("uncertainty", "AVERAGE")):
        if name in sources and name in tmp:
            if reporter.cancelled:
                raise _Cancelled
            to_cog(sources[name], tmp[name], resampling)
            _unlink(sources[name])
    areas_summary = None
    if areas:
        reporter.progress("uncertain_areas", 0, None, "finding the most uncertain areas")
        try:
            areas_summary = write_uncertain_areas(tmp["uncertainty"] if "uncertainty" in tmp else
                                                  sources["uncertainty"], tmp["uncertain_areas"], *areas,
                                                  cancelled=lambda: reporter.cancelled)
        except AreasCancelled:
            raise _Cancelled from None
        if "uncertainty" not in tmp:  # only streamed for the areas
            _unlink(sources["uncertainty"])
    polygon_summary = None
    if polygons:
        reporter.progress("polygons", 0, None, "vectorising the class raster")
        try:
            polygon_summary = write_polygons(tmp["out"], tmp["polygons"], classes, min_area, simplify,
                                             cancelled=lambda: reporter.cancelled)
        except _PolygonsCancelled:
            raise _Cancelled from None
        if reporter.cancelled:
            raise _Cancelled
    write_style(tmp["style"], classes)
    return polygon_summary, areas_summary


def _check_area_options(uncertain_areas, area_count, area_size) -> None:
    """Refuse bad --uncertain-areas options before anything is predicted."""
    from pathlib import Path as _Path

    if uncertain_areas is not None and _Path(uncertain_areas).suffix.lower() != ".gpkg":
        raise EngineError(f"--uncertain-areas {uncertain_areas} must be a GeoPackage (.gpkg)",
                          hint="give --uncertain-areas a name ending in .gpkg")
    if uncertain_areas is None and (area_count is not None or area_size is not None):
        raise EngineError("--area-count and --area-size apply to the uncertain areas, but no --uncertain-areas "
                          "output was asked for", hint="add --uncertain-areas areas.gpkg, or drop them")
    check_area_options(area_size, area_count)


def _asks_for_processes(devices, num_nodes, strategy) -> bool:
    """Whether ``devices``/``num_nodes`` (and a strategy) ask for anything but today's single
    process; bad values go to ``plan_processes``, which says what is wrong."""
    return str(devices).strip() not in ("1", "") or str(num_nodes).strip() != "1" or \
        str(strategy).strip().lower() not in ("auto", "ddp")


@dataclass
class Strip:
    """Finished output rows [row, row + n) of columns [col, col + w): blended probabilities
    [K, n, w] and the pixels that get a prediction [n, w]; ``tiles`` tiles of the grid belong to
    it, ``run`` tiles ran for it."""

    row: int
    probabilities: np.ndarray
    valid: np.ndarray
    tiles: int
    run: int
    col: int = 0  # the first output column (a panel's)


def panels(width: int, size: int, panel: int | None = None) -> list[tuple[int, int]]:
    """Column ranges [first, end) that cut a raster wider than ``panel`` (default ``PANEL``) + a
    tile into panels of ``panel`` columns (whole 256-px blocks: no output block is written from
    two panels)."""
    panel = panel or PANEL
    if width <= panel + size:
        return [(0, width)]
    cuts = list(range(0, width, panel))
    if width - cuts[-1] < size:  # no sliver narrower than a tile at the end
        cuts.pop()
    return list(zip(cuts, cuts[1:] + [width]))


def predict_strips(stack: RasterStack, runner, mean, std, size: int, overlap: int, batch_size: int,
                   region=None, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                   cancelled: Callable[[], bool] = lambda: False) -> Iterator[Strip]:
    """Predict a raster one row of tiles at a time, yielding each strip of finished output rows.

    ``rows`` = (first, end) and ``cols`` = (first, end) limit the output to those raster rows and
    columns: only the tiles that touch them run, with exactly the tiles, weights and order of a
    whole-raster run, so ranges that split a raster give the same pixels as one run (processes
    split rows, ``panels`` split columns so memory does not grow with the raster's width). A
    reader thread reads and normalises the next strip (GDAL and numpy release the GIL) while the
    model runs on this one. Raises ``_Cancelled`` when ``cancelled()`` turns true (checked before
    every batch)."""
    grid = stack.grid
    H, W = grid.height, grid.width
    first, end = rows or (0, H)
    left, right = cols or (0, W)
    right = min(right, W)
    stride = size - overlap
    all_cols = tile_starts(W, size, stride)
    cols_run = [c for c in all_cols if c < right and c + size > left]  # tiles touching the columns
    owned = sum(left <= c < right for c in all_cols)  # tiles counted here (each once over panels)
    x0 = cols_run[0]
    width = max(cols_run[-1] + size - x0, size)
    all_rows = tile_starts(H, size, stride)
    # output row y is final once the last tile row starting at or before it has run
    finals = [(r, all_rows[i + 1] if i + 1 < len(all_rows) else H) for i, r in enumerate(all_rows)]
    todo_rows = [(r, f) for r, f in finals if r < end and r + size > first]
    weights = blend_weights(size, overlap)
    K = len(runner.card["classes"])
    acc = np.zeros((K, size, width), np.float32)
    wsum = np.zeros((size, width), np.float32)
    a0, a1 = left - x0, right - x0  # the output columns in the strip

    def read(r: int):
        strip = Window(x0, r, width, size)
        inside = region.inside(strip) if region is not None else None
        if inside is not None and not inside.any():  # nothing to predict: not even read
            return None, inside
        data, valid = stack.read(strip)
        x = normalise(data, valid, mean, std, out=data)  # the model sees the image around the region too
        return x, valid if inside is None else valid & inside

    with ThreadPoolExecutor(1, thread_name_prefix="geopeft-reader") as reader:
        pending = reader.submit(read, todo_rows[0][0]) if todo_rows else None
        base = todo_rows[0][0] if todo_rows else 0
        for i, (r, final) in enumerate(todo_rows):
            if cancelled():
                raise _Cancelled
            x, valid = pending.result()
            if i + 1 < len(todo_rows):
                pending = reader.submit(read, todo_rows[i + 1][0])
            shift = r - base
            if shift:  # roll the accumulator down to the new strip
                acc[:, :size - shift] = acc[:, shift:]
                acc[:, size - shift:] = 0
                wsum[:size - shift] = wsum[shift:]
                wsum[size - shift:] = 0
                base = r
            todo = [c - x0 for c in cols_run if valid[:, c - x0:c - x0 + size].any()]  # skip empty tiles
            for b in range(0, len(todo), batch_size):
                if cancelled():
                    raise _Cancelled
                chunk = todo[b:b + batch_size]
                try:
                    probs = runner(np.stack([x[:, :, c:c + size] for c in chunk]))
                except Exception as exc:  # the batch that failed: out-of-memory advice (engine.reliability)
                    with contextlib.suppress(AttributeError):
                        exc.geopeft_batch = len(chunk)
                    raise
                for c, p in zip(chunk, probs):
                    acc[:, :, c:c + size] += p * weights
                    wsum[:, c:c + size] += weights
            top, bottom = max(r, first), min(final, end, H)
            if bottom > top:
                a, b = top - r, bottom - r
                yield Strip(top, acc[:, a:b, a0:a1] / np.maximum(wsum[a:b, a0:a1], 1e-12),
                            valid[a:b, a0:a1] & (wsum[a:b, a0:a1] > 0), owned, len(todo), left)


class StripWriter:
    """Writes strips (class, probabilities, uncertainty) on a writer thread, one strip behind
    the model; an error in a write is raised at the next ``submit`` or on leaving."""

    def __init__(self, dst, pdst, udst, values: np.ndarray, nodata, row0: int = 0):
        self.dst, self.pdst, self.udst = dst, pdst, udst
        self.values, self.nodata = values, nodata
        self.row0 = row0  # the raster row the datasets' first row is (a process's part of the raster)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="geopeft-writer")
        self._pending = None

    def _write(self, strip: Strip) -> None:
        p, ok = strip.probabilities, strip.valid
        window = Window(strip.col, strip.row - self.row0, ok.shape[1], ok.shape[0])
        labels = self.values[p.argmax(0)].astype(self.dst.dtypes[0])
        labels[~ok] = self.nodata
        self.dst.write(labels, 1, window=window)
        if self.pdst:
            pct = np.round(p * 100).astype(np.uint8)
            pct[:, ~ok] = PROBABILITY_NODATA
            self.pdst.write(pct, window=window)
        if self.udst:
            self.udst.write(uncertainty_uint8(p, ok), 1, window=window)

    def submit(self, strip: Strip) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, strip)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        try:
            if kind is None:
                self._wait()
            elif self._pending is not None:  # already failing: let the write end, keep the first error
                self._pending.exception()
        finally:
            self._pool.shutdown(wait=True)


class _Cancelled(Exception):
    pass


def _unlink(path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def predict(model, images, out, **kwargs) -> dict:
    """Predict ``images`` (paths on one grid) with ``model`` (model folder, its card.json, or an
    .onnx file) into the GeoTIFF ``out`` (cloud-optimised, with a QGIS style ``out.qml`` beside
    it). Keyword options: ``probabilities``, ``uncertainty`` (GeoTIFF paths), ``polygons``
    (GeoPackage path) with ``min_area`` and ``simplify`` (CRS units), ``batch_size``, ``overlap``
    (pixels), ``device``, ``bands``, ``precision``, ``trust_checkpoint`` (a model folder's backbone
    checkpoint may be unpickled: see ``engine.models.checkpoints``), ``aoi`` (``minx,miny,maxx,maxy`` in the image's
    CRS, ``…@EPSG:code`` in another, or a polygon vector file) with ``aoi_layer``, ``mask`` (a
    raster on the image's grid, non-zero = predict), ``uncertain_areas`` (GeoPackage path: the
    most uncertain squares, layer ``uncertain_areas``) with ``area_count`` (default 10) and
    ``area_size`` (pixels; default the model's chip size), ``reporter``.
    ``devices`` × ``num_nodes`` > 1 (``strategy`` auto or ddp) predicts in that many processes
    with Lightning DDP (``engine.inference.distributed``): Lightning starts the other processes by
    running the calling command again, so call it from a script or ``python -m engine``.
    A cancel through the reporter stops cleanly and leaves no output behind."""
    try:
        return _run_prediction(model, images, out, **kwargs)
    except _Cancelled:
        return {"out": None, "cancelled": True}
