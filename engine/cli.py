"""``python -m engine <command>`` (or ``geopeft <command>``): a thin shell over the engine.

Every command takes ``--events jsonl`` (the protocol for the QGIS plugin: one JSON object per
stdout line) or prints human progress to stderr. Exit status: 0 done or cancelled, 2 bad input
(the message says what to fix), 3 internal error.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from engine.protocol import (EXIT_INTERNAL_ERROR, EXIT_OK, EXIT_USER_ERROR, EngineError, Reporter)


def _trust(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help=f"load {what} even when it holds pickled Python objects besides tensors (e.g. an "
                   "argparse.Namespace): unpickling runs code from the file, so only for files from a source you "
                   "trust. Without it such files are refused and nothing in them runs")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", choices=["human", "jsonl"], default="human",
                   help="jsonl: one JSON event per stdout line (for the QGIS plugin); human: progress on stderr")
    p.add_argument("--cancel-on-stdin", action="store_true",
                   help="also cancel when a line 'cancel' arrives on stdin (Windows has no SIGTERM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train", help="fine-tune a foundation model on labelled imagery", formatter_class=fmt)
    t.add_argument("--image", action="append", metavar="TIF",
                   help="input raster; repeat to stack several rasters on the same grid")
    t.add_argument("--bands", help="1-based bands of the stacked images, e.g. 1,2,3 or 2-7 (default: all)")
    t.add_argument("--band-names", help="names of the selected bands, comma-separated (default: the "
                   "rasters' band descriptions), used to match the model's pretrained bands")
    t.add_argument("--frames", type=int, default=1, help="dates in the stacked bands: the same bands per date, one "
                   "date after another (e.g. one --image per date); the backbone sees them as a time series")
    t.add_argument("--metadata", action="store_true", help="feed a -TL backbone the acquisition dates and the "
                   "scene centre (its temporal and location encoders); zeros otherwise")
    t.add_argument("--date", help="acquisition date per frame, YYYY-MM-DD, comma-separated (default: from each "
                   "raster's tags)")
    t.add_argument("--labels", help="class raster, or vector file (GeoPackage/GeoJSON/Shapefile)")
    t.add_argument("--label-field", help="class field of vector labels")
    t.add_argument("--ignore-index", type=int, help="label value meaning 'no label' (besides the raster's nodata)")
    t.add_argument("--classes", help="JSON list (or .json file) of {value, name, colour} naming the classes")
    t.add_argument("--backbone", default="prithvi_eo_v2_tiny", help="foundation model (see 'models')")
    t.add_argument("--weights", default="auto",
                   help="backbone checkpoint file (.safetensors/.pt/.pth/.ckpt), hf://OWNER/REPO/FILE (Hugging Face hub, "
                   "cached), 'auto' (the model's hub file when reachable, else random), 'hub', or 'none'")
    t.add_argument("--tuning", default="auto", help="auto (lora with pretrained weights, full when the backbone "
                   "starts from random weights), lora, dora, vpt (deep visual prompts), vit-adapter, full or linear-probe "
                   "(each backbone's list: 'models')")
    t.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                   help="PEFT methods: keep the frozen blocks' activations instead of recomputing them in the "
                   "backward pass (faster steps, more memory; see the README's benchmark)")
    t.add_argument("--lora-rank", type=int, default=16)
    t.add_argument("--lora-alpha", type=int, default=16)
    t.add_argument("--prompt-tokens", type=int, default=100, help="vpt: learned prompt tokens per encoder block")
    t.add_argument("--prompt-dropout", type=float, default=0.1, help="vpt: dropout on the prompt tokens")
    t.add_argument("--decoder", default="auto",
                   help="unet, upernet, fcn, linear, or auto: linear (a light head) for linear-probe, unet (the "
                   "paper's recommendation) for every other method")
    t.add_argument("--chip-size", type=int,
                   help="training chip size in pixels, a multiple of the patch size (default: chosen from "
                   "the labelled extent, at most 224)")
    t.add_argument("--epochs", type=int, default=60,
                   help="epochs of random crops (each labelled pixel about four times per epoch)")
    t.add_argument("--max-time", help="time budget, e.g. 90s, 5m, 1h (stops at whichever comes first)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, help="learning rate (default: by method: full 1e-4, lora/dora/linear-probe "
                   "1e-3 on a pretrained backbone; 3e-3 on a random one)")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of labelled pixels held out for validation, in spatial blocks")
    t.add_argument("--chips-per-epoch", type=int, help="random crops drawn per epoch (default: each labelled "
                   "pixel about four times, at least 8 batches)")
    t.add_argument("--device", default="auto", help="auto, cpu or gpu")
    t.add_argument("--precision", default="auto",
                   help="auto (bf16-mixed on GPUs and on CPUs with native bf16, else 32), 32, bf16-mixed, 16-mixed")
    t.add_argument("--devices", default="1", help="Lightning devices (e.g. 2, or auto)")
    t.add_argument("--num-nodes", type=int, default=1, help="Lightning nodes")
    t.add_argument("--strategy", default="auto", help="Lightning strategy (e.g. ddp)")
    t.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="model folder to write (card.json + adapter.safetensors)")
    t.add_argument("--resume", metavar="DIR", help="continue the cancelled run whose model folder is DIR (it holds "
                   "resume.ckpt) with the arguments it started with: leave the others out (only --device and "
                   "--workers may change). --image, --labels and --out are required otherwise")
    t.add_argument("--init-from", metavar="MODEL", help="continue training from this trained model folder (e.g. "
                   "with corrected or more labels): its backbone, tuning, decoder, bands, chip size, classes and "
                   "normalisation are kept and its trained tensors are the start; writes a new --out whose card "
                   "names its parent")
    t.add_argument("--preview-dir", metavar="DIR", help="write previews while training: the model as it stands "
                   "predicted on --preview-extent, as DIR/preview-<epoch>-<n>.tif (artifact events 'preview'; the two "
                   "newest are kept)")
    t.add_argument("--preview-every", type=int, default=5, metavar="N",
                   help="with --preview-dir: a preview every N epochs (0: only when asked with --preview-request)")
    t.add_argument("--preview-extent", metavar="BOX", help="with --preview-dir: the area to preview, minx,miny,maxx,"
                   "maxy in the image's CRS (or …@EPSG:code); default the image; at most 1024 x 1024 px around its "
                   "centre are predicted")
    t.add_argument("--preview-request", metavar="FILE", help="with --preview-dir: (re)writing this file asks for a "
                   "preview after the current batch; it may hold {\"extent\": BOX} for a new area")
    _trust(t, "the --weights file")
    _common(t)

    p = sub.add_parser("predict", help="predict a class raster, tile by tile", formatter_class=fmt)
    p.add_argument("--model", required=True, help="trained model folder (or its card.json), or an .onnx file")
    p.add_argument("--image", action="append", required=True, metavar="TIF")
    p.add_argument("--bands", help="override the card's band selection (1-based)")
    p.add_argument("--out", required=True, help="class raster to write (GeoTIFF)")
    p.add_argument("--probabilities", help="also write per-class probabilities (percent, GeoTIFF)")
    p.add_argument("--uncertainty", help="also write per-pixel uncertainty: normalised entropy of the class "
                   "probabilities, 0-100 (uint8 GeoTIFF, nodata 255)")
    p.add_argument("--polygons", help="also write the classes as polygons (GeoPackage .gpkg, layer 'predictions': "
                   "class_value, class_name, area)")
    p.add_argument("--min-area", type=float, help="with --polygons: drop regions smaller than this (CRS units², "
                   "e.g. m²)")
    p.add_argument("--simplify", type=float, help="with --polygons: simplify the outlines with this tolerance "
                   "(CRS units; needs shapely)")
    p.add_argument("--uncertain-areas", metavar="GPKG", help="also list where to label next: the most uncertain "
                   "squares (mean uncertainty of their valid pixels, at least half of each square valid) as "
                   "polygons (GeoPackage .gpkg, layer 'uncertain_areas': rank (1 = most uncertain), "
                   "mean_uncertainty 0-100, valid_fraction). Works with or without --uncertainty")
    p.add_argument("--area-count", type=int, help="with --uncertain-areas: how many squares (default 10)")
    p.add_argument("--area-size", type=int, metavar="PX", help="with --uncertain-areas: the squares' side in "
                   "pixels (default: the model's chip size, one training chip per square)")
    p.add_argument("--aoi", help="predict only inside this area: a box minx,miny,maxx,maxy in the image's CRS "
                   "(or minx,miny,maxx,maxy@EPSG:4326 in another), or a polygon file (GeoPackage, GeoJSON, "
                   "Shapefile); outside is nodata, outputs stay on the image's grid. A box starting with a minus sign: "
                   "--aoi=-10.5,…")
    p.add_argument("--aoi-layer", help="with a multi-layer --aoi file: the layer of polygons")
    p.add_argument("--mask", metavar="TIF", help="predict only where this raster, on the image's grid, is non-zero")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overlap", type=int, help="tile overlap in pixels (default: a quarter tile)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"],
                   help="PyTorch models: auto = bf16 on GPUs and bf16-capable CPUs, else fp32 (ONNX: fp32)")
    p.add_argument("--devices", default="1",
                   help="processes per node: more than 1 predicts with Lightning DDP, each process its own band "
                   "of rows (one GPU each with --device gpu, else a share of the CPU cores); auto = every GPU")
    p.add_argument("--num-nodes", type=int, default=1,
                   help="machines predicting together (Lightning's environment variables; the output's folder "
                   "must be shared)")
    p.add_argument("--strategy", default="auto", help="with several processes: ddp (auto means ddp)")
    _trust(p, "the backbone checkpoint a model folder was trained on")
    _common(p)

    e = sub.add_parser("export", help="merge adapters and export the model to ONNX", formatter_class=fmt)
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True, help="ONNX file to write")
    e.add_argument("--profile", choices=["geopeft", "deepness"], default="geopeft",
                   help="geopeft: for GeoPEFT's predict; deepness: for the Deepness QGIS plugin (8-bit "
                   "imagery only: its input is bands ÷ 255, its metadata Deepness's)")
    e.add_argument("--quantize", choices=["int8", "int8-static"],
                   help="write an int8 model (faster CPU prediction with onnxruntime alone): int8 = dynamic "
                   "(MatMul weights int8, convolutions fp32); int8-static = QDQ calibrated on chips of the "
                   "training images (must still be readable). Compared with fp32 at export on training chips "
                   "(random ones when the images are gone); refused below 98%% same-class pixels")
    half = e.add_mutually_exclusive_group()
    half.add_argument("--fp16", action="store_true",
                      help="write a float16 model for GPUs (CUDA/TensorRT; input and output stay float32, the "
                      "convolutions that see the input bands stay fp32). Compared with fp32 at export like "
                      "--quantize; not with --quantize")
    half.add_argument("--bf16", action="store_true",
                      help="refused: onnxruntime cannot run bfloat16 models of these ops on its CPU provider, "
                      "so they cannot be checked; use --fp16")
    e.add_argument("--force", action="store_true",
                   help="with --profile deepness: export a model not trained on uint8 pixels; with --quantize or "
                   "--fp16: keep an int8/fp16 model below 98%% agreement (with a warning)")
    _trust(e, "the backbone checkpoint the model was trained on")
    _common(e)

    v = sub.add_parser("evaluate", help="score a prediction against labels", formatter_class=fmt)
    v.add_argument("--prediction", required=True)
    v.add_argument("--labels", required=True)
    v.add_argument("--label-field")
    v.add_argument("--ignore-index", type=int)
    v.add_argument("--out", help="write the metrics as JSON")
    v.add_argument("--report", metavar="HTML", help="also write a report: one self-contained HTML file with "
                   "the scores, per-class IoU/F1 and confusion-matrix charts, class areas and the model's "
                   "training curves (needs matplotlib)")
    v.add_argument("--model", help="with --report: the model (folder, card.json or .onnx) whose training curves "
                   "to show (default: the model the prediction was made with, when its folder is still there)")
    _common(v)

    d = sub.add_parser("demo-data", help="write a synthetic multispectral scene with labels", formatter_class=fmt)
    d.add_argument("--out", required=True)
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    _common(d)

    m = sub.add_parser("demo", help="the whole path on the built-in sample", formatter_class=fmt)
    m.add_argument("--out", default="demo")
    m.add_argument("--max-time", default="4m", help="training time budget")
    _common(m)

    b = sub.add_parser("embed", help="the foundation model's patch features (or their PCA) as a GeoTIFF",
                       formatter_class=fmt)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="trained model folder (or its card.json): its backbone with its tuned "
                     "adapters, its bands and normalisation")
    src.add_argument("--backbone", help="a foundation model (see 'models'), its weights from --weights")
    b.add_argument("--weights", default="auto", help="with --backbone: checkpoint file; 'auto' (hub when "
                   "reachable, else random), 'hub', or 'none' (random)")
    b.add_argument("--image", action="append", required=True, metavar="TIF",
                   help="input raster; repeat to stack several rasters on the same grid")
    b.add_argument("--bands", help="1-based bands of the stacked images (default: the model's, or all with "
                   "--backbone)")
    b.add_argument("--band-names", help="with --backbone: names of the selected bands, comma-separated "
                   "(default: the band descriptions), matched to the pretrained bands")
    b.add_argument("--chip-size", type=int, help="with --backbone: tile size in pixels, a multiple of the patch "
                   "size (default 224); a model folder uses its own")
    b.add_argument("--out", required=True, help="GeoTIFF to write: float32, one pixel per patch (pixel size = "
                   "patch size x the input's), nodata -9999")
    b.add_argument("--components", type=int, default=8, help="principal components to keep (bands 'PC 1'... by "
                   "decreasing variance, fitted on a sample of patches); 0: every feature (192-1280 bands)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--device", default="auto", help="auto, cpu or gpu")
    _trust(b, "the backbone checkpoint")
    _common(b)

    ls = sub.add_parser("models", help="list the foundation models", formatter_class=fmt)
    _common(ls)
    return parser


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",")] if text else None


def cmd_train(a, reporter: Reporter) -> dict:
    from engine.data.labels import load_classes_option
    from engine.data.rasters import parse_band_list
    from engine.training.train import TrainConfig, run_training
    from engine.tuning import TuningConfig

    if not a.resume and not (a.image and a.labels and a.out):
        raise EngineError("train needs --image, --labels and --out",
                          hint="give all three, or --resume DIR to continue a cancelled run")
    cfg = TrainConfig(
        images=a.image, labels=a.labels, out=a.out, bands=parse_band_list(a.bands),
        band_names=_split(a.band_names), label_field=a.label_field, ignore_index=a.ignore_index,
        classes=load_classes_option(a.classes), backbone=a.backbone, weights=a.weights,
        tuning=TuningConfig(method=a.tuning, rank=a.lora_rank, alpha=a.lora_alpha, prompt_tokens=a.prompt_tokens,
                            prompt_dropout=a.prompt_dropout), decoder=a.decoder,
        chip_size=a.chip_size, epochs=a.epochs, max_time=a.max_time,
        batch_size=a.batch_size, lr=a.lr, val_fraction=a.val_fraction, device=a.device,
        precision=a.precision, devices=a.devices, num_nodes=a.num_nodes, strategy=a.strategy,
        seed=a.seed, chips_per_epoch=a.chips_per_epoch, workers=a.workers, trust_checkpoint=a.trust_checkpoint,
        frames=a.frames, metadata=a.metadata, dates=_split(a.date), activation_checkpointing=a.activation_checkpointing,
        init_from=a.init_from, preview_dir=a.preview_dir, preview_every=a.preview_every,
        preview_extent=a.preview_extent, preview_request=a.preview_request)
    if a.init_from and not a.resume:  # options contradicting the parent are refused, naming them
        from engine.training.resume import given_options
        from engine.training.warmstart import Parent, inherit
        cfg = inherit(cfg, Parent(a.init_from), given_options(getattr(a, "argv", sys.argv[1:])))
    if a.resume:
        from engine.training.resume import given_options, resumed_config
        cfg = resumed_config(a.resume, cfg, given_options(getattr(a, "argv", sys.argv[1:])))
    summary = run_training(cfg, reporter, resume=a.resume)
    if summary.get("out") and reporter.mode == "human":
        print(f"model written to {summary['out']} (best validation mIoU: {summary.get('best_val_miou')})")
    return summary


def cmd_predict(a, reporter: Reporter) -> dict:
    from engine.data.rasters import parse_band_list
    from engine.inference.predict import predict

    summary = predict(a.model, a.image, a.out, probabilities=a.probabilities, uncertainty=a.uncertainty,
                      polygons=a.polygons, min_area=a.min_area, simplify=a.simplify, batch_size=a.batch_size,
                      overlap=a.overlap, device=a.device, bands=parse_band_list(a.bands),
                      precision=a.precision, aoi=a.aoi, aoi_layer=a.aoi_layer, mask=a.mask, devices=a.devices,
                      num_nodes=a.num_nodes, strategy=a.strategy, trust_checkpoint=a.trust_checkpoint,
                      uncertain_areas=a.uncertain_areas, area_count=a.area_count, area_size=a.area_size,
                      reporter=reporter)
    if reporter.mode == "human" and summary.get("out"):
        print(f"prediction written to {summary['out']} ({summary['tiles']} tiles in {summary['seconds']} s, "
              f"{summary['runner']} on {summary['device']}, {summary['precision']})")
    return summary


def cmd_export(a, reporter: Reporter) -> dict:
    from engine.export import export_onnx

    precision = "fp16" if a.fp16 else "bf16" if a.bf16 else None
    summary = export_onnx(a.model, a.out, reporter, profile=a.profile, force=a.force, quantize=a.quantize,
                          precision=precision, trust_checkpoint=a.trust_checkpoint)
    if reporter.mode == "human":
        print(f"ONNX model{' for Deepness' if a.profile == 'deepness' else ''} written to {summary['out']}; "
              f"parity with PyTorch: max abs diff "
              f"{summary['max_abs_diff']:.2e} (≤ 1e-4)")
        if summary["precision"] != "fp32":
            print(f"{summary['precision']}: same class as fp32 on {summary['argmax_agreement']:.2%} of pixels "
                  f"({summary['agreement_chips']} chips), max probability difference {summary['max_prob_diff']:.2e}")
    return summary


def cmd_evaluate(a, reporter: Reporter) -> dict:
    from engine.evaluate import evaluate

    result = evaluate(a.prediction, a.labels, a.out, a.label_field, a.ignore_index, reporter,
                      report=a.report, model=a.model)
    if reporter.mode == "human":
        print(result["table"])
    return {k: result[k] for k in ("miou", "pixel_accuracy", "per_class", "pixels", "report") if k in result}


def cmd_demo_data(a, reporter: Reporter) -> dict:
    from engine.data.demo import make_demo_scene

    scene = make_demo_scene(a.out, size=a.size, seed=a.seed)
    for kind, path in (("raster", scene.image), ("labels", scene.labels), ("polygons", scene.polygons)):
        reporter.artifact(kind, str(path))
    if reporter.mode == "human":
        print(f"demo scene written to {a.out}: {scene.image.name}, {scene.labels.name}, {scene.polygons.name}")
    return {"image": str(scene.image), "labels": str(scene.labels), "polygons": str(scene.polygons),
            "classes": scene.classes}


def cmd_demo(a, reporter: Reporter) -> dict:
    from engine.demo import run_demo

    return run_demo(a.out, reporter, max_time=a.max_time)


def cmd_embed(a, reporter: Reporter) -> dict:
    from engine.data.rasters import parse_band_list
    from engine.inference.embed import embed

    if a.model and (a.weights != "auto" or a.band_names or a.chip_size):
        raise EngineError("--weights, --band-names and --chip-size go with --backbone; a model folder brings its own",
                          hint="leave them out with --model")
    if a.backbone:
        from engine.models.registry import get_backbone_spec
        get_backbone_spec(a.backbone)  # an unknown name is refused, listing the known ones
    summary = embed(a.model or a.backbone, a.image, a.out, backbone=bool(a.backbone), components=a.components,
                    weights=a.weights,
                    bands=parse_band_list(a.bands), band_names=_split(a.band_names), chip_size=a.chip_size,
                    batch_size=a.batch_size, device=a.device, trust_checkpoint=a.trust_checkpoint,
                    reporter=reporter)
    if reporter.mode == "human" and summary.get("out"):
        print(f"embedding written to {summary['out']}: {summary['bands']} bands on {summary['width']}x"
              f"{summary['height']} patches of {summary['patch_size']} px ({summary['seconds']} s on "
              f"{summary['device']})")
    return summary


def cmd_models(a, reporter: Reporter) -> dict:
    from engine.models.decoders import DECODERS  # torch: imported here, never at module import
    from engine.models.families import encoder_summary
    from engine.models.registry import BACKBONES, BAND_ALIASES, WAVELENGTHS, band_wavelength
    from engine.tuning import METHODS

    rows = []
    for s in BACKBONES.values():
        params, methods = encoder_summary(s)
        rows.append({"name": s.name, "family": s.family, "embed_dim": s.embed_dim, "depth": s.depth,
                     "patch": s.patch_size, "params_m": round(params / 1e6, 1), "bands": list(s.bands),
                     "wavelengths": [band_wavelength(b) for b in s.bands], "methods": methods,
                     "tl": s.tl, "frames": s.frames, "hub": f"{s.hub_repo}/{s.hub_file}" if s.hub_repo else None,
                     "weights_file": s.hub_file, "licence": s.weights_licence})
    if reporter.mode == "human":
        print(f"{'name':<22} {'params':>7}  {'patch':>5}  {'bands':<34} {'licence':<12} weights file (Hugging Face)")
        for r in rows:
            bands = ",".join(r["bands"]) if len(r["bands"]) <= 4 else f"{len(r['bands'])}: {r['bands'][0]}…{r['bands'][-1]}"
            print(f"{r['name']:<22} {r['params_m']:>6.1f}M  {r['patch']:>5}  {bands:<34} {r['licence']:<12} "
                  f"{r['hub'] or '-'}")
        print("any timm model: --backbone timm:NAME (e.g. timm:vit_small_patch16_224, timm:resnet50)")
    # band_aliases: the names users' bands carry -> the models' band names (the table
    # canonical_band uses after upper-casing and replacing '-' by '_'), so callers such as the
    # QGIS plugin can show which bands will match without a copy of the table.
    # tuning_methods and decoders: the choices `train` accepts, "auto" (its default) first.
    # band_wavelengths: centre wavelength (µm) by canonical band name, for the second matching
    # pass (nearest pretrained band within 3 %, engine.models.checkpoints.match_bands)
    return {"models": rows, "band_aliases": dict(BAND_ALIASES), "band_wavelengths": dict(WAVELENGTHS),
            "tuning_methods": ["auto", *(m for m in METHODS if m != "auto")],
            "decoders": ["auto", *(d for d in DECODERS if d != "auto")]}


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "export": cmd_export, "evaluate": cmd_evaluate,
            "demo-data": cmd_demo_data, "demo": cmd_demo, "models": cmd_models,
            "embed": cmd_embed}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "resume", None) and not args.out:  # train --resume DIR writes DIR
        args.out = args.resume
    events_out = sys.stdout
    if args.events == "jsonl":
        sys.stdout = sys.stderr  # stray prints (libraries) must not corrupt the protocol stream
    # Only rank 0 of a distributed run reports (Lightning relaunches this command per process).
    rank0 = all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "RANK"))
    reporter = Reporter(args.events, stream=events_out if args.events == "jsonl" else None, enabled=rank0)
    reporter.install_cancel_handlers(stdin=args.cancel_on_stdin and rank0)  # one reader of stdin's "cancel"
    # run-time faults (engine.reliability): cancel when the caller dies; one job per output, whose
    # lock also lets it remove what killed jobs left beside it; out of memory / disk full explained
    from engine.reliability import explain_fault, guard_outputs, output_paths, watch_parent
    watch_parent(reporter)
    reporter.start(args.command)
    try:
        with guard_outputs(output_paths(args) if rank0 else [], args.command, reporter):
            summary = COMMANDS[args.command](args, reporter)
    except KeyboardInterrupt:
        reporter.cancel()
        reporter.done(ok=False)
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - report, then fail with the traceback on stderr
        user = exc if isinstance(exc, EngineError) else explain_fault(exc, args)
        if user is not None:
            print(f"ERROR: {user.message}" + (f"\n  hint: {user.hint}" if user.hint else ""), file=sys.stderr)
            reporter.error(user.message, getattr(user, "error_type", "EngineError"), user.hint)
            reporter.done(ok=False)
            return EXIT_USER_ERROR
        traceback.print_exc()
        reporter.error(f"internal error: {type(exc).__name__}: {exc}", "InternalError",
                       "this is a bug in GeoPEFT; the log above has the details")
        reporter.done(ok=False)
        return EXIT_INTERNAL_ERROR
    finally:
        sys.stdout = events_out
    summary = dict(summary or {})
    if summary.pop("cancelled", False):  # predict's own word (done carries the reporter's)
        reporter.cancel()
    reporter.done(ok=not reporter.cancelled or bool(summary.get("out")), **summary)
    return EXIT_OK
