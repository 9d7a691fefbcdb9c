"""GeoPEFT benchmarks: training step time and memory, tiled prediction on large rasters, ONNX vs
PyTorch per tile. Each measurement runs in a fresh process (peak RSS is per process) and the
results print as one table, beside the peers' numbers measured on this kind of machine
(see the project's peers notes: TerraTorch 1.2.13, Deepness 0.6.5).

    python bench/run.py            # the default set (~10 min on 2 cores)
    python bench/run.py --quick    # smaller rasters, fewer steps (smoke test)
    python bench/run.py --large    # adds the 8192² raster
    python bench/run.py --prediction-only   # only the per-tile and 2048² prediction rows
    python bench/run.py --terratorch ../ttvenv   # adds TerraTorch side by side (venv made if missing)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEERS = {  # TerraTorch 1.2.13 on this machine kind: Prithvi-EO-2.0-100M-TL, UNet, 224², batch 4, fp32
    "train full": "1.72–1.75 s/step, 2831–2852 MiB",
    "train lora": "1.49–1.50 s/step, 2380–2420 MiB",
    "predict 2048": "16–18 s, 1.9 GiB",
    "predict 4096": "62–68 s, 2.7 GiB",
    "predict 8192": "241 s, 5.8 GiB",
}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: per address space, so unlike ru_maxrss it
    does not carry over the parent's peak through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- measurements (child processes)
def bench_train(method: str, backbone: str, steps: int, precision: str, band_names: list[str] | None = None,
                chip: int = 224, batch: int = 4, levers: bool = True, device: str = "cpu",
                checkpoint: bool | None = None) -> dict:
    """Training steps on random chips (``batch`` × ``chip``², the decoder ``train`` pairs with the
    method: UNet, the linear head for linear-probe; AdamW, 2 classes): the median
    step time of steps 3+, peak memory (this process's RSS; on a GPU the most it allocated) and the
    parameter counts. ``band_names``: the input bands (default: the backbone's pretraining bands).
    ``levers``: training's memory levers, as ``train`` uses them (activation checkpointing of
    frozen blocks, frozen block weights in bf16 under bf16 autocast); off: as before them.
    ``checkpoint``: the activation checkpointing alone (default: as ``levers``; False with levers
    on is what ``train --no-activation-checkpointing`` trains with)."""
    import torch

    import engine.models  # noqa: F401
    from engine.models import blocks
    from engine.models.decoders import default_decoder
    from engine.models.registry import get_backbone_spec
    from engine.models.segmentor import build_segmentor
    from engine.training.memory import frozen_weights_in_bf16, use_bf16_weights
    from engine.training.train import resolve_accelerator
    from engine.tuning import TuningConfig, apply_tuning, count_parameters

    accelerator, precision = resolve_accelerator(device, precision)
    dev = torch.device("cuda" if accelerator == "gpu" else "cpu")
    spec = get_backbone_spec(backbone)
    bands = list(band_names) if band_names else list(spec.bands)
    torch.manual_seed(0)
    model = build_segmentor(spec, len(bands), chip, 2, decoder=default_decoder(method), band_names=bands, method=method)
    model = apply_tuning(model, TuningConfig(method)).to(dev).train()
    counts = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, len(bands), chip, chip, device=dev)
    y = torch.randint(0, 2, (batch, chip, chip), device=dev)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    times = []
    with blocks.checkpointing(levers if checkpoint is None else checkpoint), \
            frozen_weights_in_bf16(model, levers and use_bf16_weights(precision, accelerator)):
        for _ in range(steps):
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    steady = sorted(times[2:] or times)  # steps 3+
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else peak_rss_mib()
    return {"s_per_step": steady[len(steady) // 2], "peak_rss_mib": peak, "peak_kind": "cuda" if
            dev.type == "cuda" else "rss", "trainable": counts["trainable"], "adapter": counts["adapter"],
            "total": counts["total"], "precision": precision}


def bench_reference() -> dict:
    """The peers' machine reference point: timm ViT-S/16, 6 bands, 224², batch 8, fp32.
    Scale peer numbers by (this / 34 ms) to compare across machines and days."""
    import torch

    import engine.models  # noqa: F401
    import timm

    model = timm.create_model("vit_small_patch16_224", in_chans=6, num_classes=0).eval()
    x = torch.randn(8, 6, 224, 224)
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(3):
            model(x)
    return {"ms_per_tile": (time.perf_counter() - t) / 24 * 1000}


def make_model_folder(folder: Path, backbone: str, chip: int) -> Path:
    """An untrained LoRA model folder (random backbone saved with it), like 'train' writes."""
    import torch

    import engine.models  # noqa: F401
    from engine import __version__
    from engine.card import CARD_VERSION, write_card
    from engine.models.segmentor import build_segmentor
    from engine.tuning import TuningConfig, apply_tuning, trainable_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = apply_tuning(build_segmentor(backbone, 6, chip, 4), TuningConfig("lora"))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model, include_frozen=True), str(folder / "adapter.safetensors"))
    write_card({"card_version": CARD_VERSION, "engine_version": __version__,
                "backbone": {"name": backbone, "weights": {"source": "random"}}, "decoder": "unet",
                "tuning": TuningConfig("lora").as_dict(),
                "input": {"bands": [1, 2, 3, 4, 5, 6], "band_names": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"],
                          "mean": [1000.0] * 6, "std": [500.0] * 6},
                "classes": [{"value": i, "name": f"c{i}", "colour": "#112233"} for i in range(1, 5)],
                "chip_size": chip, "files": {"weights": "adapter.safetensors"}}, folder)
    return folder


def make_raster(path: Path, size: int) -> Path:
    """A random 6-band uint16 raster, written in strips (never all in memory)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 6, "dtype": "uint16", "nodata": 0,
               "crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 10, 10), "tiled": True,
               "blockxsize": 256, "blockysize": 256}
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, 512):
            h = min(512, size - r)
            dst.write(rng.integers(100, 4000, (6, h, size), dtype=np.uint16), window=Window(0, r, size, h))
    return path


def bench_predict(model: str, image: str, out: str, overlap: int, batch: int) -> dict:
    from engine.inference.predict import predict

    t = time.perf_counter()
    summary = predict(model, [image], out, overlap=overlap, batch_size=batch)
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib(), "tiles": summary["tiles"],
            "torch_loaded": "torch" in sys.modules}


def bench_streaming(model: str, image: str, out: str, overlap: int, batch: int) -> dict:
    """predict's wall time against the model's pure forward over the same tiles in the same
    batches, from memory (no reading, blending or writing): the cost of streaming."""
    import numpy as np
    import rasterio

    import engine.inference.predict as predict_module
    from engine.data.chips import tile_starts
    from engine.inference.runners import load_runner

    runner = load_runner(model)
    size = int(runner.card["chip_size"])
    with rasterio.open(image) as ds:
        rows, cols = (tile_starts(n, size, size - overlap) for n in (ds.height, ds.width))
    x = np.random.default_rng(0).standard_normal((batch, len(runner.card["input"]["bands"]), size, size),
                                                 dtype=np.float32)
    runner(x)  # warm-up
    start = time.perf_counter()
    for _ in rows:  # predict batches the tiles of one row of tiles at a time
        for b in range(0, len(cols), batch):
            runner(x[:len(cols[b:b + batch])])
    forward = time.perf_counter() - start
    predict_module.load_runner = lambda *a, **k: runner  # the loaded model: time the streaming only
    start = time.perf_counter()
    summary = predict_module.predict(model, [image], out, overlap=overlap, batch_size=batch)
    return {"forward_s": forward, "predict_s": time.perf_counter() - start, "tiles": summary["tiles"]}


def bench_tiles(model: str, onnx: str, chip: int, batch: int, repeats: int, onnx_int8: str | None = None) -> dict:
    import numpy as np

    from engine.inference.runners import OnnxRunner, TorchRunner

    x = np.random.default_rng(0).standard_normal((batch, 6, chip, chip)).astype(np.float32)
    out = {}
    runners = [("torch", TorchRunner(model)), ("onnxruntime", OnnxRunner(onnx))]
    if onnx_int8:
        runners.append(("onnxruntime int8", OnnxRunner(onnx_int8)))
    for name, runner in runners:
        runner(x)  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            runner(x)
        out[name] = (time.perf_counter() - t) / (repeats * batch) * 1000
    return out


def child(kind: str, kwargs: dict, module: str = "bench.run") -> dict:
    """Run one measurement, the function ``kind`` of ``module``, in a fresh interpreter; returns
    its JSON result."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from {module} import {kind}; "
            f"print('RESULT' + json.dumps({kind}(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT"):])


def side_by_side(venv: str, model: Path, image: Path, tmp: Path, size: int, rounds: int) -> list[tuple]:
    """GeoPEFT predict (torch) and TerraTorch tiled_inference on the same size, same model
    shape (Prithvi-EO-2.0-100M LoRA + UNet), crops 224, stride 192, batch 16, interleaved."""
    from bench.peers import terratorch

    python = terratorch.ensure_venv(venv)
    ours, peer = [], []
    for _ in range(rounds):
        ours.append(child("bench_predict", {"model": str(model), "image": str(image), "out": str(tmp / "sbs.tif"),
                                            "overlap": 32, "batch": 16}))
        peer.append(terratorch.tiled(python, size, os.cpu_count() or 1))
    best_ours = min(ours, key=lambda r: r["seconds"])
    best_peer = min(peer, key=lambda r: r["seconds"])
    rows = [(f"side by side {size}²: GeoPEFT torch vs TerraTorch",
             f"{best_ours['seconds']:.0f} s, {best_ours['peak_rss_mib'] / 1024:.2f} GiB",
             f"{best_peer['seconds'] / best_ours['seconds']:.2f}× TerraTorch's throughput (target ≥ 2×), "
             f"{best_ours['peak_rss_mib'] / best_peer['peak_rss_mib']:.2f}× its memory; best of {rounds}",
             f"{best_peer['seconds']:.0f} s, {best_peer['peak_rss_mib'] / 1024:.2f} GiB (measured now)")]
    print(rows[-1], flush=True)
    return rows


def memory_scaling(tmp: Path, sizes: list[int]) -> list[tuple]:
    """Peak RSS of predict against raster size, with the small prithvi_eo_v2_tiny (the memory
    that grows with the raster is the strips', not the model's; a small model makes it show).
    Batch 4 at every size: a 1024-wide raster has 6 tiles per row, so a larger batch would be
    fuller (more activations) on the larger rasters and hide what the raster's size costs."""
    model = make_model_folder(tmp / "tiny", "prithvi_eo_v2_tiny", 224)
    rows, first = [], None
    for size in sizes:
        image = make_raster(tmp / f"s{size}.tif", size)
        r = child("bench_predict", {"model": str(model), "image": str(image), "out": str(tmp / f"s{size}.out.tif"),
                                    "overlap": 32, "batch": 4})
        image.unlink()
        (tmp / f"s{size}.out.tif").unlink()
        first = first or r["peak_rss_mib"]
        rows.append((f"predict {size}² × 6, prithvi_eo_v2_tiny, batch 4 (memory)", f"{r['seconds']:.0f} s, "
                     f"{r['peak_rss_mib'] / 1024:.2f} GiB", f"{r['peak_rss_mib'] / first:.2f}× the {sizes[0]}² peak",
                     "—"))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--backbone", default="prithvi_eo_v2_100")
    ap.add_argument("--terratorch", metavar="VENV",
                    help="also run TerraTorch 1.2.13's tiled_inference side by side, from this venv (made when "
                         "missing: a few minutes; never a project dependency)")
    ap.add_argument("--prediction-only", action="store_true",
                    help="skip training; per tile and 2048² prediction only (torch, ONNX fp32 and int8)")
    args = ap.parse_args()
    steps = 5 if args.quick else 10
    sizes = [1024] if args.quick else [2048] if args.prediction_only else \
        [2048, 4096] + ([8192] if args.large else [])
    rows = []
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"backbone {args.backbone}", flush=True)
    ref = child("bench_reference", {})["ms_per_tile"]
    rows.append(("machine reference: timm ViT-S/16 fp32", f"{ref:.0f} ms/tile", f"this machine is {ref / 34:.1f}× "
                 "slower than where the peers were measured", "34 ms/tile"))
    print(rows[-1], flush=True)
    for method in () if args.prediction_only else ("full", "lora"):
        r = child("bench_train", {"method": method, "backbone": args.backbone, "steps": steps, "precision": "32"})
        rows.append((f"train {method} (fp32, 224², batch 4)", f"{r['s_per_step']:.2f} s/step, {r['peak_rss_mib']:.0f} MiB",
                     f"{r['trainable'] / 1e6:.1f}M trainable" + (f" ({r['adapter'] / 1e6:.2f}M LoRA)" if r["adapter"] else ""),
                     PEERS[f"train {method}"]))
        print(rows[-1], flush=True)
    if not args.prediction_only:
        r = child("bench_train", {"method": "lora", "backbone": args.backbone, "steps": steps,
                                  "precision": "bf16-mixed"})
        rows.append(("train lora (bf16 autocast)", f"{r['s_per_step']:.2f} s/step, {r['peak_rss_mib']:.0f} MiB",
                     "patch embedding kept fp32; frozen blocks checkpointed, their Linear weights bf16", "—"))
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model_folder(tmp / "model", args.backbone, 224)
        from engine.export import export_onnx
        onnx = tmp / "model.onnx"
        export = export_onnx(model, onnx)
        rows.append(("export ONNX (merged LoRA)", f"max abs diff {export['max_abs_diff']:.1e}",
                     f"{export['size_bytes'] / 2**20:.0f} MiB", "not in TerraTorch"))
        # The int8 agreement is on random chips (this model has no training images) and an
        # untrained model's near-tied classes: it is reported, not a gate here.
        onnx_int8 = tmp / "model.int8.onnx"
        export = export_onnx(model, onnx_int8, quantize="int8", force=True)
        rows.append((f"export ONNX {export['quantize']}", f"{export['argmax_agreement']:.2%} same class as fp32",
                     f"{export['size_bytes'] / 2**20:.0f} MiB, max prob diff {export['max_prob_diff']:.1e}",
                     "not in TerraTorch"))
        print(rows[-1], flush=True)
        t = child("bench_tiles", {"model": str(model), "onnx": str(onnx), "onnx_int8": str(onnx_int8), "chip": 224,
                                  "batch": 16, "repeats": 2 if args.quick else 4})
        rows.append(("per tile 224², batch 16", f"torch (bf16 auto) {t['torch']:.0f} ms, onnxruntime {t['onnxruntime']:.0f} ms",
                     "", "—"))
        rows.append(("per tile 224², batch 16: onnxruntime int8", f"{t['onnxruntime int8']:.0f} ms",
                     f"{t['onnxruntime'] / t['onnxruntime int8']:.2f}× ONNX fp32, "
                     f"{t['torch'] / t['onnxruntime int8']:.2f}× torch bf16 auto (throughput)", "—"))
        print(*rows[-2:], sep="\n", flush=True)
        for size in sizes:
            image = make_raster(tmp / f"r{size}.tif", size)
            seconds = {}
            for runner, m in (("torch", model), ("onnx", onnx), ("onnx int8", onnx_int8)):
                r = child("bench_predict", {"model": str(m), "image": str(image),
                                            "out": str(tmp / f"p{size}{runner.replace(' ', '')}.tif"),
                                            "overlap": 32, "batch": 16})
                seconds[runner] = r["seconds"]
                label = {"torch": "torch, bf16 auto", "onnx": "onnxruntime, fp32",
                         "onnx int8": "onnxruntime int8"}[runner]
                ratios = (f", {seconds['onnx'] / r['seconds']:.2f}× ONNX fp32, {seconds['torch'] / r['seconds']:.2f}× "
                          "torch" if runner == "onnx int8" else "")
                rows.append((f"predict {size}² × 6 ({label})", f"{r['seconds']:.0f} s, {r['peak_rss_mib'] / 1024:.2f} GiB",
                             f"{r['tiles']} tiles" + ("" if r["torch_loaded"] else ", torch not loaded") + ratios,
                             PEERS.get(f"predict {size}", "—") if runner == "torch" else "—"))
                print(rows[-1], flush=True)
            if size == sizes[0]:
                r = child("bench_streaming", {"model": str(model), "image": str(image),
                                              "out": str(tmp / "stream.tif"), "overlap": 32, "batch": 16})
                rows.append((f"streaming {size}² (torch)", f"predict {r['predict_s']:.1f} s vs pure forward "
                             f"{r['forward_s']:.1f} s", f"streaming throughput = {r['forward_s'] / r['predict_s']:.0%} "
                             "of the forward on in-memory tiles (target ≥ 90 %)", "—"))
                print(rows[-1], flush=True)
                if args.terratorch:
                    rows.extend(side_by_side(args.terratorch, model, image, tmp, size, rounds=1 if args.quick else 2))
            image.unlink()
        rows.extend(memory_scaling(tmp, [1024, 10240] + ([20480] if args.large else []) if not args.quick
                                   else [512, 2048]))
    print()
    widths = [max(len(str(r[i])) for r in rows + [("what", "GeoPEFT", "notes", "TerraTorch 1.2.13")]) for i in range(4)]
    header = ("what", "GeoPEFT", "notes", "TerraTorch 1.2.13")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
