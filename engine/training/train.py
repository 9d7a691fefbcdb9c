"""``train``: labels + imagery → a fine-tuned model folder (card.json + adapter.safetensors)."""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine import __version__
from engine.card import CARD_VERSION, WEIGHTS_FILE, write_card
from engine.data.chips import band_statistics
from engine.models.decoders import DECODERS, default_decoder
from engine.data.labels import LabelMask, load_labels
from engine.data.rasters import RasterStack, check_writable, current_umask
from engine import protocol
from engine.protocol import EngineError, Reporter
from engine.tuning import METHODS, TuningConfig


@dataclass
class TrainConfig:
    images: list[str]
    labels: str
    out: str
    bands: list[int] | None = None
    band_names: list[str] | None = None
    label_field: str | None = None
    ignore_index: int | None = None
    classes: list[dict] | None = None
    backbone: str = "prithvi_eo_v2_tiny"
    weights: str | None = "auto"
    tuning: TuningConfig = field(default_factory=lambda: TuningConfig(method="auto"))
    decoder: str = "auto"  # auto: linear for linear-probe, else unet
    chip_size: int | None = None  # None: chosen from the labelled extent
    epochs: int = 60
    max_time: str | None = None  # "90s", "5m", "1h"
    batch_size: int = 8
    lr: float | None = None  # None: by method (choose_method_and_lr)
    val_fraction: float = 0.2
    device: str = "auto"  # auto, cpu, gpu/cuda
    precision: str = "auto"  # auto (bf16-mixed on GPUs and bf16-capable CPUs, else 32), 32, bf16-mixed, 16-mixed
    devices: str = "1"
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    chips_per_epoch: int | None = None
    workers: int = 0
    trust_checkpoint: bool = False  # unpickle a --weights file holding more than tensors (runs its code)
    frames: int = 1  # dates in the stacked bands (the same bands per date, one date after another)
    metadata: bool = False  # feed -TL backbones the dates and the scene centre (engine.data.metadata)
    dates: list[str] | None = None  # one acquisition date per frame (else read from the rasters' tags)
    # PEFT methods: frozen blocks re-run in backward instead of keeping their activations
    # (engine.models.blocks): about half the memory for about a third more time per step
    activation_checkpointing: bool = True
    init_from: str | None = None  # a trained model folder to continue from (engine.training.warmstart)
    # previews of the model on the map while it trains (engine.training.preview)
    preview_dir: str | None = None
    preview_every: int = 5  # epochs; 0: only when asked through preview_request
    preview_extent: str | None = None  # a box as predict's --aoi takes it; None: the image (its centre)
    preview_request: str | None = None  # a file the caller (re)writes to ask for a preview now


def parse_duration(text: str | None) -> float | None:
    try:
        return protocol.parse_duration(text)
    except ValueError as exc:
        raise EngineError(str(exc), hint="use e.g. 90s, 5m, 1h or 1h30m") from None


def resolve_accelerator(device: str, precision: str) -> tuple[str, str]:
    import torch

    device = device.lower()
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "gpu"
    if device not in ("cpu", "gpu"):
        raise EngineError(f"unknown device {device!r}", hint="use auto, cpu or gpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise EngineError("--device gpu was asked for but no CUDA GPU is available",
                          hint="use --device auto or cpu")
    if precision == "auto":
        if device == "gpu":
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            from engine.models.compat import fast_bf16_cpu
            precision = "bf16-mixed" if fast_bf16_cpu() else "32-true"
    elif precision == "32":
        precision = "32-true"
    return device, precision


def _band_names(stack: RasterStack, given: list[str] | None, spec, reporter: Reporter) -> list[str]:
    if given:
        if len(given) != stack.count:
            raise EngineError(f"--band-names lists {len(given)} names for {stack.count} selected band(s)",
                              hint="give one name per selected band, in order")
        return list(given)
    names = stack.band_names
    if any(names):
        return names
    if stack.count == len(spec.bands):
        reporter.warning(f"the image bands have no names; assuming they are {', '.join(spec.bands)} in that "
                         "order (name them with --band-names if not)")
        return list(spec.bands)
    return [f"band {b}" for b in stack.band_indices]


@dataclass
class TrainingData:
    """Everything ``prepare_data`` derives from the rasters: targets, statistics, datasets."""

    classes: list[dict]
    train_target: LabelMask  # class indices in the label windows, -1 unlabelled
    val_target: LabelMask
    mean: list[float]
    std: list[float]
    grid: object
    band_indices: list[int]
    band_names: list[str]
    source_dtype: str
    chip_size: int
    train_set: object
    val_set: object | None
    class_weights: list[float]
    chips_per_epoch: int


# Learning rates per method for a pretrained backbone: full fine-tuning must not wash out what
# pretraining learnt; adapters and heads start from scratch and take larger steps.
PRETRAINED_LR = {"full": 1e-4, "lora": 1e-3, "dora": 1e-3, "vpt": 1e-3, "vit-adapter": 1e-3, "linear-probe": 1e-3}
RANDOM_BACKBONE_LR = 3e-3  # nothing to preserve: on the real Sen1Floods11 chip 3e-3 beat 1e-3


def choose_method_and_lr(method: str, lr: float | None, pretrained: bool, reporter: Reporter) -> tuple[str, float]:
    """``auto`` method: LoRA on a pretrained backbone (the paper's choice), full fine-tuning on a
    random one (adapters on random weights have nothing to adapt). ``lr`` None: by method."""
    if method == "auto":
        method = "lora" if pretrained else "full"
        reporter.info(f"tuning {method}: " + ("LoRA adapters on the pretrained backbone" if pretrained else
                      "the backbone starts from random weights, so all of it trains (LoRA would only "
                      "adapt noise)") + "; set --tuning to choose")
    if lr is None:
        lr = PRETRAINED_LR[method] if pretrained else RANDOM_BACKBONE_LR
        reporter.info(f"learning rate {lr:g} for {method} on a {'pretrained' if pretrained else 'random'} "
                      "backbone; set --lr to choose")
    return method, lr


def class_weights(target: LabelMask, num_classes: int, reporter: Reporter) -> list[float]:
    """Inverse square-root frequency weights (mean 1) when the classes are unbalanced (the
    largest over 3× the smallest), else all 1. A class missing from training gets weight 1."""
    counts = target.class_counts().astype(np.float64)
    present = counts > 0
    if counts[present].max() <= 3 * counts[present].min():
        return [1.0] * num_classes
    weights = np.ones(num_classes)
    weights[present] = 1.0 / np.sqrt(counts[present])
    weights[present] *= present.sum() / weights[present].sum()
    reporter.info("classes are unbalanced (training pixels " + ", ".join(f"{int(n)}" for n in counts) +
                  "): the loss weights them " + ", ".join(f"{w:.2f}" for w in weights))
    return weights.tolist()


def prepare_data(cfg: TrainConfig, spec, reporter: Reporter, parent=None) -> TrainingData:
    """Read labels, choose the chip size, split, compute statistics and build the datasets.

    Everything works on the label windows (``LabelMask``): labels are read and rasterised only
    where they are and image pixels only under them, so a few polygons on a huge mosaic cost
    memory for the polygons, not for the mosaic.

    ``parent`` (a ``warmstart.Parent``): the labels index its classes (which they may not all
    hold) and the images are normalised with its statistics."""
    from engine.data.chips import choose_chip_size, crop_positions, training_split

    reporter.progress("prepare", 1, 4, "reading image and labels")
    with RasterStack(cfg.images, cfg.bands) as stack:
        files = ", ".join(p.name for p in stack.paths)
        side = min(stack.grid.width, stack.grid.height)
        smallest = cfg.chip_size or 2 * spec.patch_size
        if side < smallest:
            raise EngineError(f"image {files} is {stack.grid.width} x {stack.grid.height} px, smaller than one "
                              f"{smallest} px training chip", hint=f"train on a larger image (at least {smallest} x "
                              f"{smallest} px)" + (f", or a smaller --chip-size (a multiple of {spec.patch_size}, "
                                                   f"at least {2 * spec.patch_size})" if cfg.chip_size else ""))
        stack.check_has_data()
        for warning in stack.value_warnings():
            reporter.warning(warning)
        band_names = _band_names(stack, cfg.band_names, spec, reporter)
        labels = load_labels(cfg.labels, stack.grid, cfg.label_field, cfg.ignore_index, cfg.classes, reporter)
        if parent is not None:
            known = {c["value"] for c in parent.classes}
            new = [c for c in labels.classes if c["value"] not in known]
            if new:
                raise EngineError(f"labels {Path(cfg.labels).name} hold class(es) "
                                  f"{', '.join(str(c['value']) for c in new)} that the model training continues "
                                  f"from ({parent.folder.name}) does not have (it has "
                                  f"{', '.join(str(c['value']) + ' ' + c['name'] for c in parent.classes)})",
                                  hint="a continued model keeps its parent's classes: relabel those features, or "
                                       "train a new model (without --init-from) to add a class")
        _check_classes(labels.classes, cfg.classes, Path(cfg.labels).name)
        if parent is not None:
            labels = labels.on_classes(parent.classes)
        if len(labels.classes) < 2:
            raise EngineError(f"labels {Path(cfg.labels).name} hold only one class "
                              f"({labels.classes[0]['name']})", hint="label at least two classes")
        chip = cfg.chip_size
        if chip is None:
            chip, why = choose_chip_size(labels, spec.patch_size)
            if chip > side:  # labels spanning an image smaller than the usual smallest chip
                chip = side // spec.patch_size * spec.patch_size
                why = f"chip size {chip} px: the image is only {side} px across (set --chip-size to override)"
            reporter.info(why)
        reporter.progress("prepare", 2, 4, "spatial split and normalisation statistics")
        train_target, val_target = training_split(labels, chip, cfg.val_fraction, cfg.seed)
        mean, std = parent.statistics if parent is not None else band_statistics(stack, train_target)
        grid, band_indices, source_dtype = stack.grid, stack.band_indices, str(np.dtype(stack.dtype))

    # Lightning (seconds to import): only once the inputs have passed their checks
    from engine.training.data import ChipDataset, ChipSource, RandomCrops, labelled_windows

    step = max(1, chip // 16)
    positions = crop_positions(train_target, val_target, chip, step)
    if not len(positions):
        raise EngineError("no training chips: the labels leave no labelled pixels for training once "
                          "the validation blocks and their buffer (half a chip) are set aside",
                          hint="label more of the image, lower --val-fraction, or pass --val-fraction 0")
    val_windows = labelled_windows(val_target, chip, chip)
    source = ChipSource([str(p) for p in cfg.images], band_indices, mean, std)
    train_pixels = train_target.labelled
    # Each labelled pixel falls in about four crops per epoch; at least eight batches.
    per_epoch = cfg.chips_per_epoch or max(8 * cfg.batch_size, math.ceil(4 * train_pixels / chip ** 2))
    train_set = RandomCrops(source, positions, train_target, chip, per_epoch, seed=cfg.seed)
    val_set = ChipDataset(source, val_windows, val_target) if val_windows else None
    reporter.info(f"{len(labels.classes)} classes; {train_pixels} training / {val_target.labelled} "
                  f"validation pixels (validation in blocks of {2 * chip} px, training labels kept "
                  f"{chip // 2} px away from them); {per_epoch} random {chip} px crops per epoch from "
                  f"{len(positions)} positions, {len(val_windows)} validation chips")
    weights = class_weights(train_target, len(labels.classes), reporter)
    return TrainingData(labels.classes, train_target, val_target, mean, std, grid, band_indices, band_names,
                        source_dtype, chip, train_set, val_set, weights, per_epoch)


def _check_classes(found: list[dict], given: list[dict] | None, labels: str) -> None:
    """Refuse label classes that ``--classes`` does not list (a value, or a text class name)."""
    if not given:
        return
    named = {int(c["value"]): c["name"] for c in given}
    # a value missing from the list; or a text class (a name of its own) the list does not name
    extra = [c for c in found if int(c["value"]) not in named or
             (c["name"] not in named.values() and c["name"] != f"class {c['value']}")]
    if extra:
        # a value has the placeholder name "class V"; a text class its own name
        shown = ", ".join(str(c["value"]) if c["name"] == f"class {c['value']}" else repr(c["name"]) for c in extra)
        listed = ", ".join(f"{v} {n}" for v, n in named.items())
        raise EngineError(f"labels {labels} hold class(es) {shown} not in --classes ({listed})",
                          hint="add them to --classes, or mark them as no label (--ignore-index, or the label "
                               "raster's nodata)")


def run_training(cfg: TrainConfig, reporter: Reporter | None = None, resume: str | os.PathLike | None = None) -> dict:
    """Train and write the model folder ``cfg.out``. Returns the summary of the ``done`` event.
    ``resume``: the model folder of a cancelled run to continue (``cfg``: that run's, see
    ``engine.training.resume``)."""
    reporter = reporter or Reporter("quiet")
    started = time.monotonic()
    max_seconds = parse_duration(cfg.max_time)
    parent = None
    if cfg.init_from:
        from engine.training.warmstart import Parent, inherit
        parent = Parent(cfg.init_from)
        cfg = inherit(cfg, parent, given=set())
        if Path(cfg.out).resolve() == parent.folder.resolve():
            raise EngineError(f"--out {cfg.out} is the model training continues from (--init-from): the new model "
                              "would replace it", hint="give --out a new folder: the parent stays as it is")
    from engine.models.registry import BACKBONES, get_backbone_spec
    spec = get_backbone_spec(cfg.backbone)
    if cfg.tuning.method not in ("auto", *METHODS):
        raise EngineError(f"unknown tuning method {cfg.tuning.method!r}",
                          hint=f"choose one of: auto, {', '.join(METHODS)}")
    if cfg.decoder not in ("auto", *DECODERS):
        raise EngineError(f"unknown decoder {cfg.decoder!r}", hint=f"choose one of: auto, {', '.join(DECODERS)}")
    out = Path(cfg.out)
    for kind, inputs in (("an input image", cfg.images), ("the labels", [cfg.labels])):
        if any(out.resolve() == Path(p).resolve() for p in inputs):
            raise EngineError(f"--out {out} is {kind} ({out.name}): writing the model there would destroy it",
                              hint="give --out a new folder name")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "card.json").exists())):
        raise EngineError(f"output folder {out} exists and is not a GeoPEFT model",
                          hint="choose a new or empty --out folder (an earlier model folder is replaced)")
    check_writable(out, "--out", folder=True)
    if not 0 <= cfg.val_fraction < 1:
        raise EngineError(f"--val-fraction {cfg.val_fraction} must be in [0, 1)")
    from engine.models.checkpoints import load_backbone_weights, read_state_dict, resolve_weights
    # a missing, unreadable or untrusted checkpoint is refused before the data is read
    weights_path = resolve_weights(spec, cfg.weights, reporter)
    if parent is not None:
        parent.check_weights(weights_path)
    weights_state = read_state_dict(weights_path, cfg.trust_checkpoint) if weights_path else None
    from engine.training import resume as resuming
    resume_info, resume_from = resuming.read_resume(resume) if resume is not None else (None, None)
    metadata = None
    if cfg.frames < 1:
        raise EngineError(f"--frames {cfg.frames} must be at least 1")
    if cfg.metadata:
        if not spec.tl:
            tl = ", ".join(n for n, s in BACKBONES.items() if s.tl)
            raise EngineError(f"--metadata: {spec.name} has no temporal/location encoders",
                              hint=f"use a -TL backbone ({tl}), or leave --metadata out")
        from engine.data.metadata import scene_metadata
        metadata = scene_metadata([str(p) for p in cfg.images], cfg.frames, cfg.dates)
        reporter.info(f"metadata for the temporal/location encoders: dates {', '.join(metadata['dates'])}, scene "
                      f"centre {metadata['location'][0]:.4f}, {metadata['location'][1]:.4f} (lat, lon)")
    data = prepare_data(cfg, spec, reporter, parent)
    if len(data.band_indices) % cfg.frames:
        raise EngineError(f"{len(data.band_indices)} bands cannot be {cfg.frames} frames with the same bands",
                          hint="stack one raster per date with the same bands (or select them with --bands)")
    data_check = resuming.data_check(data)
    if resume_info is not None and resume_info.get("data") != data_check:
        raise EngineError(f"the images or labels of the cancelled run in {resume} have changed (now "
                          f"{data_check}, then {resume_info.get('data')}): the run cannot continue as it was",
                          hint="start a new training run")

    reporter.progress("prepare", 3, 4, "building the model")
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from engine.models.segmentor import build_segmentor
    from engine.training.task import (History, KeepBest, ProgressEvents, ResumeCheckpoints, SegmentationTask,
                                      TrainingCancelled)
    from engine.tuning import apply_tuning, count_parameters, lora_targets

    # Our own events report progress; Lightning's info lines and tips are noise here.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    accelerator, precision = resolve_accelerator(cfg.device, cfg.precision)
    method, lr = choose_method_and_lr(cfg.tuning.method, cfg.lr, pretrained=weights_path is not None,
                                      reporter=reporter)
    decoder = default_decoder(method) if cfg.decoder == "auto" else cfg.decoder
    model = build_segmentor(spec, len(data.band_indices), data.chip_size, len(data.classes), decoder,
                            band_names=data.band_names, method=method, num_frames=cfg.frames,
                            metadata=metadata is not None)
    if metadata is not None:
        model.encoder.set_coords(metadata["temporal"], metadata["location"])
    loaded = load_backbone_weights(model.encoder, spec, weights_path, data.band_names, reporter,
                                   trust=cfg.trust_checkpoint, state=weights_state)
    del weights_state
    if weights_path is not None and cfg.weights in ("hub", "auto"):
        loaded.source = "hub"
    elif weights_path is not None and cfg.weights.startswith("hf://"):
        loaded.source, loaded.url = "hub", cfg.weights
    # Fresh band columns of the patch embedding must train and be saved with the model.
    tuning = replace(cfg.tuning, method=method, patch_embed=bool(loaded.fresh_bands),
                     target_modules=cfg.tuning.target_modules or lora_targets(model))
    apply_tuning(model, tuning)
    if parent is not None:
        from engine.training.warmstart import load_parent_tensors
        load_parent_tensors(model, parent, reporter)
    counts = count_parameters(model)
    reporter.info(f"{spec.name} + {decoder}, tuning {tuning.method}"
                  f"{' (and the patch embedding, for the fresh bands)' if tuning.patch_embed else ''}: "
                  f"{counts['trainable']:,} of {counts['total']:,} parameters train; {accelerator}, "
                  f"precision {precision}")

    from engine.training.data import ChipDataModule
    task = SegmentationTask(model, [c["name"] for c in data.classes], lr, class_weights=data.class_weights,
                            monitor="val_miou" if data.val_set is not None else "train_loss_epoch")
    task.save_only_trained(include_frozen=loaded.source == "random")
    datamodule = ChipDataModule(data.train_set, data.val_set, cfg.batch_size, cfg.workers,
                                start_epoch=resume_info["epochs_done"] if resume_info else 0)
    steps_per_epoch = math.ceil(data.chips_per_epoch / cfg.batch_size)
    total_steps = None if max_seconds and cfg.epochs >= 1000 else steps_per_epoch * cfg.epochs
    progress = ProgressEvents(reporter, total_steps, max_seconds)
    keep = KeepBest(has_validation=data.val_set is not None, include_frozen=loaded.source == "random",
                    baseline=parent is not None, reporter=reporter)
    history = History()
    workdir = tempfile.mkdtemp(prefix=f"geopeft-train-{os.getpid()}-")  # PID: removed by the next train if killed
    checkpoints = ResumeCheckpoints(Path(workdir) / resuming.RESUME_CKPT)
    callbacks = [progress, keep, history, checkpoints]
    if cfg.preview_dir:
        from engine.training.preview import Previews
        callbacks.append(Previews(cfg.preview_dir, reporter, images=[str(p) for p in cfg.images],
                                  bands=data.band_indices, mean=data.mean, std=data.std, chip_size=data.chip_size,
                                  classes=data.classes, every=cfg.preview_every, extent=cfg.preview_extent,
                                  request=cfg.preview_request, batch_size=cfg.batch_size))
    trainer = L.Trainer(
        accelerator=accelerator, devices=_devices(cfg.devices), num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, precision=precision, max_epochs=cfg.epochs,
        max_time=dt.timedelta(seconds=max_seconds) if max_seconds else None,
        callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        # a continued model is scored before training (KeepBest's baseline): the whole validation set
        num_sanity_val_steps=-1 if parent is not None and data.val_set is not None else 0,
        log_every_n_steps=1, default_root_dir=workdir,
    )
    reporter.enabled = reporter.enabled and trainer.is_global_zero
    reporter.progress("prepare", 4, 4, "training")
    stopped = False
    from engine.models.blocks import checkpointing
    from engine.training.memory import frozen_weights_in_bf16, use_bf16_weights
    try:
        # frozen block weights in bf16 under bf16 autocast: the values autocast computes with, half the memory
        with frozen_weights_in_bf16(model, use_bf16_weights(precision, accelerator)), \
                checkpointing(cfg.activation_checkpointing):
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                        weights_only=True)  # tensors and plain values only: nothing in the file runs
    except (SIGTERMException, TrainingCancelled):
        reporter.cancel()
        stopped = True
    finally:
        resume_ckpt = checkpoints.take() if stopped and trainer.is_global_zero else None
        shutil.rmtree(workdir, ignore_errors=True)
    # Every epoch ran: a cancel after the last one stopped nothing.
    stopped = stopped and trainer.current_epoch < cfg.epochs
    if not trainer.is_global_zero:
        return {}
    # (a continued model's epoch 0 is its parent: nothing new before the first epoch ends)
    if stopped and (keep.best_state is None or (resume_info and resume_ckpt is None) or
                    (keep.best_epoch == 0 and trainer.current_epoch == 0)):
        return resuming.nothing_new_kept(reporter, trainer, cfg, resume, resume_info)
    if parent is not None and keep.best_epoch == 0:
        reporter.warning(f"no epoch beat the model training continued from ({parent.folder.name}: validation mIoU "
                         f"{keep.best_score:.3f} on this run's validation labels): the new model keeps its weights; "
                         "label more where it is wrong, or give training more time")

    card = {
        "card_version": CARD_VERSION,
        "engine_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": {"name": spec.name, "weights": loaded.as_card(), "licence": spec.licence},
        "decoder": decoder,
        "tuning": tuning.as_dict(),
        "input": {"bands": data.band_indices, "band_names": data.band_names, "num_images": len(cfg.images),
                  **({"frames": cfg.frames} if cfg.frames > 1 else {}),
                  **({"metadata": metadata} if metadata is not None else {}),
                  "mean": data.mean, "std": data.std, "dtype": "float32", "source_dtype": data.source_dtype,
                  "nodata": "pixels nodata in any selected band are not predicted"},
        "classes": data.classes,
        "chip_size": data.chip_size,
        "grid": {"crs": data.grid.crs.to_wkt() if data.grid.crs else None, "width": data.grid.width,
                 "height": data.grid.height, "transform": list(data.grid.transform)[:6]},
        "training": {
            "epochs": trainer.current_epoch,
            "best_epoch": keep.best_epoch,
            "best_val_miou": keep.best_val["miou"] if keep.best_val else None,
            "val_per_class": keep.best_val["per_class"] if keep.best_val else None,
            "steps": trainer.global_step, "batch_size": cfg.batch_size, "lr": lr,
            "seed": cfg.seed, "val_fraction": cfg.val_fraction, "class_weights": data.class_weights,
            "chips_per_epoch": data.chips_per_epoch, "accelerator": accelerator,
            "precision": precision, "duration_s": round(time.monotonic() - started, 1),
            "cancelled": stopped, "parameters": counts, "history": history.rows(),
            "images": [str(Path(p).resolve()) for p in cfg.images],
            "labels": str(Path(cfg.labels).resolve()),
        },
        "files": {"weights": WEIGHTS_FILE},
    }
    if parent is not None:
        card["parent"] = parent.as_card()
    extra = resuming.card_and_files(card, cfg, trainer, checkpoints, resume_ckpt, resume_info, data_check)
    try:
        out = _write_model_folder(Path(cfg.out), keep.best_state, card, extra)
    finally:
        if resume_ckpt is not None:
            resume_ckpt.unlink(missing_ok=True)
    reporter.artifact("model", str(out))
    reporter.artifact("card", str(out / "card.json"))
    summary = {"out": str(out), "best_val_miou": card["training"]["best_val_miou"],
               "epochs": trainer.current_epoch, "steps": trainer.global_step,
               "trainable_parameters": counts["trainable"]}
    return resuming.report_end(reporter, summary, card, stopped)


def _devices(text: str):
    text = str(text)
    return int(text) if text.isdigit() else text


def _write_model_folder(out: Path, state: dict, card: dict, extra: dict | None = None) -> Path:
    """Write into a temporary sibling folder, then swap it in: never a half-written model.
    ``extra``: more files, name → text, or the Path of a file to move in."""
    from safetensors.torch import save_file

    from engine.models.checkpoints import sha256_file

    out.parent.mkdir(parents=True, exist_ok=True)
    # hidden, with the PID: the next job on ``out`` removes it if this one is killed (engine.reliability)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        save_file(state, str(tmp / WEIGHTS_FILE))
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~current_umask())
        card["files"]["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        write_card(card, tmp)
        for name, content in (extra or {}).items():
            if isinstance(content, Path):
                shutil.move(str(content), str(tmp / name))
            else:
                (tmp / name).write_text(content)
            os.chmod(tmp / name, 0o666 & ~current_umask())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
