"""TerraTorch 1.2.13 side by side, in a throwaway venv (never a project dependency).

``ensure_venv(DIR)`` makes the venv when it is missing: TerraTorch's metadata wants numpy ≥ 2.2
and torchgeo ≥ 0.9, which Debian 12's Python cannot satisfy, so it is installed without its
dependencies plus the ones its model factory and ``tiled_inference`` import, on the machine's
torch/numpy pins (``constraints.txt``). ``tiled(DIR, size)`` runs TerraTorch's
``tiled_inference`` over a random raster of ``size``² in that venv, with the benchmark's model
(Prithvi-EO-2.0-100M, LoRA r 16 on q/v/fc1/fc2, UNet decoder, 224² crops, stride 192,
batch 16, fp32; TerraTorch registers the 100M model only as its TL variant, the same network
when no coordinates are given) and returns its wall time and peak RSS. ``train(DIR, method, steps)``
times training steps of that model (batch 4, 224², fp32) and returns its peak RSS.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSION = "1.2.13"
# What TerraTorch's factory, Prithvi backbone, UNet decoder and tiled_inference import.
REQUIREMENTS = ["peft", "lightning>=2.6", "segmentation-models-pytorch>=0.5", "jsonargparse>=4.40", "torchgeo",
                "einops", "timm>=1.0.15", "huggingface_hub", "torchmetrics", "rioxarray", "albumentations",
                "albucore", "geopandas", "lightly==1.5.22", "h5py", "tifffile", "python-box", "tqdm",
                "tensorboard", "diffusers", "scikit-learn>=1.3.2", "scikit-image", "pyarrow", "rich",
                "termcolor", "pycocotools", "psutil"]

# torchvision's PyPI wheel is built against CUDA torch: on CPU torch its C ops do not load and
# two of its fake-op registrations fail on import. This hook (the same fix as
# engine/models/compat.py) defines the two schemas first when the ops are missing.
TORCHVISION_HOOK = '''
import importlib.abc, sys
class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision._meta_registrations":
            return None
        sys.meta_path.remove(self)
        import torch, torchvision.extension as ext
        if not ext._has_ops():
            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules[__name__]._lib = lib
        return None
sys.meta_path.insert(0, _Hook())
'''

TILED = '''
import json, resource, sys, time
import torch
size, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
from terratorch.models import EncoderDecoderFactory
from terratorch.tasks.tiled_inference import tiled_inference
model = EncoderDecoderFactory().build_model(
    task="segmentation", backbone="prithvi_eo_v2_100_tl", backbone_pretrained=False,
    backbone_bands=["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"], backbone_num_frames=1,
    necks=[{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "ReshapeTokensToImage"},
           {"name": "LearnedInterpolateToPyramidal"}],
    decoder="UNetDecoder", decoder_channels=[512, 256, 128, 64], num_classes=4,
    peft_config={"method": "LORA", "replace_qkv": "qkv", "peft_config_kwargs": {
        "r": 16, "lora_alpha": 16, "target_modules": ["qkv.q_linear", "qkv.v_linear", "mlp.fc1", "mlp.fc2"]}},
).eval()
x = torch.randn(1, 6, size, size)
tiles = 0
def forward(batch):
    global tiles
    tiles += len(batch)
    return model(batch).output
start = time.perf_counter()
with torch.no_grad():
    y = tiled_inference(forward, x, crop=224, stride=192, batch_size=16, verbose=False)
seconds = time.perf_counter() - start
print("RESULT" + json.dumps({"seconds": seconds, "tiles": tiles, "shape": list(y.shape),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

TRAIN = '''
import json, sys, time
import torch
method, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
from terratorch.models import EncoderDecoderFactory
peft = {"method": "LORA", "replace_qkv": "qkv", "peft_config_kwargs": {
    "r": 16, "lora_alpha": 16, "target_modules": ["qkv.q_linear", "qkv.v_linear", "mlp.fc1", "mlp.fc2"]}}
model = EncoderDecoderFactory().build_model(
    task="segmentation", backbone="prithvi_eo_v2_100_tl", backbone_pretrained=False,
    backbone_bands=["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"], backbone_num_frames=1,
    necks=[{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "ReshapeTokensToImage"},
           {"name": "LearnedInterpolateToPyramidal"}],
    decoder="UNetDecoder", decoder_channels=[512, 256, 128, 64], num_classes=2,
    peft_config=peft if method == "lora" else None,
).train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
x, y = torch.randn(4, 6, 224, 224), torch.randint(0, 2, (4, 224, 224))
times = []
for _ in range(steps):
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x).output, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t)
steady = sorted(times[2:])
peak = [int(ln.split()[1]) / 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print("RESULT" + json.dumps({"s_per_step": steady[len(steady) // 2], "times": times, "peak_rss_mib": peak,
      "trainable": sum(p.numel() for p in params)}))
'''


def ensure_venv(folder: str | Path) -> Path:
    """The venv's python, making the venv first when it is missing (a few minutes)."""
    folder = Path(folder)
    python = folder / "bin" / "python"
    if python.exists():
        return python
    print(f"installing TerraTorch {VERSION} into {folder} (a throwaway venv) ...", flush=True)
    # Debian's python with its system packages (GDAL, as the project's own venv), on the same pins
    subprocess.run([os.environ.get("SYSPY", "/usr/bin/python3"), "-m", "venv", "--system-site-packages",
                    str(folder)], check=True)
    pins = ["-c", str(REPO / "constraints.txt")]
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *pins, "torch", "torchvision", *REQUIREMENTS], check=True)
    subprocess.run([*pip, *pins, "--no-deps", f"terratorch=={VERSION}"], check=True)
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "_geopeft_tv_hook.py").write_text(TORCHVISION_HOOK)
    (Path(site) / "_geopeft_tv_hook.pth").write_text("import _geopeft_tv_hook\n")
    subprocess.run([str(python), "-c", "import terratorch.models"], check=True)
    return python


def tiled(python: str | Path, size: int, threads: int) -> dict:
    """TerraTorch's tiled_inference over a random size² 6-band image, in a fresh process."""
    proc = subprocess.run([str(python), "-c", TILED, str(size), str(threads)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"TerraTorch tiled_inference failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT"):])


def train(python: str | Path, method: str, steps: int, threads: int) -> dict:
    """TerraTorch's model (as ``tiled``, 2 classes) trained ``steps`` steps in fp32 on random 224² chips,
    batch 4, AdamW over what trains (``method`` lora: its LoRA on q/v/fc1/fc2, r = α = 16; full: everything),
    in a fresh process: the median step time of steps 3+, peak RSS (VmHWM), trainable parameters."""
    proc = subprocess.run([str(python), "-c", TRAIN, method, str(steps), str(threads)], capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"TerraTorch training failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT"):])
