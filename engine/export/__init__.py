"""``export``: merge the adapters into the backbone and write one ONNX file that predicts with
onnxruntime alone; the model card travels in the ONNX metadata."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np

from engine.card import read_card
from engine.data.rasters import atomic_output
from engine.inference.runners import ONNX_CARD_KEY, load_trained_model
from engine.protocol import EngineError, Reporter

PARITY_TOLERANCE = 1e-4
OPSET = 17  # IR 8 with the TorchScript exporter: loads in older onnxruntime builds too


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None,
                seed: int = 0) -> dict:
    reporter = reporter or Reporter("quiet")
    import onnx
    import onnxruntime as ort
    import torch

    from engine.models.segmentor import Probabilities
    from engine.tuning import merge

    if not str(out).lower().endswith(".onnx"):
        raise EngineError(f"--out {out} should end in .onnx")
    card, folder = read_card(model_dir)
    reporter.progress("export", 1, 4, "loading the trained model")
    trained = Probabilities(load_trained_model(card, folder, reporter)).eval()
    merged = merge(copy.deepcopy(trained)).eval()
    c, s = len(card["input"]["bands"]), int(card["chip_size"])
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, c, s, s)).astype(np.float32))
    with torch.inference_mode():
        reference = trained(x).numpy()
        merged_out = merged(x).numpy()
    merge_diff = float(np.abs(reference - merged_out).max())
    export_card = dict(card, export={"merged": True, "opset": OPSET, "input": "input",
                                     "output": "probabilities", "layout": "NCHW float32, normalised"})
    reporter.progress("export", 2, 4, "exporting to ONNX")
    with atomic_output(out) as tmp:
        torch.onnx.export(merged, (x[:1],), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["probabilities"],
                          dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}})
        proto = onnx.load(str(tmp))
        meta = {ONNX_CARD_KEY: json.dumps(export_card), "model_type": "Segmentor",
                "class_names": json.dumps({str(i): c["name"] for i, c in enumerate(card["classes"])})}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = f"GeoPEFT {card['backbone']['name']} + {card['decoder']} ({card['tuning']['method']})"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        reporter.progress("export", 3, 4, "checking parity with PyTorch")
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {"input": x.numpy()})[0]
        diff = float(np.abs(reference - onnx_out).max())
        if diff > PARITY_TOLERANCE:
            raise EngineError(f"ONNX output differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g}); "
                              "nothing written", hint="please report this model configuration")
    reporter.progress("export", 4, 4, f"parity OK: max abs diff {diff:.2e}")
    reporter.info(f"ONNX parity with PyTorch on random input (batch 3): max abs diff {diff:.2e} "
                  f"(merge alone: {merge_diff:.2e}; tolerance {PARITY_TOLERANCE:g})")
    reporter.artifact("onnx", str(out))
    return {"out": str(out), "max_abs_diff": diff, "merge_max_abs_diff": merge_diff,
            "size_bytes": Path(out).stat().st_size, "opset": OPSET}
