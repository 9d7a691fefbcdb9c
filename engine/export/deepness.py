"""``export --profile deepness``: an ONNX model the Deepness QGIS plugin
(https://github.com/PUTvision/qgis-plugin-deepness) loads and runs unchanged.

What Deepness does with a model (read in its source, commit f450c63):

- ``processing/models/model_base.py`` ``ModelBase.__init__``: exactly one input; its shape is
  read as ``[batch, channels, height, width]`` (a string batch dimension means dynamic batch,
  ``get_model_batch_size``), channels from ``shape[-3]`` and the tile size from the last two.
- ``ModelBase.preprocessing`` (with ``preprocessing_utils.py``): tiles arrive NHWC in the
  raster's own data type, keep the first ``channels`` bands, become ``float32(x * 1/255)``, then
  ``(x - mean) / std`` with the float32 ``standardization_mean``/``std`` metadata (0 and 1 when
  absent), then NCHW.
- ``processing/models/segmentor.py`` and ``map_processor_segmentation.py``: a 4-D output
  ``[batch, classes, H, W]`` of probabilities; values below the probability threshold are set to
  0, then argmax over classes.
- Metadata, each value ``json.loads``-ed (``ModelBase.get_metadata_*``): ``model_type``
  (``str(value).capitalize()`` must name a model class: ``"Segmentor"``), ``class_names`` (a
  dict of consecutive integer keys), ``resolution`` (cm per pixel), ``tile_size``,
  ``tiles_overlap`` (percent, an int), ``standardization_mean``/``std`` (lists of floats),
  ``seg_thresh`` and ``seg_small_segment`` (0 unticks the threshold and the small-segment filter,
  ``deepness_dockwidget.py`` ``_load_default_model_parameters``; the dock ticks both by default,
  0.5 and 9 px).
- ``python_requirements/requirements.txt``: onnxruntime 1.12.1 to 1.17.0, so IR ≤ 9 and
  opset ≤ 20 (1.17); the opset 17 / IR 8 GeoPEFT writes also loads in 1.12.

Pixel scaling is baked into the graph rather than left to Deepness's standardization metadata.
Both give the same probabilities: Deepness standardises after dividing by 255, so metadata of
mean/255 and std/255 would be equivalent. But metadata is easy to lose (Deepness's own
``tools/add_model_metadata.py`` writes a fresh set of keys), and then the model would silently
see unnormalised values; with the conversion inside, the graph alone is the contract, and the
standardization metadata is written as the identity (0 and 1) so nothing is applied twice.
"""
from __future__ import annotations

import json
import math

import numpy as np

from engine.data.chips import normalise
from engine.protocol import EngineError, Reporter

# Not GeoPEFT's card key: GeoPEFT's own predict would feed this model normalised values.
CARD_KEY = "geopeft_deepness_card"
MAX_IR_VERSION = 9
MAX_OPSET = 20
# GeoPEFT's predict overlaps tiles by a quarter tile by default; Deepness takes percent.
TILES_OVERLAP_PERCENT = 25
EIGHT_BIT_NOTE = ("the Deepness profile suits 8-bit imagery only: Deepness reads every band as "
                  "uint8 values divided by 255, and the model expects exactly that")


def check_source_dtype(card: dict, force: bool, reporter: Reporter) -> None:
    """Refuse a model trained on anything but uint8 pixels unless ``force``."""
    reporter.warning(EIGHT_BIT_NOTE)
    source = card["input"].get("source_dtype")
    if source == "uint8":
        return
    what = f"{source} pixels" if source else "pixels of an unrecorded type (a card from before it was kept)"
    message = f"the model was trained on {what}, Deepness documents uint8 input only"
    if not force:
        raise EngineError(message, hint="train on 8-bit imagery for Deepness, or pass --force to export "
                                        "anyway (the model undoes Deepness's ÷255, so other integer types "
                                        "work only while Deepness keeps dividing them by 255 unclipped)")
    reporter.warning(message + "; exporting anyway (--force): Deepness divides other types by 255 "
                               "too, which the model undoes, but its documentation does not promise it")


def resolution_cm_per_px(grid: dict | None) -> tuple[float | None, str]:
    """Pixel size of the training grid in cm (Deepness's ``resolution``), or None and why not."""
    if not grid or not grid.get("crs"):
        return None, "the model card records no CRS for the training raster"
    from rasterio.crs import CRS

    crs = CRS.from_wkt(grid["crs"])
    if not crs.is_projected:
        return None, "the training raster's CRS is not projected (its units are not a length)"
    _unit, metres_per_unit = crs.linear_units_factor
    a, b, _c, d, e, _f = grid["transform"][:6]
    size_units = math.sqrt(abs(a * e - b * d))  # side of a square pixel of the same area
    return round(size_units * metres_per_unit * 100, 4), ""


def metadata(card: dict, reporter: Reporter) -> dict[str, str]:
    """The metadata Deepness reads, each value JSON-encoded as it ``json.loads`` them."""
    channels, size = len(card["input"]["bands"]), int(card["chip_size"])
    meta = {
        "model_type": json.dumps("Segmentor"),
        "class_names": json.dumps({str(i): c["name"] for i, c in enumerate(card["classes"])}),
        # ModelBase.get_metadata_tile_size reads tile_size; Deepness's docs and its
        # tools/add_model_metadata.py write tiles_size. The input shape fixes it anyway.
        "tile_size": json.dumps(size),
        "tiles_size": json.dumps(size),
        "tiles_overlap": json.dumps(TILES_OVERLAP_PERCENT),
        "standardization_mean": json.dumps([0.0] * channels),  # scaling is in the graph
        "standardization_std": json.dumps([1.0] * channels),
        "seg_thresh": json.dumps(0),  # plain argmax, as GeoPEFT predicts
        "seg_small_segment": json.dumps(0),  # no smoothing
    }
    resolution, why_not = resolution_cm_per_px(card.get("grid"))
    if resolution is None:
        reporter.warning(f"no 'resolution' in the Deepness metadata: {why_not}; set the processing "
                         "resolution (cm/px) in Deepness by hand")
    else:
        meta["resolution"] = json.dumps(resolution)
    return meta


def normalised(pixels: np.ndarray, card: dict) -> np.ndarray:
    """GeoPEFT's normalisation of raw chips (N, bands, H, W), as ``predict`` applies it."""
    valid = np.ones(pixels.shape[-2:], bool)
    return np.stack([normalise(chip.astype(np.float32), valid, card["input"]["mean"], card["input"]["std"])
                     for chip in pixels])


def wrap_input(model, mean, std):
    """A module that takes Deepness's input, raw/255, and gives ``model`` (raw − mean)/std:
    x·(255/std) − mean/std, one multiply-add per pixel."""
    import torch

    class FromDeepnessScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
            m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
            self.register_buffer("scale", (255.0 / s).float())
            self.register_buffer("shift", (-m / s).float())
            self.model = model

        def forward(self, x):
            return self.model(x * self.scale + self.shift)

    return FromDeepnessScale().eval()


def limit_versions(proto) -> None:
    """IR ≤ 9 and opset ≤ 20 (onnxruntime 1.17, the newest Deepness installs)."""
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    if opsets.get("ai.onnx", 0) > MAX_OPSET:
        raise EngineError(f"the exported graph uses opset {opsets['ai.onnx']}, Deepness's onnxruntime "
                          f"reads up to {MAX_OPSET}", hint="please report this model configuration")
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION  # the checker and the parity run below validate it
