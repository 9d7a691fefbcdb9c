"""What ``predict`` checks before it runs: outputs never overwrite an input, and the raster looks
like what the model was trained on (its card).

Refused: another band count, named bands in another order than in training. Warned about
(the prediction still runs): another kind of values (integers vs floats), band means far from
the training statistics or on another scale, and pixels more than twice as large or small.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from engine.data.rasters import Grid, RasterStack, check_writable
from engine.protocol import EngineError, Reporter

MAX_SIGMAS = 4.0  # a band mean this many training std away from the training mean is suspicious
MAX_SCALE = 10.0  # band means this many times larger or smaller: another scaling of the values
MAX_PIXEL_RATIO = 2.0
_UNNAMED = re.compile(r"(band\s*\d+)?", re.IGNORECASE)  # no name, or a placeholder like "band 3"


def check_outputs(images, **outputs: str | os.PathLike | None) -> None:
    """Refuse an output path that is an input image (or another output), or that could not be
    written (under a file, in a folder without write permission, an existing folder)."""
    seen = {Path(p).resolve(): f"an input image ({p})" for p in images}
    for option, path in outputs.items():
        if not path:
            continue
        option = option.replace("_", "-")  # uncertain_areas: --uncertain-areas
        resolved = Path(path).resolve()
        if resolved in seen:
            raise EngineError(f"--{option} {path} is {seen[resolved]}: writing it would destroy it",
                              hint=f"give --{option} a new file name")
        seen[resolved] = f"the --{option} output"
        check_writable(path, f"--{option}")


def check_image(stack: RasterStack, card: dict, reporter: Reporter) -> None:
    inp = card["input"]
    files = ", ".join(p.name for p in stack.paths)
    if stack.count != len(inp["bands"]):
        raise EngineError(f"the model takes {len(inp['bands'])} bands, the image selection ({files}) has "
                          f"{stack.count}",
                          hint="select the same bands as in training")
    _check_band_names(stack, inp["band_names"], files)
    source_dtype = inp.get("source_dtype")  # cards from before it was recorded have none
    if source_dtype and _family(source_dtype) != _family(stack.dtype):
        reporter.warning(f"the model was trained on {source_dtype} values, {files} holds {stack.dtype}: check "
                         "that the values mean the same (e.g. reflectance 0-1 vs 0-10000)")
    _check_values(stack, inp, files, reporter)
    for warning in stack.value_warnings():
        reporter.warning(warning)
    if "grid" in card:
        _check_pixel_size(stack.grid, card["grid"], files, reporter)


def _family(dtype) -> str:
    return "integer" if np.issubdtype(np.dtype(dtype), np.integer) else "floating-point"


def _check_band_names(stack: RasterStack, trained: list[str], files: str) -> None:
    def named(seq):  # None where a band has no real name
        return [None if _UNNAMED.fullmatch((n or "").strip()) else n.strip().upper() for n in seq]

    here, want = named(stack.band_names), named(trained)
    if all(h == w for h, w in zip(here, want) if h and w):
        return  # as trained, without loading the alias table (engine.models imports torch)
    from engine.models.registry import canonical_band

    def canonical(seq):
        return [canonical_band(n) if n else None for n in seq]

    here, want = canonical(here), canonical(want)
    for i, (h, w) in enumerate(zip(here, want)):
        if h and w and h != w:
            available = canonical(named(stack.all_band_names))
            if all(w and w in available for w in want):
                order = ",".join(str(available.index(w) + 1) for w in want)
                fix = f"select the bands in training order: --bands {order}"
            else:
                fix = "select the bands the model was trained on, in the same order (--bands), or fix the " \
                      "band descriptions if these are the same bands"
            raise EngineError(f"{files}: band {i + 1} is {stack.band_names[i]}, the model was trained on "
                              f"{trained[i]} (training bands: {', '.join(trained)})", hint=fix)


def _check_values(stack: RasterStack, inp: dict, files: str, reporter: Reporter) -> None:
    sample = stack.sample().astype(np.float64)
    if sample.shape[1] == 0:
        return
    here, mean, std = sample.mean(axis=1), np.asarray(inp["mean"]), np.asarray(inp["std"])
    names = [n or f"band {b}" for n, b in zip(inp["band_names"], inp["bands"])]
    off = [f"{n} mean {h:.3g} here vs {m:.3g} ± {s:.3g} in training"
           for n, h, m, s in zip(names, here, mean, std) if abs(h - m) > MAX_SIGMAS * s]
    # one factor across the bands whose training mean is clearly not zero: a change of scaling
    scaled = np.abs(mean) > std / 10
    ratio = float(np.median(np.abs(here[scaled]) / np.abs(mean[scaled]))) if scaled.any() else 1.0
    if ratio > 0 and not 1 / MAX_SCALE < ratio < MAX_SCALE:
        factor = 10 ** round(abs(math.log10(ratio)))
        means = ", ".join(f"{n} {h:.3g} vs {m:.3g}" for n, h, m in zip(names, here, mean))
        off = [f"band means look about {factor:g}× {'smaller' if ratio < 1 else 'larger'} than in training "
               f"({means}): another scaling (e.g. reflectance 0-1 vs 0-10000)"]
    if off:
        reporter.warning(f"{files} does not look like the training data: {'; '.join(off)}. Check the bands "
                         "and their scaling: predictions on other values can be meaningless")


def _check_pixel_size(grid: Grid, trained: dict, files: str, reporter: Reporter) -> None:
    then = Grid(CRS.from_wkt(trained["crs"]) if trained.get("crs") else None, Affine(*trained["transform"][:6]),
                trained["width"], trained["height"])
    here, before, unit = grid.pixel_size_m(), then.pixel_size_m(), "m"
    if grid.crs is None and then.crs is None:  # no units on either side: compare the numbers
        here, before, unit = abs(grid.transform.a), abs(then.transform.a), "units"
    if not here or not before:
        return
    ratio = here / before
    if not 1 / MAX_PIXEL_RATIO <= ratio <= MAX_PIXEL_RATIO:
        roughly = " (roughly: one grid is in degrees)" if grid.crs and then.crs and \
            grid.crs.is_geographic != then.crs.is_geographic else ""
        reporter.warning(f"{files}: pixel size {here:.3g} {unit} here vs {before:.3g} {unit} in training{roughly} "
                         f"({max(ratio, 1 / ratio):.2g}× {'coarser' if ratio > 1 else 'finer'}): the model sees "
                         "objects at another scale; resample the image to the training pixel size")


def check_band_count(images, bands: list[int] | None, card: dict) -> None:
    """Before the stack is opened without ``--bands``: images with fewer bands than the model's
    band selection reaches (a 4-band raster for a 6-band model), explained in the model's terms.
    Unreadable images are left to ``RasterStack``, which names them."""
    if bands:
        return  # --bands given: check_image compares the counts
    import rasterio

    total = 0
    for path in images:
        try:
            with rasterio.open(path) as ds:
                total += ds.count
        except Exception:  # noqa: BLE001 - reported by RasterStack
            return
    inp = card["input"]
    wanted = inp["bands"]
    if max(wanted) <= total:
        return
    files = ", ".join(Path(p).name for p in images)
    names = ", ".join(n or f"band {b}" for n, b in zip(inp["band_names"], wanted))
    if total >= len(wanted):
        hint = (f"select the model's {len(wanted)} bands ({names}) of {files} in training order with --bands, "
                f"e.g. --bands {','.join(str(i) for i in range(1, len(wanted) + 1))} if they are its first ones")
    else:
        hint = (f"predict on imagery with all {len(wanted)} of the model's bands ({names}): add the missing "
                f"{len(wanted) - total} (rasters on the same grid given as more --image are stacked), then select "
                f"them in training order with --bands; or train a model on the {total} band(s) you have")
    raise EngineError(f"{files} has {total} band(s), the model takes {len(wanted)} (bands "
                      f"{','.join(map(str, wanted))} of the training images: {names})", hint=hint)
