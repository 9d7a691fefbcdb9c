"""Previews while training: the model as it stands, predicted on a small area of the map.

``train --preview-dir DIR`` writes ``DIR/preview-<epoch>-<n>.tif`` (a class raster of the preview
area, on the image's grid, with the classes' colours) every ``--preview-every`` epochs and whenever
the caller asks (``--preview-request FILE``: writing that file, a JSON object with an optional
``extent``, asks for one after the current batch, for that extent). Each one is announced by an
``artifact`` event of kind ``preview`` (path, epoch, seconds); the QGIS plugin shows it as a layer
that updates in place. Only the two newest files are kept.

The area: ``--preview-extent`` (a box as ``predict --aoi`` takes it), else the whole image; at
most ``MAX_PIXELS`` pixels around its centre are predicted, so a preview costs seconds, not the
training's time. The prediction is ``predict``'s own tiling (``predict_strips``) with the model in
evaluation mode; training goes on with its exact state (modes restored, no gradients kept).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from engine.data.rasters import RasterStack, atomic_output, colormap
from engine.protocol import EngineError, Reporter

MAX_PIXELS = 1024 * 1024  # about 20 tiles of 224 px: a few seconds on a CPU with a 100M backbone
KEEP = 2  # newest preview files kept in the folder (a layer may still be reading the one before)


def preview_window(grid, extent: str | None) -> tuple[Window, bool]:
    """The pixel window to preview: ``extent`` (a box, see ``engine.inference.aoi``) or the whole
    grid, cut to ``MAX_PIXELS`` around its centre. Returns (window, whether it was cut)."""
    from engine.inference.aoi import union_bounds, load_region

    if extent:
        region = load_region(grid, aoi=extent)  # parses the box (its CRS too) and checks it meets the image
        left, bottom, right, top = union_bounds(region.geometries)
        region.close()
        # the pixels the box covers (to the nearest pixel edge), within the image
        cols, rows = zip(*(~grid.transform @ (x, y) for x in (left, right) for y in (bottom, top)))
        col0, row0 = max(round(min(cols)), 0), max(round(min(rows)), 0)
        col1, row1 = min(round(max(cols)), grid.width), min(round(max(rows)), grid.height)
        window = Window(col0, row0, max(col1 - col0, 0), max(row1 - row0, 0))
    else:
        window = Window(0, 0, grid.width, grid.height)
    w, h = int(window.width), int(window.height)
    if w < 1 or h < 1:
        raise EngineError(f"the preview extent {extent} does not overlap the image",
                          hint="give --preview-extent inside the image (minx,miny,maxx,maxy in its CRS)")
    if w * h <= MAX_PIXELS:
        return window, False
    scale = math.sqrt(MAX_PIXELS / (w * h))
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    return Window(int(window.col_off) + (w - cw) // 2, int(window.row_off) + (h - ch) // 2, cw, ch), True


class _ModelRunner:
    """``predict_strips``' runner around the model being trained: probabilities of a batch."""

    def __init__(self, model: torch.nn.Module, classes: list[dict], bf16: bool):
        self.model, self.card, self.bf16 = model, {"classes": classes}, bf16

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        device = next(self.model.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return torch.softmax(self.model(x).float(), dim=1).cpu().numpy()


class Previews(L.Callback):
    def __init__(self, folder: str | os.PathLike, reporter: Reporter, *, images: list[str], bands: list[int],
                 mean: list[float], std: list[float], chip_size: int, classes: list[dict], every: int = 5,
                 extent: str | None = None, request: str | os.PathLike | None = None, batch_size: int = 8):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.reporter = reporter
        self.images, self.bands, self.mean, self.std = images, bands, mean, std
        self.size, self.classes, self.every, self.batch_size = chip_size, classes, every, batch_size
        self.extent = extent
        self.request = Path(request) if request else None
        self._seen = self._stamp()
        self.count = 0
        self.written: list[Path] = []
        with RasterStack(images, bands) as stack:
            self.window, cut = preview_window(stack.grid, extent)
        if cut:
            reporter.warning(f"the preview area is large: previews cover its central {int(self.window.width)} x "
                             f"{int(self.window.height)} px (zoom in for a preview of the whole view)")

    def _stamp(self):
        try:
            stat = self.request.stat() if self.request else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size) if stat else None

    def _asked(self) -> bool:
        """True once per change of the request file; takes its extent."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            extent = json.loads(self.request.read_text() or "{}").get("extent")
        except (OSError, ValueError, AttributeError):
            extent = None
        if extent and extent != self.extent:
            try:
                with RasterStack(self.images, self.bands) as stack:
                    self.window, _ = preview_window(stack.grid, extent)
                self.extent = extent
            except EngineError as exc:
                self.reporter.warning(f"preview not made: {exc.message}")
                return False
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.request is not None and self._asked():
            self.make(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every > 0 and (trainer.current_epoch + 1) % self.every == 0:
            self.make(trainer, pl_module)

    def make(self, trainer, pl_module) -> Path | None:
        from engine.inference.predict import _Cancelled, output_dtype, predict_strips
        from engine.models.compat import fast_bf16_cpu

        if not trainer.is_global_zero:
            return None
        started = time.monotonic()
        model = pl_module.model
        modes = {m: m.training for m in model.modules()}
        model.eval()
        device = next(model.parameters()).device
        bf16 = "bf16" in str(trainer.precision) and (device.type == "cuda" or fast_bf16_cpu())
        runner = _ModelRunner(model, self.classes, bf16)
        w = self.window
        r0, c0, h, wd = int(w.row_off), int(w.col_off), int(w.height), int(w.width)
        dtype, nodata = output_dtype(self.classes)
        values = np.array([c["value"] for c in self.classes])
        out = np.full((h, wd), nodata, dtype)
        overlap = self.size // 4
        try:
            with RasterStack(self.images, self.bands) as stack:
                grid = stack.grid
                for strip in predict_strips(stack, runner, self.mean, self.std, min(self.size, grid.height,
                                                                                        grid.width),
                                            overlap, self.batch_size, rows=(r0, r0 + h), cols=(c0, c0 + wd),
                                            cancelled=lambda: self.reporter.cancelled):
                    labels = values[strip.probabilities.argmax(0)].astype(dtype)
                    labels[~strip.valid] = nodata
                    rows = slice(strip.row - r0, strip.row - r0 + labels.shape[0])
                    cols = slice(strip.col - c0, strip.col - c0 + labels.shape[1])
                    out[rows, cols] = labels
                transform = rasterio.windows.transform(w, grid.transform)
                crs = grid.crs
        except _Cancelled:
            return None
        finally:
            for module, mode in modes.items():
                module.training = mode
        self.count += 1
        epoch = trainer.current_epoch + 1
        path = self.folder / f"preview-{epoch:03d}-{self.count}.tif"
        profile = {"driver": "GTiff", "width": wd, "height": h, "count": 1, "dtype": dtype, "nodata": nodata,
                   "crs": crs, "transform": transform, "compress": "deflate"}
        with atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.write(out, 1)
            dst.write_colormap(1, colormap(self.classes))
            dst.update_tags(GEOPEFT_CLASSES=json.dumps(self.classes), GEOPEFT_PREVIEW_EPOCH=str(epoch))
        self.written.append(path)
        while len(self.written) > KEEP:  # another program may still hold it open (Windows): then it stays
            with contextlib.suppress(OSError):
                self.written[0].unlink()
            self.written.pop(0)
        seconds = round(time.monotonic() - started, 2)
        self.reporter.artifact("preview", str(path), epoch=epoch, seconds=seconds, classes=self.classes,
                               window=[c0, r0, wd, h])
        return path
