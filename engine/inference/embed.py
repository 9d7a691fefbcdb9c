"""``embed``: a foundation model's patch features as a GeoTIFF, for clustering or similarity search.

The encoder is a trained model folder's (its backbone with its tuned adapters and patch
embedding, its bands and normalisation: the card's) or a registered backbone (weights as in
training: ``--weights`` auto/hub/none/file, bands matched to the pretrained ones by name,
mean/std from a sample of the raster). Its last layer's patch tokens (CLS dropped) give one
vector per patch, so the output grid is the input grid coarsened by the patch size: pixel =
patch × input pixel, width = ceil(W / patch), same origin and CRS.

Tiles of the model's chip size start on the patch grid and overlap by a margin of a quarter
tile on every side; only each tile's centre patches are kept, so no output patch comes from a
tile border (except at the raster's own edges, where the tile reaches over the edge and sees
padding). Tiles are read one by one (GDAL's block cache sized for a strip) and output rows are
written as they are finished, in whole output blocks: memory is a batch of tiles plus a few
output rows, whatever the raster's size. A patch whose input pixels are all nodata is nodata.

``components`` K > 0: a PCA to K bands ("PC 1" … by decreasing variance), fitted on the patch
features of a bounded, seeded sample of tiles (a first pass), applied while writing. 0: every
feature ("feature 1" …; 192 to 1280 bands by backbone). The PCA is numpy's SVD: scikit-learn is
not an engine dependency, and a centred SVD of a few thousand vectors is all it takes.

A cancel is checked before every batch; the output is written under a temporary name and
renamed only when complete, so a cancelled run leaves nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from engine.data.chips import normalise
from engine.data.rasters import RasterStack, atomic_output, block_cache
from engine.inference.checks import check_band_count, check_image, check_outputs
from engine.protocol import EngineError, Reporter

DEFAULT_COMPONENTS = 8  # --components: a PCA small enough to view and cluster; 0 keeps every feature
BACKBONE_CHIP = 224  # tile size with a bare backbone: the size the Prithvi models were pretrained on
NODATA = -9999.0  # float32 output: far outside LayerNorm'd features and their principal components
PCA_TILES = 64  # tiles of the first pass that fit the PCA (spread over the raster, seeded)
PCA_SAMPLES = 20000  # patch vectors kept for the fit
ROW_BLOCK = 16  # output block height: rows are written in whole blocks, each block once


@dataclass
class Encoder:
    """What embedding needs of a model: the encoder, its tile size and patch, the bands it reads
    (1-based, of the stacked images; None: all) and their normalisation."""

    module: object  # torch module: [B, C, S, S] → list of [B, D, S/p, S/p] (last = last layer)
    size: int
    patch: int
    dim: int
    bands: list[int] | None
    mean: list[float] | None = None  # None: computed from the raster
    std: list[float] | None = None
    source: dict = field(default_factory=dict)  # what the output's tags say it was made with
    card: dict | None = None  # a trained model's card (its checks run on the raster)


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise EngineError("--device gpu was asked for but PyTorch sees no GPU", hint="use --device auto or cpu")
        return torch.device("cuda")
    return torch.device(device)


def is_backbone(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a registered backbone (and no file or folder of that name exists)."""
    from engine.models.registry import BACKBONES

    return str(name) in BACKBONES and not Path(name).exists()


def model_encoder(model: str | os.PathLike, bands: list[int] | None, reporter: Reporter,
                  trust_checkpoint: bool = False) -> Encoder:
    """The encoder of a trained model folder (or its card.json): its backbone with the tuned
    adapters and patch embedding merged in, as prediction loads it (``load_trained_model``)."""
    if str(model).lower().endswith(".onnx"):
        raise EngineError(f"embed needs the model folder, not an ONNX file ({model}): the ONNX graph ends in "
                          "class probabilities, the patch features are inside it",
                          hint="pass the trained model folder (card.json + adapter.safetensors)")
    from engine.card import read_card
    from engine.inference.runners import load_trained_model
    from engine.tuning import merge

    card, folder = read_card(model)
    segmentor = merge(load_trained_model(card, folder, reporter, trust_checkpoint))
    encoder = segmentor.encoder
    inp = card["input"]
    return Encoder(encoder, int(card["chip_size"]), encoder.patch_size, encoder.embed_dim,
                   bands or inp["bands"], inp["mean"], inp["std"],
                   {"model": str(Path(folder).resolve()), "backbone": card["backbone"]["name"]}, card)


def backbone_encoder(name: str, stack: RasterStack, band_names: list[str] | None, weights: str | None,
                     chip_size: int | None, reporter: Reporter, trust_checkpoint: bool = False,
                     seed: int = 0) -> Encoder:
    """A registered backbone for the stack's bands: pretrained channels matched by band name and
    weights resolved exactly as ``train`` does; random weights (``none``) seeded, so they repeat."""
    import torch

    from engine.models.checkpoints import load_backbone_weights, resolve_weights
    from engine.models.registry import get_backbone_spec
    from engine.models.families import build_encoder
    from engine.training.train import _band_names

    spec = get_backbone_spec(name)
    size = int(chip_size or BACKBONE_CHIP)
    if size % spec.patch_size or size < 2 * spec.patch_size:
        raise EngineError(f"chip size {size} does not suit {spec.name}",
                          hint=f"use a multiple of {spec.patch_size} of at least {2 * spec.patch_size} (e.g. 224)")
    names = _band_names(stack, band_names, spec, reporter)
    path = resolve_weights(spec, weights, reporter)
    torch.manual_seed(seed)
    encoder = build_encoder(spec, names, size)
    loaded = load_backbone_weights(encoder, spec, path, names, reporter, trust=trust_checkpoint)
    source = {"backbone": spec.name, "weights": loaded.source if path is None or weights not in ("auto", "hub") and not str(weights).startswith("hf://")
              else "hub", "weights_path": loaded.path, "band_names": names}
    return Encoder(encoder, size, spec.patch_size, spec.embed_dim, None, source=source)


def sample_statistics(stack: RasterStack) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the valid pixels in windows spread over the raster (``sample``)."""
    values = stack.sample().astype(np.float64)
    if values.shape[1] == 0:
        raise EngineError("no valid pixels in the windows sampled for the normalisation statistics",
                          hint="check the band selection and the rasters' nodata value")
    std = values.std(axis=1)
    return values.mean(axis=1).tolist(), np.where(std > 1e-6, std, 1.0).tolist()


@dataclass
class Tiling:
    """Tiles of ``size`` px on the patch grid: tile (i, j) starts ``margin`` patches before output
    patch (i·keep, j·keep) and gives its ``keep`` × ``keep`` centre patches."""

    size: int
    patch: int
    rows: int  # output grid (patches)
    cols: int

    @property
    def n(self) -> int:
        return self.size // self.patch

    @property
    def margin(self) -> int:
        return self.n // 4

    @property
    def keep(self) -> int:
        return self.n - 2 * self.margin

    @property
    def tile_rows(self) -> int:
        return math.ceil(self.rows / self.keep)

    @property
    def tile_cols(self) -> int:
        return math.ceil(self.cols / self.keep)

    def window(self, i: int, j: int) -> Window:
        p, k, m = self.patch, self.keep, self.margin
        return Window((j * k - m) * p, (i * k - m) * p, self.size, self.size)


class _Cancelled(Exception):
    pass


def _features(enc: Encoder, tiling: Tiling, stack: RasterStack, tiles: list[tuple[int, int]], batch_size: int,
              device, reporter: Reporter, on_batch) -> Iterator[tuple]:
    """For each tile (i, j) with a valid pixel in its centre: (i, j, features [D, keep, keep],
    valid patches [keep, keep]), computed in batches; cancel checked before each batch."""
    import torch

    m, k, n, p = tiling.margin, tiling.keep, tiling.n, tiling.patch
    batch: list = []

    def run():
        if reporter.cancelled:
            raise _Cancelled
        x = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
        try:
            with torch.inference_mode():
                out = enc.module(x)[-1][:, :, m:m + k, m:m + k].float().cpu().numpy()
        except Exception as exc:  # the batch that failed: out-of-memory advice (engine.reliability)
            with contextlib.suppress(AttributeError):
                exc.geopeft_batch = len(batch)
            raise
        for (i, j, _, ok), f in zip(batch, out):
            yield i, j, f, ok
        on_batch(len(batch))
        batch.clear()

    for i, j in tiles:
        if reporter.cancelled:  # also between tiles with nothing to run
            raise _Cancelled
        data, valid = stack.read(tiling.window(i, j))
        ok = valid.reshape(n, p, n, p).any(axis=(1, 3))[m:m + k, m:m + k]
        if not ok.any():  # nothing to embed: all nodata (or outside the raster)
            on_batch(0, skipped=1)
            continue
        batch.append((i, j, normalise(data, valid, enc.mean, enc.std, out=data), ok))
        if len(batch) >= batch_size:
            yield from run()
    if batch:
        yield from run()


def fit_pca(samples: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [D], components [K, D] by decreasing variance, variance of each [K]) of ``samples``
    [N, D]; each component's sign is fixed (its largest loading positive) so runs agree."""
    mean = samples.mean(axis=0)
    _, s, vt = np.linalg.svd(samples - mean, full_matrices=False)
    vt = vt[:components]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    vt *= np.where(signs == 0, 1, signs)[:, None]
    variance = s[:components] ** 2 / max(len(samples) - 1, 1)
    return mean, vt, variance


class _RowWriter:
    """Output rows in order, written in whole blocks of ``ROW_BLOCK`` rows (each block once)."""

    def __init__(self, dst, bands: int, width: int):
        self.dst, self.bands, self.width = dst, bands, width
        self.rows: list[np.ndarray] = []
        self.row = 0  # the first row not written yet

    def add(self, rows: np.ndarray) -> None:
        self.rows.append(rows)
        held = sum(r.shape[1] for r in self.rows)
        if held >= ROW_BLOCK:
            self._write(held // ROW_BLOCK * ROW_BLOCK)

    def _write(self, count: int) -> None:
        data = np.concatenate(self.rows, axis=1)
        self.dst.write(data[:, :count], window=Window(0, self.row, self.width, count))
        self.row += count
        self.rows = [data[:, count:]] if data.shape[1] > count else []

    def close(self) -> None:
        held = sum(r.shape[1] for r in self.rows)
        if held:
            self._write(held)


def _run_embedding(model_or_backbone: str | os.PathLike, images: list[str], out: str | os.PathLike,
                   components: int | None = DEFAULT_COMPONENTS, weights: str | None = "auto",
                   bands: list[int] | None = None, band_names: list[str] | None = None,
                   chip_size: int | None = None, batch_size: int = 8, device: str = "auto",
                   trust_checkpoint: bool = False, seed: int = 0, reporter: Reporter | None = None,
                   backbone: bool | None = None) -> dict:
    reporter = reporter or Reporter("quiet")
    started = time.monotonic()
    components = DEFAULT_COMPONENTS if components is None else int(components)
    if components < 0:
        raise EngineError(f"--components {components} must be 0 (every feature) or more")
    if batch_size < 1:
        raise EngineError(f"--batch-size {batch_size} must be at least 1")
    images = [str(i) for i in (images if isinstance(images, (list, tuple)) else [images])]
    check_outputs(images, out=out)
    backbone = is_backbone(model_or_backbone) if backbone is None else backbone
    if not backbone and (weights not in (None, "auto") or band_names or chip_size):
        raise EngineError("--weights, --band-names and --chip-size go with --backbone; a trained model folder "
                          "brings its own", hint="leave them out with --model")
    reporter.progress("prepare", 1, 3, "loading the model")
    import engine.models  # noqa: F401 - torchvision fix before timm

    dev = _device(device)
    if backbone:
        stack = RasterStack(images, bands)
        try:
            enc = backbone_encoder(str(model_or_backbone), stack, band_names, weights, chip_size, reporter,
                                   trust_checkpoint, seed)
        except BaseException:
            stack.close()
            raise
    else:
        enc = model_encoder(model_or_backbone, bands, reporter, trust_checkpoint)
        check_band_count(images, bands, enc.card)
        stack = RasterStack(images, enc.bands)
    enc.module.eval().to(dev)
    with stack, contextlib.ExitStack() as scope:
        if enc.card is not None:
            check_image(stack, enc.card, reporter)
        stack.check_has_data()
        if enc.mean is None:
            reporter.progress("prepare", 2, 3, "normalisation statistics from a sample of the raster")
            enc.mean, enc.std = sample_statistics(stack)
        grid = stack.grid
        tiling = Tiling(enc.size, enc.patch, math.ceil(grid.height / enc.patch), math.ceil(grid.width / enc.patch))
        if components > enc.dim:
            raise EngineError(f"--components {components} is more than the {enc.dim} features of the model",
                              hint=f"give at most {enc.dim}, or 0 for every feature")
        bands_out = components or enc.dim
        scope.enter_context(block_cache(grid.width, enc.size + 512, stack.pixel_bytes))
        all_tiles = [(i, j) for i in range(tiling.tile_rows) for j in range(tiling.tile_cols)]
        rng = np.random.default_rng(seed)
        sampled = (sorted(map(tuple, rng.permutation(all_tiles)[:PCA_TILES].tolist()))
                   if components else [])
        total = len(sampled) + len(all_tiles)
        done = [0]

        def step(ran: int, skipped: int = 0) -> None:
            done[0] += ran + skipped
            reporter.progress("embed", done[0], total, tiles=done[0])

        pca = None
        if components:
            reporter.progress("embed", 0, total, "sampling patch features for the PCA")
            vectors = [f[:, ok].T for _, _, f, ok in _features(enc, tiling, stack, sampled, batch_size, dev,
                                                                reporter, step)]
            samples = np.concatenate(vectors) if vectors else np.zeros((0, enc.dim), np.float32)
            if len(samples) > PCA_SAMPLES:
                samples = samples[np.sort(rng.choice(len(samples), PCA_SAMPLES, replace=False))]
            if len(samples) < components:
                raise EngineError(f"the raster gives only {len(samples)} valid patches, too few for {components} "
                                  "principal components", hint="ask for fewer --components (or 0: every feature)")
            pca = fit_pca(samples.astype(np.float64), components)
            del samples, vectors
        profile = {"driver": "GTiff", "width": tiling.cols, "height": tiling.rows, "count": bands_out,
                   "dtype": "float32", "nodata": NODATA, "crs": grid.crs,
                   "transform": grid.transform @ Affine.scale(enc.patch),
                   "tiled": True, "blockxsize": 256, "blockysize": ROW_BLOCK, "compress": "deflate",
                   "predictor": 3, "BIGTIFF": "IF_SAFER"}
        k = tiling.keep
        with atomic_output(out) as tmp:
            with rasterio.open(tmp, "w", **profile) as dst:
                for b in range(bands_out):
                    dst.set_band_description(b + 1, f"PC {b + 1}" if components else f"feature {b + 1}")
                tags = {"GEOPEFT_EMBEDDING": json.dumps({**enc.source, "patch_size": enc.patch, "chip_size": enc.size,
                                                         "components": components or None, "nodata": NODATA})}
                if pca is not None:
                    tags["GEOPEFT_PCA_VARIANCE"] = json.dumps([round(float(v), 6) for v in pca[2]])
                dst.update_tags(**tags)
                writer = _RowWriter(dst, bands_out, tiling.cols)

                def output_rows(i: int) -> np.ndarray:  # the rows of tile row i, nodata until filled
                    return np.full((bands_out, min(k, tiling.rows - i * k), tiling.cols), NODATA, np.float32)

                # one pass over every tile in row order (batches run across tile rows); a tile row's
                # output rows are written once a tile of a later row comes (or the pass ends)
                current, rows = 0, output_rows(0)
                for i, j, f, ok in _features(enc, tiling, stack, all_tiles, batch_size, dev, reporter, step):
                    while i > current:
                        writer.add(rows)
                        current += 1
                        rows = output_rows(current)
                    if pca is not None:
                        mean, vt, _ = pca
                        f = np.einsum("kd,dhw->khw", vt, f - mean[:, None, None].astype(np.float32))
                    height, left = rows.shape[1], j * k
                    right = min(left + k, tiling.cols)
                    f, ok = f[:, :height, :right - left], ok[:height, :right - left]
                    rows[:, :, left:right] = np.where(ok, f, NODATA)
                writer.add(rows)
                for i in range(current + 1, tiling.tile_rows):
                    writer.add(output_rows(i))
                writer.close()
    seconds = time.monotonic() - started
    variance = [float(v) for v in pca[2]] if pca is not None else None
    reporter.artifact("embedding", str(out), bands=bands_out, components=components or None,
                      patch_size=enc.patch, nodata=NODATA, explained_variance=variance)
    return {"out": str(out), "width": tiling.cols, "height": tiling.rows, "bands": bands_out,
            "components": components or None, "features": enc.dim, "patch_size": enc.patch, "chip_size": enc.size,
            "tiles": len(all_tiles), "seconds": round(seconds, 2), "device": str(dev),
            "explained_variance": variance, **{k: v for k, v in enc.source.items() if k in ("model", "backbone")}}


def embed(model_or_backbone, images, out, **kwargs) -> dict:
    """Write the patch features of ``images`` (paths on one grid, stacked) under ``model_or_backbone``
    (a trained model folder or its card.json, or a registered backbone name) to the GeoTIFF ``out``.
    Keyword options: ``components`` (PCA bands, default ``DEFAULT_COMPONENTS``; 0: every feature),
    ``weights`` (backbone only: auto, hub, none or a checkpoint file), ``bands`` (1-based; default the
    card's, or all), ``band_names`` and ``chip_size`` (backbone only), ``batch_size``, ``device``,
    ``trust_checkpoint``, ``seed`` (the PCA sample and random weights), ``reporter``, ``backbone``
    (True/False: ``model_or_backbone`` is a backbone name / a model; default: a registered name is).
    A cancel through the reporter stops before the next batch and leaves no output behind."""
    try:
        return _run_embedding(model_or_backbone, images, out, **kwargs)
    except _Cancelled:
        return {"out": None, "cancelled": True}
