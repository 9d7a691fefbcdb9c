"""The PEFT matrix, as the paper tabulates it: per backbone × tuning method, the trainable
parameters, peak training memory, median training step time and the mIoU reached in a fixed time
on a real chip. Every measurement runs in a fresh process (peak memory is per process).

- step time and memory: ``bench.run.bench_train``, batch 4 of random 224² chips, UNet decoder
  (the linear head for linear-probe, as ``train`` pairs them), AdamW, the precision ``train``
  chooses (bf16 autocast on GPUs and bf16-capable CPUs), with training's memory levers on
  (activation checkpointing of frozen blocks, frozen block weights in bf16); memory is the peak
  RSS (VmHWM) on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU;
- mIoU: the engine's ``train`` (its defaults: chip size, batch, learning rate by method) for
  ``--budget`` seconds on the left half of the real Sen1Floods11 chip in tests/data (13-band
  Sentinel-2 L1C, 512², hand-labelled water; see tests/data/README.md), labels -1 = none, seed 0,
  then ``predict`` on the chip and ``evaluate`` on the right half (the split of
  tests/test_real_chip.py). Each backbone reads the chip's bands it was pretrained on, picked by
  name (B2 → BLUE, …): Prithvi its 6 HLS bands, Clay its 10, the DeCUR ResNet all 13, an RGB
  timm model B4 B3 B2.

No weights are downloaded: backbones start from random weights (the table says so) unless
``--weights-dir`` holds their published files (by file name, e.g. Prithvi_EO_V2_100M_TL.pt; a
timm model's ``model.safetensors`` in a folder named after it, e.g. timm_vit_base_patch16_224/).
A method a backbone does not offer (its encoder's ``methods``) is left out; one the engine
refuses (an EngineError) prints n/a. With ``--terratorch VENV`` a TerraTorch 1.2.13 LoRA row
(Prithvi-EO-2.0-100M, the same batch and size, fp32 as TerraTorch runs) is measured side by side
and the footer gives our LoRA's memory and step time against it and against our full fine-tuning;
a row with the memory levers off shows what they save.

    python bench/peft_matrix.py --terratorch ../ttvenv             # the whole matrix (make bench-matrix)
    python bench/peft_matrix.py --quick                            # smoke test: 2 backbones, tiny budget
    python bench/peft_matrix.py --backbones prithvi_eo_v2_100 --methods lora,full --budget 60
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import child  # noqa: E402 - after the path

IMAGE = REPO / "tests" / "data" / "Spain_7370579_S2Hand.tif"
LABELS = REPO / "tests" / "data" / "Spain_7370579_LabelHand.tif"
CUT = 256  # train on columns [0, CUT), score on [CUT, 512), as tests/test_real_chip.py
BACKBONES = ("prithvi_eo_v2_100", "prithvi_eo_v2_300", "clay_v1", "decur_rn50_s2", "timm:vit_base_patch16_224")
QUICK_BACKBONES = ("prithvi_eo_v2_100", "decur_rn50_s2")
METHODS = ("lora", "dora", "vpt", "vit-adapter", "linear-probe", "full")
REFERENCE = "prithvi_eo_v2_100"  # the backbone TerraTorch runs side by side


# ---------------------------------------------------------------- in the child processes
def chip_bands(backbone: str) -> tuple[list[int], list[str]]:
    """The chip's bands (1-based indices, the raster's own names) the backbone was pretrained on,
    in its order, matched by name; every band when none matches (the engine then starts them fresh)."""
    import rasterio

    import engine.models  # noqa: F401
    from engine.models.registry import canonical_band, get_backbone_spec

    with rasterio.open(IMAGE) as src:
        names = list(src.descriptions)
    canonical = [canonical_band(n) for n in names]
    wanted = [canonical_band(b) for b in get_backbone_spec(backbone).bands]
    found = [canonical.index(b) for b in wanted if b in canonical]
    if not found:
        found = list(range(len(names)))
    return [i + 1 for i in found], [names[i] for i in found]


def _refused(exc) -> dict:
    return {"error": f"{exc}" + (f" ({exc.hint})" if getattr(exc, "hint", None) else "")}


def step_cell(backbone: str, method: str, steps: int, precision: str = "auto", device: str = "auto",
              levers: bool = True, chip: int = 224, batch: int = 4, checkpoint: bool | None = None) -> dict:
    """``bench_train`` on the backbone's bands of the chip; an EngineError as {"error": …}."""
    from engine.protocol import EngineError

    from bench.run import bench_train

    try:
        _, names = chip_bands(backbone)
        return bench_train(method, backbone, steps, precision, band_names=names, chip=chip, batch=batch,
                           levers=levers, device=device, checkpoint=checkpoint)
    except EngineError as exc:
        return _refused(exc)


def miou_cell(backbone: str, method: str, budget: float, train_labels: str, test_labels: str, out: str,
              weights: str = "none", precision: str = "auto", device: str = "auto", seed: int = 0,
              trust_checkpoint: bool = False) -> dict:
    """Train for ``budget`` seconds through the engine's ``train``, predict the chip, score the
    held-out half; an EngineError as {"error": …}."""
    from engine.evaluate import evaluate
    from engine.inference.predict import predict
    from engine.protocol import EngineError
    from engine.training.train import TrainConfig, run_training
    from engine.tuning import TuningConfig

    try:
        bands, _ = chip_bands(backbone)
        cfg = TrainConfig(images=[str(IMAGE)], labels=train_labels, out=str(Path(out) / "model"), bands=bands,
                          ignore_index=-1, backbone=backbone, weights=weights, tuning=TuningConfig(method),
                          epochs=100000, max_time=f"{budget:g}s", seed=seed, device=device, precision=precision,
                          trust_checkpoint=trust_checkpoint)
        started = time.monotonic()
        summary = run_training(cfg)
        trained = time.monotonic() - started
        pred = str(Path(out) / "pred.tif")
        predict(summary["out"], [str(IMAGE)], pred, device=device, trust_checkpoint=trust_checkpoint)
        result = evaluate(pred, test_labels, ignore_index=-1)
        card = json.loads((Path(summary["out"]) / "card.json").read_text())
    except EngineError as exc:
        return _refused(exc)
    return {"miou": result["miou"], "val_miou": summary["best_val_miou"], "steps": summary["steps"],
            "epochs": summary["epochs"], "train_s": trained, "chip": card["chip_size"],
            "weights": card["backbone"]["weights"].get("source"), "bands": len(bands)}


# ---------------------------------------------------------------- the parent
def label_halves(folder: Path) -> tuple[Path, Path]:
    """The label raster with only the left (training) or right (scoring) half labelled."""
    import numpy as np
    import rasterio

    with rasterio.open(LABELS) as src:
        profile, labels = src.profile, src.read(1)
    paths = []
    for name, cols in (("train", slice(0, CUT)), ("test", slice(CUT, None))):
        part = np.full_like(labels, -1)
        part[:, cols] = labels[:, cols]
        paths.append(folder / f"labels_{name}.tif")
        with rasterio.open(paths[-1], "w", **profile) as dst:
            dst.write(part, 1)
    return paths[0], paths[1]


def supported_methods(backbone: str) -> tuple[str, ...] | None:
    """The encoder's ``methods`` (built on the meta device: no memory, no time); None if it cannot be built."""
    import torch

    import engine.models  # noqa: F401
    from engine.models.families import build_encoder
    from engine.models.registry import get_backbone_spec
    from engine.protocol import EngineError

    try:
        spec = get_backbone_spec(backbone)
        with torch.device("meta"):
            encoder = build_encoder(spec, list(spec.bands), 224)
        return tuple(encoder.methods)
    except EngineError:
        return None
    except Exception:  # noqa: BLE001 - cannot be built on the meta device: let every cell try
        return METHODS


def weights_for(backbone: str, folder: str | None) -> str:
    """A published weights file for the backbone in ``folder``, else "none" (random weights)."""
    if not folder:
        return "none"
    from engine.models.registry import get_backbone_spec

    spec = get_backbone_spec(backbone)
    name = Path(spec.hub_file or "").name
    for path in (Path(folder) / backbone.replace(":", "_") / name, Path(folder) / name):
        if name and path.is_file():
            return str(path)
    return "none"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def run(args) -> dict:
    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; device "
          f"{args.device}, precision {args.precision}; {args.steps} steps per timing, {args.budget:g} s training "
          "per mIoU cell", flush=True)
    results: dict = {"cells": [], "extra": {}}
    scratch = Path(tempfile.mkdtemp(prefix="geopeft-matrix-"))
    train_labels, test_labels = label_halves(scratch)
    step_args = {"steps": args.steps, "precision": args.precision, "device": args.device}

    def step(backbone, method, levers=True, checkpoint=None):
        try:
            return child("step_cell", {"backbone": backbone, "method": method, "levers": levers,
                                       "checkpoint": checkpoint, **step_args},
                         module="bench.peft_matrix")
        except RuntimeError as exc:  # a crash (not a refusal): shown, the matrix goes on
            return {"error": str(exc).strip().splitlines()[-1]}

    # Side by side first (one after the other, nothing else running in between): TerraTorch's LoRA,
    # ours with and without the memory levers, our full fine-tuning.
    if args.terratorch and REFERENCE in backbones:
        from bench.peers import terratorch

        python = terratorch.ensure_venv(args.terratorch)
        try:
            results["extra"]["terratorch_lora"] = terratorch.train(python, "lora", args.steps, torch.get_num_threads())
        except RuntimeError as exc:
            results["extra"]["terratorch_lora"] = {"error": str(exc).strip().splitlines()[-1]}
        print("TerraTorch LoRA", results["extra"]["terratorch_lora"], flush=True)
    if args.levers_off_row and REFERENCE in backbones and "lora" in methods:
        results["extra"]["lora_levers_off"] = step(REFERENCE, "lora", levers=False)
        print("lora, levers off", results["extra"]["lora_levers_off"], flush=True)
        results["extra"]["lora_no_checkpointing"] = step(REFERENCE, "lora", checkpoint=False)
        print("lora, no activation checkpointing", results["extra"]["lora_no_checkpointing"], flush=True)

    for backbone in backbones:
        offered = supported_methods(backbone)
        weights = weights_for(backbone, args.weights_dir)
        for method in methods:
            cell = {"backbone": backbone, "method": method, "weights": "pretrained" if weights != "none" else "random"}
            if offered is None:
                cell["error"] = "not in the registry"
            elif method not in offered:
                continue  # the backbone does not offer it
            else:
                cell["step"] = step(backbone, method)
                if "error" not in cell["step"] and args.budget > 0:
                    out = scratch / f"{backbone.replace(':', '_')}-{method}"
                    try:
                        cell["miou"] = child("miou_cell", {
                            "backbone": backbone, "method": method, "budget": args.budget,
                            "train_labels": str(train_labels), "test_labels": str(test_labels), "out": str(out),
                            "weights": weights, "precision": args.precision, "device": args.device,
                            "trust_checkpoint": args.trust_checkpoint}, module="bench.peft_matrix")
                    except RuntimeError as exc:
                        cell["miou"] = {"error": str(exc).strip().splitlines()[-1]}
            results["cells"].append(cell)
            print(json.dumps(cell), flush=True)
    import shutil
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def table(results: dict, args) -> str:
    kinds = {c["step"].get("peak_kind") for c in results["cells"] if "step" in c}
    memory = "peak GPU memory (MiB)" if "cuda" in kinds else "peak RSS (MiB)"
    weights = ('random weights (weights="none": none downloaded)' if {c["weights"] for c in results["cells"]} <=
               {"random"} else "pretrained weights where --weights-dir holds them, else random")
    lines = [f"PEFT matrix: {weights}; step time and memory: batch 4, 224², UNet (linear head for linear-probe), "
             f"memory levers on; mIoU: {args.budget:g} s of training on the left half of the Sen1Floods11 chip, "
             "scored on the right half", "",
             f"| backbone | method | weights | trainable | {memory} | step (s) | mIoU | steps trained |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []

    def note(text):
        notes.append(text)
        return f"n/a [{len(notes)}]"

    for c in results["cells"]:
        if "error" in c:
            lines.append(f"| {c['backbone']} | {c['method']} | | {note(c['error'])} | | | | |")
            continue
        s, m = c.get("step", {}), c.get("miou", {})
        if "error" in s:
            lines.append(f"| {c['backbone']} | {c['method']} | {c['weights']} | {note(s['error'])} | | | | |")
            continue
        miou = ("—" if not m else note(m["error"]) if "error" in m else f"{m['miou']:.3f}")
        lines.append(f"| {c['backbone']} | {c['method']} | {c['weights']} | {fmt_params(s['trainable'])} "
                     f"({s['trainable'] / s['total']:.1%}) | {s['peak_rss_mib']:.0f} | {s['s_per_step']:.2f} | "
                     f"{miou} | "
                     f"{m.get('steps', '—') if m and 'error' not in m else '—'} |")
    extra = results["extra"]
    tt, off = extra.get("terratorch_lora"), extra.get("lora_levers_off")
    fast = extra.get("lora_no_checkpointing")
    for row, label in ((off, "lora, memory levers off"), (fast, "lora, --no-activation-checkpointing")):
        if row and "error" not in row:
            lines.append(f"| {REFERENCE} | {label} | random | {fmt_params(row['trainable'])} | "
                         f"{row['peak_rss_mib']:.0f} | {row['s_per_step']:.2f} | | |")
    if tt:
        lines.append("| TerraTorch 1.2.13 prithvi_eo_v2_100_tl | lora (fp32) | random | " +
                     (note(tt["error"]) + " | | |" if "error" in tt else
                      f"{fmt_params(tt['trainable'])} | {tt['peak_rss_mib']:.0f} | {tt['s_per_step']:.2f} |") + " | |")
    ours = {c["method"]: c["step"] for c in results["cells"]
            if c["backbone"] == REFERENCE and "error" not in c and "error" not in c.get("step", {"error": 1})}
    footer = []
    if "lora" in ours:
        lora = ours["lora"]
        if tt and "error" not in tt:
            footer.append(f"LoRA / TerraTorch LoRA ({REFERENCE}): memory "
                          f"{lora['peak_rss_mib'] / tt['peak_rss_mib']:.2f}×, "
                          f"step time {lora['s_per_step'] / tt['s_per_step']:.2f}× (targets ≤ 0.6×)")
        if "full" in ours:
            footer.append(f"LoRA / our full fine-tuning ({REFERENCE}): memory "
                          f"{lora['peak_rss_mib'] / ours['full']['peak_rss_mib']:.2f}× (target ≤ 0.5×), step time "
                          f"{lora['s_per_step'] / ours['full']['s_per_step']:.2f}×")
        if fast and "error" not in fast and tt and "error" not in tt:
            footer.append(f"LoRA with --no-activation-checkpointing / TerraTorch LoRA: memory "
                          f"{fast['peak_rss_mib'] / tt['peak_rss_mib']:.2f}×, step time "
                          f"{fast['s_per_step'] / tt['s_per_step']:.2f}×" +
                          (f"; / our full fine-tuning: memory {fast['peak_rss_mib'] / ours['full']['peak_rss_mib']:.2f}×"
                           if "full" in ours else ""))
        if off and "error" not in off:
            footer.append(f"memory levers ({REFERENCE} LoRA): {off['peak_rss_mib']:.0f} → "
                          f"{lora['peak_rss_mib']:.0f} MiB "
                          f"({lora['peak_rss_mib'] / off['peak_rss_mib']:.2f}×), step {off['s_per_step']:.2f} → "
                          f"{lora['s_per_step']:.2f} s ({lora['s_per_step'] / off['s_per_step']:.2f}×)")
    lines += [""] + footer + [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated registry names")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated tuning methods")
    ap.add_argument("--budget", type=float, default=120, help="seconds of training per mIoU cell (0: no mIoU)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per timing (the median of steps 3+)")
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {', '.join(QUICK_BACKBONES)}, 5 s budget, "
                    "5 steps (other options still apply when given)")
    ap.add_argument("--device", default="auto", help="auto, cpu or gpu")
    ap.add_argument("--precision", default="auto", help="as train's --precision")
    ap.add_argument("--weights-dir", help="a folder with the backbones' published weights files (else random)")
    ap.add_argument("--trust-checkpoint", action="store_true", help="as train's (pickled checkpoints, e.g. Clay's)")
    ap.add_argument("--terratorch", metavar="VENV", help="also TerraTorch 1.2.13's LoRA side by side, from this venv "
                    "(made when missing: a few minutes; never a project dependency)")
    ap.add_argument("--no-levers-row", dest="levers_off_row", action="store_false",
                    help=f"skip the {REFERENCE} LoRA row measured with the memory levers off")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        if "--backbones" not in given:
            args.backbones = ",".join(QUICK_BACKBONES)
        if "--budget" not in given:
            args.budget = 5
        if "--steps" not in given:
            args.steps = 5
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    results = run(args)
    text = table(results, args)
    print("\n" + text + f"\n\n({(time.monotonic() - started) / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
