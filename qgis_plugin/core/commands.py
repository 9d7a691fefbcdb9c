"""Engine commands as plain dataclasses, and the one function per command that builds its argv.

Dialogs and Processing algorithms only fill these dataclasses; tests assert the argv they make.
The argv is what follows ``<python> -m engine``; ``engine_client`` adds the interpreter, the
module and the protocol flags (``--events jsonl``, ``--cancel-on-stdin``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import parse_duration as _parse_duration

# The engine's backbone registry (`engine models`; a test keeps the two in sync),
# with each model's patch size: the chip size must be a multiple of it.
PATCH_SIZES = {
    "prithvi_eo_v2_tiny": 16, "prithvi_eo_v2_100": 16, "prithvi_eo_v2_300": 16,
    "prithvi_eo_v2_300_tl": 16, "prithvi_eo_v2_600": 14, "prithvi_eo_v2_600_tl": 14,
    "prithvi_eo_v1_100": 16, "clay_v1": 8, "clay_v1_5": 8, "decur_rn50_s2": 32, "decur_rn50_s1": 32,
}
BACKBONES = tuple(PATCH_SIZES)
# The choices `train` accepts, as `engine models` reports them ("auto", the engine's default,
# first). Dialogs use the engine's lists when it has answered; these are the offline fallback
# (a test keeps them equal to the engine's).
TUNING_METHODS = ("auto", "lora", "dora", "vpt", "vit-adapter", "full", "linear-probe")
DECODERS = ("auto", "unet", "upernet", "fcn", "linear")
# How dialogs and Processing show them; a choice a newer engine adds shows under its own name.
TUNING_LABELS = {"auto": "Automatic (LoRA with pretrained weights, else full)", "lora": "LoRA",
                 "dora": "DoRA", "vpt": "VPT (visual prompt tuning)",
                 "vit-adapter": "ViT-Adapter (spatial prior around the frozen ViT)", "full": "Full fine-tuning",
                 "linear-probe": "Linear probe (frozen backbone)"}
DECODER_LABELS = {"auto": "Automatic (linear head for linear probe, else UNet)", "unet": "UNet",
                  "upernet": "UPerNet", "fcn": "FCN", "linear": "Linear head (light)"}
DEVICES = ("auto", "cpu", "gpu")


def _num(value: float) -> str:
    """A float without noise: 0.0001 -> '0.0001', 1e-05 -> '1e-05'."""
    return format(value, "g")


@dataclass
class TrainConfig:
    """None (and "auto") leave the choice to the engine: the plugin never copies its defaults."""

    images: list[str]
    labels: str
    out: str
    bands: list[int] = field(default_factory=list)  # 1-based; empty: all bands
    band_names: list[str] = field(default_factory=list)
    label_field: str | None = None
    classes: list[dict] | None = None  # [{"value", "name", "colour"}], passed as --classes JSON
    ignore_index: int | None = None
    backbone: str = "prithvi_eo_v2_tiny"
    weights: str = "auto"  # a path, hf://OWNER/REPO/FILE, "auto" (download/cache) or "none" (random init)
    tuning: str = "auto"  # auto: LoRA on pretrained weights, full fine-tuning on random ones
    frames: int = 1  # dates in the stacked rasters (one raster per date, the same bands each)
    metadata: bool = False  # -TL models: feed the acquisition dates and the scene centre
    dates: list[str] = field(default_factory=list)  # YYYY-MM-DD per frame; empty: the rasters' tags
    decoder: str = "auto"  # auto: linear head for linear-probe, else UNet
    chip_size: int | None = None  # None: chosen by the engine from the labelled extent
    epochs: int | None = None  # None: the engine's default
    max_time: str | None = None  # "90s", "5m", "1h"
    batch_size: int = 8
    lr: float | None = None  # None: the engine's default for the tuning method
    val_fraction: float | None = None
    device: str = "auto"
    seed: int | None = None
    # continue training from this model folder: the engine keeps its backbone, weights, tuning,
    # decoder, bands and chip size (those options are then left out)
    init_from: str | None = None
    # previews on the map while training (engine: train --preview-*)
    preview_dir: str | None = None
    preview_every: int | None = None  # epochs; 0: only when asked through preview_request
    preview_extent: str | None = None  # aoi_box(): in the image's CRS or with @EPSG
    preview_request: str | None = None


@dataclass
class PredictConfig:
    model: str  # trained folder, its card.json, or model.onnx
    images: list[str]
    out: str
    probabilities: str | None = None
    uncertainty: str | None = None  # GeoTIFF: normalised entropy 0-100, where to label next
    polygons: str | None = None  # GeoPackage (.gpkg), layer "predictions"
    min_area: float | None = None  # with polygons: drop smaller regions (CRS units²)
    bands: list[int] = field(default_factory=list)  # 1-based; empty: the card's band numbers
    batch_size: int | None = None
    device: str = "auto"
    # where to predict (outside: nodata; tiles outside never run). aoi: a box "minx,miny,maxx,maxy"
    # in the image's CRS, "minx,miny,maxx,maxy@EPSG:code" in another, or a polygon vector file
    # (aoi_layer: its layer, for multi-layer files); mask: a raster on the image's grid, non-zero
    # = predict. Both may be given: the engine predicts where both say so.
    aoi: str | None = None
    aoi_layer: str | None = None
    mask: str | None = None
    # where to label next: the most uncertain squares (GeoPackage, layer "uncertain_areas": rank,
    # mean_uncertainty, valid_fraction); area_count (engine default 10) and area_size (pixels;
    # engine default: the model's chip size)
    uncertain_areas: str | None = None
    area_count: int | None = None
    area_size: int | None = None


@dataclass
class ExportConfig:
    model: str
    out: str


@dataclass
class EvaluateConfig:
    prediction: str
    labels: str
    label_field: str | None = None
    ignore_index: int | None = None
    out: str | None = None
    report: str | None = None  # the HTML report (engine: evaluate --report; charts drawn by the engine)


@dataclass
class EmbedConfig:
    """The foundation model's patch features as a GeoTIFF (engine: embed). Either ``model`` (a
    trained folder or its card.json) or ``backbone`` (a name from `engine models`, with
    ``weights``: a path, "auto" or "none"); None leaves the choice to the engine."""

    images: list[str]
    out: str
    model: str | None = None
    backbone: str | None = None
    weights: str | None = None  # with backbone; None: the engine's default (auto)
    bands: list[int] = field(default_factory=list)  # 1-based; empty: the model's, or all
    components: int | None = None  # PCA bands; 0: every feature; None: the engine's default
    batch_size: int | None = None
    device: str = "auto"


def train_args(c: TrainConfig) -> list[str]:
    args = ["train"]
    for image in c.images:
        args += ["--image", image]
    if c.bands and not c.init_from:
        args += ["--bands", ",".join(str(b) for b in c.bands)]
    if c.band_names and not c.init_from:
        args += ["--band-names", ",".join(c.band_names)]
    args += ["--labels", c.labels]
    if c.label_field:
        args += ["--label-field", c.label_field]
    if c.classes:
        args += ["--classes", classes_json(c.classes)]
    if c.ignore_index is not None:
        args += ["--ignore-index", str(c.ignore_index)]
    if c.init_from:  # the parent model decides the model choices
        args += ["--init-from", c.init_from]
    else:
        args += ["--backbone", c.backbone, "--weights", c.weights or "auto", "--tuning", c.tuning or "auto"]
        if c.decoder and c.decoder != "auto":
            args += ["--decoder", c.decoder]
        if c.chip_size:
            args += ["--chip-size", str(c.chip_size)]
        if c.frames > 1:
            args += ["--frames", str(c.frames)]
        if c.metadata:
            args += ["--metadata"] + (["--date", ",".join(c.dates)] if c.dates else [])
    if c.epochs:
        args += ["--epochs", str(c.epochs)]
    if c.max_time:
        args += ["--max-time", c.max_time]
    args += ["--batch-size", str(c.batch_size)]
    if c.lr:
        args += ["--lr", _num(c.lr)]
    if c.val_fraction is not None:
        args += ["--val-fraction", _num(c.val_fraction)]
    args += ["--device", c.device]
    if c.seed is not None:
        args += ["--seed", str(c.seed)]
    if c.preview_dir:
        args += ["--preview-dir", c.preview_dir]
        if c.preview_every is not None:
            args += ["--preview-every", str(c.preview_every)]
        if c.preview_extent:
            args += [f"--preview-extent={c.preview_extent}"]  # '=': a box may start with a minus sign
        if c.preview_request:
            args += ["--preview-request", c.preview_request]
    args += ["--out", c.out]
    return args


def classes_json(classes: list[dict]) -> str:
    """The engine's --classes: [{"value": int, "name": str, "colour": "#rrggbb"}], compact."""
    return json.dumps([{"value": int(c["value"]), "name": str(c["name"]), "colour": str(c["colour"])}
                       for c in classes], separators=(",", ":"), ensure_ascii=False)


def predict_args(c: PredictConfig) -> list[str]:
    args = ["predict", "--model", c.model]
    for image in c.images:
        args += ["--image", image]
    if c.bands:
        args += ["--bands", ",".join(str(b) for b in c.bands)]
    args += ["--out", c.out]
    if c.probabilities:
        args += ["--probabilities", c.probabilities]
    if c.uncertainty:
        args += ["--uncertainty", c.uncertainty]
    if c.polygons:
        args += ["--polygons", c.polygons]
        if c.min_area:
            args += ["--min-area", _num(c.min_area)]
    if c.aoi:
        # a box may start with a minus sign: as "--aoi=-10.5,…" argparse takes it for a value
        args += [f"--aoi={c.aoi}"] if c.aoi.startswith("-") else ["--aoi", c.aoi]
        if c.aoi_layer:
            args += ["--aoi-layer", c.aoi_layer]
    if c.mask:
        args += ["--mask", c.mask]
    if c.uncertain_areas:
        args += ["--uncertain-areas", c.uncertain_areas]
        if c.area_count:
            args += ["--area-count", str(int(c.area_count))]
        if c.area_size:
            args += ["--area-size", str(int(c.area_size))]
    if c.batch_size:
        args += ["--batch-size", str(c.batch_size)]
    args += ["--device", c.device]
    return args


def aoi_box(xmin: float, ymin: float, xmax: float, ymax: float, authid: str | None = None) -> str:
    """The engine's --aoi box: 'minx,miny,maxx,maxy' (each coordinate exactly, shortest form),
    with '@EPSG:code' when it is in another CRS than the image's."""
    def coord(v: float) -> str:
        text = repr(float(v))
        return text[:-2] if text.endswith(".0") else text
    box = ",".join(coord(v) for v in (xmin, ymin, xmax, ymax))
    return f"{box}@{authid}" if authid else box


def parse_aoi_box(text: str) -> tuple[float, float, float, float] | None:
    """(minx, miny, maxx, maxy) of an --aoi box ('@CRS' ignored), None if ``text`` is no box."""
    values = text.split("@", 1)[0].split(",")
    if len(values) != 4:
        return None
    try:
        minx, miny, maxx, maxy = (float(v) for v in values)
    except ValueError:
        return None
    return minx, miny, maxx, maxy


MASK_SUFFIXES = (".tif", ".tiff", ".vrt")


def export_args(c: ExportConfig) -> list[str]:
    return ["export", "--model", c.model, "--out", c.out]


def embed_args(c: EmbedConfig) -> list[str]:
    args = ["embed"]
    if c.model:
        args += ["--model", c.model]
    else:
        args += ["--backbone", c.backbone or ""]
        if c.weights:
            args += ["--weights", c.weights]
    for image in c.images:
        args += ["--image", image]
    if c.bands:
        args += ["--bands", ",".join(str(b) for b in c.bands)]
    args += ["--out", c.out]
    if c.components is not None:
        args += ["--components", str(int(c.components))]
    if c.batch_size:
        args += ["--batch-size", str(c.batch_size)]
    args += ["--device", c.device]
    return args


def validate_embed(c: EmbedConfig) -> list[str]:
    problems = []
    if bool(c.model) == bool(c.backbone):
        problems.append("Choose either a trained model folder or a foundation model, not both.")
    if c.model:
        problem = model_path_problem(c.model)
        if problem:
            problems.append(problem)
        elif c.model.lower().endswith(".onnx"):
            problems.append("Embeddings need the trained model folder (card.json), not an ONNX file.")
    if c.weights not in (None, "auto", "none", "hub") and not os.path.isfile(c.weights):
        problems.append(f"Weights file not found: {c.weights}")
    if not c.images:
        problems.append("Choose the raster to embed.")
    for image in c.images:
        if not os.path.exists(image):
            problems.append(f"Input raster not found: {image}")
    if not c.out:
        problems.append("Choose where to write the embedding (.tif).")
    elif not c.out.lower().endswith((".tif", ".tiff")):
        problems.append("The embedding must be a GeoTIFF (.tif).")
    if c.components is not None and c.components < 0:
        problems.append("The number of components must be 0 (every feature) or more.")
    if c.device not in DEVICES:
        problems.append(f"Unknown device {c.device!r}.")
    return problems


def evaluate_args(c: EvaluateConfig) -> list[str]:
    args = ["evaluate", "--prediction", c.prediction, "--labels", c.labels]
    if c.label_field:
        args += ["--label-field", c.label_field]
    if c.ignore_index is not None:
        args += ["--ignore-index", str(c.ignore_index)]
    if c.out:
        args += ["--out", c.out]
    if c.report:
        args += ["--report", c.report]
    return args


# -- validation shared by dialogs and algorithms (messages, never asserts) ----------------------
def parse_duration(text: str) -> float | None:
    """Seconds of a time budget, None if it is not one (the engine's own parser)."""
    try:
        return _parse_duration(text)
    except ValueError:
        return None


def parse_bands(text: str) -> list[int] | None:
    """'1,2, 3' -> [1, 2, 3]; '' -> []; None if malformed."""
    text = text.strip()
    if not text:
        return []
    try:
        bands = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        return None
    return bands if all(b >= 1 for b in bands) else None


def model_path_problem(path: str) -> str | None:
    """Why ``path`` is not a GeoPEFT model (folder, card.json or .onnx), or None."""
    if not path:
        return "Choose a model: a trained model folder (with card.json) or an ONNX file."
    p = Path(path)
    if p.is_dir():
        return None if (p / "card.json").is_file() else f"{p} has no card.json: not a GeoPEFT model folder."
    if not p.is_file():
        return f"Model not found: {p}"
    if p.name != "card.json" and p.suffix.lower() != ".onnx":
        return f"{p.name} is neither a model folder, a card.json nor an .onnx file."
    return None


def read_card(path: str) -> dict | None:
    """The card.json of a model folder (or the file itself); None for ONNX or unreadable."""
    card = os.path.join(path, "card.json") if os.path.isdir(path) else path
    if not (card.endswith("card.json") and os.path.isfile(card)):
        return None
    try:
        with open(card, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def validate_train(c: TrainConfig, tuning_methods=TUNING_METHODS, decoders=DECODERS) -> list[str]:
    """Problems with a training configuration that the user can fix before starting.
    ``tuning_methods`` and ``decoders``: the engine's lists when it reported them."""
    problems = []
    if not c.images:
        problems.append("Choose at least one input raster.")
    for image in c.images:
        if not os.path.exists(image):
            problems.append(f"Input raster not found: {image}")
    if not c.labels:
        problems.append("Choose the labels: a raster layer or a polygon layer.")
    elif not os.path.exists(c.labels):
        problems.append(f"Labels not found: {c.labels}")
    if c.bands and len(set(c.bands)) != len(c.bands):
        problems.append("Each band can be used only once.")
    if c.backbone not in BACKBONES and not c.backbone.startswith("timm:"):
        problems.append(f"Unknown foundation model {c.backbone!r} (a timm model is written timm:NAME).")
    if c.tuning not in tuning_methods:
        problems.append(f"Unknown tuning method {c.tuning!r}.")
    if c.decoder not in decoders:
        problems.append(f"Unknown decoder {c.decoder!r}.")
    if c.weights not in ("auto", "none") and not c.weights.startswith("hf://") and not os.path.isfile(c.weights):
        problems.append(f"Weights file not found: {c.weights}")
    if c.frames < 1 or (c.images and len(c.images) > 1 and c.frames > 1 and len(c.images) % c.frames):
        problems.append(f"{c.frames} dates do not divide the {len(c.images)} input rasters: give one raster per "
                        "date, each with the same bands.")
    patch = PATCH_SIZES.get(c.backbone, 16)
    if c.chip_size is not None and (c.chip_size < patch or c.chip_size % patch):
        problems.append(f"Chip size must be a multiple of {patch} (the patch size of {c.backbone}), "
                        "or automatic.")
    if c.max_time and parse_duration(c.max_time) is None:
        problems.append(f"Time budget {c.max_time!r} is not a duration such as 90s, 5m or 1h.")
    if c.batch_size < 1:
        problems.append("Batch size must be at least 1.")
    if c.lr is not None and not 0 < c.lr < 1:
        problems.append("Learning rate must be between 0 and 1.")
    if c.val_fraction is not None and not 0 < c.val_fraction < 1:
        problems.append("The validation share must be between 0 and 1.")
    if c.device not in DEVICES:
        problems.append(f"Unknown device {c.device!r}.")
    if not c.out:
        problems.append("Choose an output folder for the trained model.")
    elif os.path.isdir(c.out) and any(Path(c.out).iterdir()):
        problems.append(f"Output folder {c.out} is not empty; choose a new or empty folder.")
    if c.init_from:
        if read_card(c.init_from) is None:
            problems.append(f"Continue from: {c.init_from} is not a trained model folder (it has no card.json).")
        elif c.out and os.path.abspath(c.out) == os.path.abspath(c.init_from):
            problems.append("The output folder is the model training continues from: choose a new folder.")
    return problems


def validate_predict(c: PredictConfig) -> list[str]:
    problems = []
    model_problem = model_path_problem(c.model)
    if model_problem:
        problems.append(model_problem)
    if not c.images:
        problems.append("Choose the raster to classify.")
    for image in c.images:
        if not os.path.exists(image):
            problems.append(f"Input raster not found: {image}")
    if not c.out:
        problems.append("Choose where to write the predicted raster (.tif).")
    elif not c.out.lower().endswith((".tif", ".tiff")):
        problems.append("The predicted raster must be a GeoTIFF (.tif).")
    if c.probabilities and not c.probabilities.lower().endswith((".tif", ".tiff")):
        problems.append("The probabilities raster must be a GeoTIFF (.tif).")
    if c.uncertainty and not c.uncertainty.lower().endswith((".tif", ".tiff")):
        problems.append("The uncertainty raster must be a GeoTIFF (.tif).")
    if c.polygons and not c.polygons.lower().endswith(".gpkg"):
        problems.append("Class polygons must be written to a GeoPackage (.gpkg).")
    if c.uncertain_areas and not c.uncertain_areas.lower().endswith(".gpkg"):
        problems.append("The uncertain areas must be written to a GeoPackage (.gpkg).")
    if c.area_count is not None and c.area_count < 1:
        problems.append("List at least one uncertain area.")
    if c.area_size is not None and c.area_size < 1:
        problems.append("The uncertain areas must be at least 1 pixel wide.")
    outputs = [os.path.abspath(p) for p in (c.out, c.probabilities, c.uncertainty, c.polygons,
                                            c.uncertain_areas) if p]
    if len(set(outputs)) != len(outputs):
        problems.append("Each output (classes, probabilities, uncertainty, polygons, uncertain areas) "
                        "needs its own file name.")
    if c.min_area is not None and c.min_area < 0:
        problems.append("The minimum polygon area must be 0 or more.")
    if c.device not in DEVICES:
        problems.append(f"Unknown device {c.device!r}.")
    problems += _area_problems(c, outputs)
    return problems


def _area_problems(c: PredictConfig, outputs: list[str]) -> list[str]:
    """The area of interest and the mask: a sound box or an existing vector file, an existing
    GeoTIFF mask; neither of them one of the outputs (the engine would overwrite it)."""
    problems = []
    box = parse_aoi_box(c.aoi) if c.aoi else None
    if box is not None:
        minx, miny, maxx, maxy = box
        if not (minx < maxx and miny < maxy):
            problems.append(f"The area of interest {c.aoi} is empty: it needs minx < maxx and "
                            "miny < maxy.")
        if "@" in c.aoi and not c.aoi.split("@", 1)[1].strip():
            problems.append(f"The area of interest {c.aoi} names no CRS after '@' (e.g. @EPSG:4326).")
        if c.aoi_layer:
            problems.append("A layer name (aoi_layer) goes with a polygon file, not with a box.")
    elif c.aoi:
        if not os.path.isfile(c.aoi):
            problems.append(f"Area of interest not found: {c.aoi} (give a box minx,miny,maxx,maxy "
                            "or a polygon file: GeoPackage, GeoJSON, Shapefile).")
        elif os.path.abspath(c.aoi) in outputs:
            problems.append("The area of interest cannot also be an output.")
    elif c.aoi_layer:
        problems.append("A layer name (aoi_layer) needs an area of interest file.")
    if c.mask:
        if not c.mask.lower().endswith(MASK_SUFFIXES):
            problems.append(f"The mask must be a GeoTIFF (.tif) or VRT on the input's grid: {c.mask}")
        elif not os.path.isfile(c.mask):
            problems.append(f"Mask raster not found: {c.mask}")
        elif os.path.abspath(c.mask) in outputs:
            problems.append("The mask cannot also be an output: choose another file for the output.")
    return problems
