"""``export --quantize int8``: an int8 copy of the exported fp32 ONNX model, for faster CPU
prediction with onnxruntime alone.

Two ways, both onnxruntime.quantization's own:

- ``int8`` → ``int8-dynamic`` (MatMul/Gemm weights int8, activations quantised on the fly, the
  convolutions, the patch embedding among them, left fp32): no calibration data needed. The
  default: on Prithvi-EO-2.0-100M + UNet at 224² it was both faster than static QDQ (163 vs
  177 ms/tile, fp32 266, 2 cores) and closer to fp32 (99.998 % vs 97.4 % same class).
- ``int8-static`` (QDQ, weights and activations int8, per-channel weights, MinMax calibration
  on chips read from the training images named in the card, normalised as ``predict`` does):
  convolutions are quantised too, but those that see the input bands (the patch embedding, the
  UNet decoder's full-resolution stem) stay fp32. Refused when the training images are no longer readable.

Either way the result is compared with the fp32 model on chips (training chips when available,
else random normal values, i.e. inputs at the training mean ± a few std) and refused below
``MIN_ARGMAX_AGREEMENT`` unless forced; the numbers go into the card.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from engine.inference.runners import cpu_count
from engine.protocol import EngineError, Reporter

MODES = ("int8", "int8-static")
MIN_ARGMAX_AGREEMENT = 0.98
CHIPS = 16
BATCH = 4


def sample_chips(card: dict, count: int = CHIPS, seed: int = 0) -> tuple[np.ndarray, str]:
    """(chips float32 [N, bands, s, s] normalised as predict does, source): ``training`` chips read at
    random from the card's training images when they can be opened, else ``random`` normal values."""
    from rasterio.windows import Window

    from engine.data.chips import normalise
    from engine.data.rasters import RasterStack

    bands, size = card["input"]["bands"], int(card["chip_size"])
    rng = np.random.default_rng(seed)
    images = (card.get("training") or {}).get("images") or []
    if images and all(Path(p).is_file() for p in images):
        try:
            with RasterStack(images, bands) as stack:
                h, w = stack.grid.height, stack.grid.width
                chips = []
                for _ in range(count * 4):  # chips mostly nodata are skipped
                    r, c = int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))
                    data, valid = stack.read(Window(c, r, size, size))
                    if valid.mean() >= 0.5:
                        chips.append(normalise(data, valid, card["input"]["mean"], card["input"]["std"]))
                    if len(chips) == count:
                        return np.stack(chips), "training"
        except EngineError:
            pass  # the images changed since training: fall back to random chips
    shape = (count, len(bands), size, size)
    return rng.standard_normal(shape).astype(np.float32), "random"


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, chips: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: chips[i:i + BATCH]})[0] for i in range(0, len(chips), BATCH)])


def agreement(reference: Path, quantized: Path, chips: np.ndarray) -> dict:
    """Max absolute probability difference and the fraction of pixels with the same argmax class."""
    ref = _run(_session(reference), chips)
    out = _run(_session(quantized), chips)
    return {"max_prob_diff": float(np.abs(ref - out).max()),
            "argmax_agreement": float((ref.argmax(axis=1) == out.argmax(axis=1)).mean())}


@contextlib.contextmanager
def _without_preprocessing_hint():
    """onnxruntime.quantization logs a hint to run its pre-processing on the root logger at every
    call; here it changes nothing (same agreement, same speed, measured), so it is dropped."""
    def keep(record):
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_dynamic_int8(fp32: Path, out: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _without_preprocessing_hint():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=external)


def quantize_static_int8(fp32: Path, out: Path, chips: np.ndarray, external: bool) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    proto = onnx.load(str(fp32), load_external_data=False)
    input_name = proto.graph.input[0].name
    # The first layers stay fp32: the patch embedding and any convolution fed the input bands
    # directly (the UNet decoder's full-resolution stem) see the raw normalised bands.
    first_layers = [n.name for n in proto.graph.node if n.op_type == "Conv"
                    and ("patch_embed" in n.name or n.input[0] == input_name)]
    del proto

    class ChipReader(CalibrationDataReader):
        """The calibration chips, one batch at a time."""

        def __init__(self):
            self._batches = iter([{input_name: chips[i:i + BATCH]} for i in range(0, len(chips), BATCH)])

        def get_next(self):
            return next(self._batches, None)

    reader = ChipReader()
    with _without_preprocessing_hint():
        quantize_static(str(fp32), str(out), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                        nodes_to_exclude=first_layers,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external)


def quantize_int8(fp32: Path, out: Path, card: dict, reporter: Reporter, mode: str = "int8",
                  external: bool = False, seed: int = 0) -> dict:
    """Write an int8 model of ``fp32`` at ``out`` (``mode``: ``int8`` dynamic, ``int8-static``
    calibrated on training chips); returns ``quantize`` (what was done), ``chips`` (their source),
    ``num_chips`` and the agreement with fp32 on those chips."""
    chips, source = sample_chips(card, seed=seed)
    images = (card.get("training") or {}).get("images") or []
    if mode == "int8-static":
        if source != "training":
            raise EngineError("static int8 quantisation calibrates on chips of the training images, and "
                              f"they are not readable: {', '.join(images) or 'none recorded in the card'}",
                              hint="use --quantize int8 (dynamic, no calibration), or put the training "
                                   "images back where the card says")
        quantize_static_int8(fp32, out, chips, external)
        done = "int8-static"
    else:
        quantize_dynamic_int8(fp32, out, external)
        done = "int8-dynamic"
    if source != "training":
        reporter.info("the training images named in the model card are not readable: the int8 model is "
                      "compared with fp32 on random chips (values at the training mean ± a few std)")
    return {"quantize": done, "chips": source, "num_chips": len(chips), **agreement(fp32, out, chips)}


def check_agreement(result: dict, force: bool, reporter: Reporter) -> None:
    text = (f"{result['quantize']} vs fp32 ONNX on {result['num_chips']} {result['chips']} chips: "
            f"{result['argmax_agreement']:.2%} of pixels with the same class, max probability difference "
            f"{result['max_prob_diff']:.2e}")
    if result["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT:
        reporter.info(text)
        return
    if not force:
        raise EngineError(f"{text}: below {MIN_ARGMAX_AGREEMENT:.0%}; nothing written",
                          hint="export without --quantize (fp32), or pass --force to keep the int8 model anyway")
    reporter.warning(f"{text}: below {MIN_ARGMAX_AGREEMENT:.0%}; written anyway (--force)")
