"""Runners turn a batch of normalised chips into class probabilities.

``OnnxRunner`` needs onnxruntime only: this module must never import torch at top level, so
``predict`` with an ``.onnx`` model runs in an environment without torch.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from engine.card import CARD_FILE, card_from_onnx_metadata, read_card
from engine.protocol import EngineError, Reporter



def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# onnxruntime's GPU providers, in the order they are preferred, and the library each is in.
GPU_PROVIDERS = {"TensorrtExecutionProvider": "onnxruntime_providers_tensorrt",
                 "CUDAExecutionProvider": "onnxruntime_providers_cuda"}


def cuda_device_count() -> int:
    """NVIDIA GPUs the driver reports: 0 without a driver (libcuda) or without a GPU. Asked of the
    driver itself (cuInit, cuDeviceGetCount), which costs milliseconds and loads no CUDA runtime."""
    for name in (["nvcuda.dll"] if os.name == "nt" else ["libcuda.so.1", "libcuda.so"]):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def _provider_library_loads(ort, provider: str) -> bool:
    """Whether onnxruntime's library for ``provider`` loads with what this machine has (CUDA,
    cuBLAS, TensorRT libraries), loaded as onnxruntime itself does: first its shared provider
    bridge, globally. onnxruntime-gpu lists its GPU providers whatever is installed; asked for one
    it cannot load, it prints an 'EP Error' on stdout (the jsonl event stream) and falls back."""
    folder = Path(ort.__file__).parent / "capi"
    stem = GPU_PROVIDERS[provider]
    for prefix, suffix in (("lib", ".so"), ("", ".dll")):
        library, bridge = folder / f"{prefix}{stem}{suffix}", folder / f"{prefix}onnxruntime_providers_shared{suffix}"
        if library.is_file():
            try:
                if bridge.is_file():
                    ctypes.CDLL(str(bridge), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                ctypes.CDLL(str(library))
                return True
            except OSError:
                return False
    return False


def onnx_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers for ``device``: TensorRT, CUDA (those usable here) then CPU for
    ``auto``/``gpu``/``cuda``; CPU alone for ``cpu`` or where no GPU is usable (without trying a
    GPU provider, which would print errors)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device not in ("auto", "gpu", "cuda"):
        return providers
    listed = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    if not listed or cuda_device_count() == 0:
        return providers
    return [p for p in listed if _provider_library_loads(ort, p)] + providers


class OnnxRunner:
    """``provider``: the onnxruntime provider that runs the model (TensorRT, CUDA or CPU);
    ``precision``: ``fp32``, ``fp16``, ``int8-dynamic`` or ``int8-static``, as exported."""

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise EngineError(f"ONNX model not found: {path}", hint="pass a file written by 'export'")
        providers = onnx_providers(device)
        if device in ("gpu", "cuda") and len(providers) == 1:
            raise EngineError("--device gpu was asked for but onnxruntime has no usable GPU provider here "
                              "(TensorRT or CUDA: a GPU, its driver and the CUDA libraries)",
                              hint="use --device auto or cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_count()  # the cores this process may use (int8 or fp32)
        try:
            # A GPU provider that fails at session creation (e.g. cuDNN missing) makes onnxruntime print
            # its fallback on stdout: kept off the event stream.
            with contextlib.redirect_stdout(sys.stderr):
                self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
            raise EngineError(f"cannot load ONNX model {path.name}: the file is corrupt, truncated or not an ONNX "
                              f"model ({path.stat().st_size:,} bytes; {str(exc).strip()[:300]})",
                              hint=f"export the model again (python -m engine export); a model exported with its "
                                   f"weights in {path.name}.data needs that file beside it") from None
        self.card = card_from_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, path.name)
        self.input_name = self.session.get_inputs()[0].name
        channels = self.session.get_inputs()[0].shape[1:2]
        bands = len(self.card["input"]["bands"])
        if channels and isinstance(channels[0], int) and channels[0] != bands:
            raise EngineError(f"{path.name} takes {channels[0]} bands but its model card lists {bands}: the card "
                              "does not belong to this network", hint="export the model again")
        self.provider = self.session.get_providers()[0]
        if device in ("gpu", "cuda") and self.provider not in GPU_PROVIDERS:
            raise EngineError(f"--device gpu was asked for but onnxruntime could not start {providers[0]} here",
                              hint="see the onnxruntime messages above; use --device auto or cpu")
        self.device = "cuda" if self.provider in GPU_PROVIDERS else "cpu"
        export = self.card.get("export", {})
        self.precision = export.get("quantize") or export.get("precision") or "fp32"
        # predict's summary reports `quantize or "fp32"` as its precision: fp16 models say fp16 there.
        self.quantize = export.get("quantize") or ("fp16" if self.precision == "fp16" else None)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]


class TorchRunner:
    """``precision``: ``auto`` runs bf16 autocast on CUDA and on CPUs with native bf16, else
    fp32; ``32`` always fp32; ``bf16`` always bf16 autocast."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", reporter: Reporter | None = None,
                 precision: str = "auto", trust_checkpoint: bool = False):
        self.card, folder = read_card(model)  # a bad card is refused before torch is imported

        import torch

        from engine.models.compat import fast_bf16_cpu

        from engine.models.segmentor import Probabilities
        from engine.tuning import merge

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "gpu":
            device = "cuda"
        self.device = torch.device(device)
        # Merged adapters and fused q/k/v: the same outputs (see export's parity check), faster.
        self.model = Probabilities(merge(load_trained_model(self.card, folder, reporter or Reporter("quiet"),
                                                            trust_checkpoint)))
        self.model.eval().to(self.device)
        self._torch = torch
        if precision not in ("auto", "32", "bf16"):
            raise EngineError(f"unknown precision {precision!r}", hint="use auto, 32 or bf16")
        self.bf16 = precision == "bf16" or (precision == "auto" and (self.device.type == "cuda" or fast_bf16_cpu()))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self.model(x).float().cpu().numpy()


def load_runner(model: str | os.PathLike, device: str = "auto", reporter: Reporter | None = None,
                precision: str = "auto", trust_checkpoint: bool = False):
    """``trust_checkpoint``: a model folder's backbone checkpoint may be unpickled (--trust-checkpoint)."""
    if str(model).lower().endswith(".onnx"):
        return OnnxRunner(model, device)  # fp32, fp16 or int8, as exported
    return TorchRunner(model, device, reporter, precision, trust_checkpoint)


def load_trained_model(card: dict, folder: Path, reporter: Reporter, trust_checkpoint: bool = False):
    """Rebuild the trained Segmentor from its card: backbone weights (referenced by path and
    checked by hash; unpickled only with ``trust_checkpoint``), adapters injected, then the
    trained tensors loaded (``load_trained_tensors``)."""
    from engine.models.checkpoints import load_backbone_weights, resolve_weights, sha256_file
    from engine.models.decoders import DECODERS
    from engine.models.registry import BACKBONES, get_backbone_spec, is_backbone
    from engine.models.segmentor import build_segmentor
    from engine.tuning import METHODS, TuningConfig, apply_tuning

    card_file = folder / CARD_FILE
    # names the card's schema cannot check (the registries import torch)
    for what, value, known in (("backbone", card["backbone"]["name"], None), ("decoder", card["decoder"], DECODERS),
                               ("tuning method", card["tuning"]["method"], METHODS)):
        if not (is_backbone(value) if known is None else value in known):
            raise EngineError(f"model card {card_file}: unknown {what} {value!r} (this engine knows: "
                              f"{', '.join(BACKBONES if known is None else known)})", hint="the card was written by another GeoPEFT version or "
                                                           "edited by hand: update GeoPEFT, or train the model again")
    spec = get_backbone_spec(card["backbone"]["name"])
    inp = card["input"]
    model = build_segmentor(spec, len(inp["bands"]), card["chip_size"], len(card["classes"]), card["decoder"],
                            band_names=inp["band_names"], method=card["tuning"]["method"],
                            num_frames=inp.get("frames", 1), metadata="metadata" in inp)
    if "metadata" in inp:  # a -TL model predicts with the dates and location it was trained with
        model.encoder.set_coords(inp["metadata"]["temporal"], inp["metadata"]["location"])
    weights = card["backbone"].get("weights", {})
    if weights.get("source") in ("file", "hub"):
        path = Path(weights["path"]) if weights.get("path") else None
        if path is None or not path.is_file():
            path = resolve_weights(spec, weights.get("url") or "hub", reporter) if weights["source"] == "hub" else None
        if path is None or not path.is_file():
            raise EngineError(f"the backbone weights this model was trained on are missing: {weights.get('path')}",
                              hint="put the backbone checkpoint back at that path (models reference it, "
                                   "never copy it), or export the model to ONNX where it was trained")
        if weights.get("sha256") and sha256_file(path) != weights["sha256"]:
            raise EngineError(f"backbone weights {path} differ from those the model was trained on (sha256)",
                              hint="use the same checkpoint file as in training")
        load_backbone_weights(model.encoder, spec, path, inp["band_names"], Reporter("quiet"), trust=trust_checkpoint)
    apply_tuning(model, TuningConfig(**card["tuning"]))
    load_trained_tensors(model, card, folder)
    return model


def load_trained_tensors(model, card: dict, folder: Path) -> int:
    """The model folder's trained tensors (safetensors only: never unpickled) into ``model``, built
    and tuned as its card says. Returns how many tensors were loaded."""
    from safetensors.torch import load_file

    weights_file = folder / card.get("files", {}).get("weights", "adapter.safetensors")
    if not weights_file.is_file():
        raise EngineError(f"trained weights {weights_file.name} missing from the model folder {folder} (its card.json "
                          "names them)", hint="copy the whole model folder (card.json and its weights file) again, "
                                              "or train the model again")
    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        with open(weights_file, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise EngineError(f"trained weights {weights_file.name} are a pickled PyTorch file (torch.save), not "
                              "safetensors: a model folder's weights are never unpickled (that would run code from "
                              "the file)", hint="train the model again with this engine (it writes "
                                                "adapter.safetensors)") from None
        raise EngineError(f"cannot read trained weights {weights_file.name}: not a whole safetensors file "
                          f"({type(exc).__name__}: {str(exc)[:200]})",
                          hint="copy the model folder again (the file is truncated or damaged), or train again") from None
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing_trained = sorted(set(result.missing_keys) & trainable)
    if result.unexpected_keys or missing_trained:
        raise EngineError(f"trained weights {weights_file.name} do not match the model card "
                          f"(unexpected {result.unexpected_keys[:3]}, missing {missing_trained[:3]})")
    return len(state)
