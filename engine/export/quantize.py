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
``MIN_ARGMAX_AGREEMENT`` unless forced; the numbers go into the card (``engine.export.agreement``,
shared with ``--fp16``).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from engine.export.agreement import BATCH, compare, sample_chips
from engine.protocol import EngineError, Reporter

MODES = ("int8", "int8-static")


def input_facing_convs(graph) -> list:
    """The convolutions that see the input bands: the patch embedding (by name, or a patchifying
    convolution: strides equal to a kernel of 8 px or more) and any convolution fed the graph input
    directly (the UNet decoder's full-resolution stem). They stay fp32 in int8-static and fp16
    models: reduced precision on the raw normalised bands is where errors start (and on some
    backends is known to be wrong)."""
    input_names = {i.name for i in graph.input}
    found = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: list(a.ints) for a in node.attribute}
        strides, kernel = attrs.get("strides", []), attrs.get("kernel_shape", [])
        patchify = bool(strides) and strides == kernel and max(strides) >= 8
        if "patch_embed" in node.name or patchify or node.input[0] in input_names:
            found.append(node)
    return found


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
    first_layers = [n.name for n in input_facing_convs(proto.graph)]
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
    return {"quantize": done, **compare(fp32, out, chips, source, reporter, "int8")}
